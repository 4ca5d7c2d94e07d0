"""Compile recorded kernel launches for an H100 (sm_90) with Triton's real compiler, no GPU needed.

``python tests/sm90_compile.py launches.json`` (run without ``TRITON_INTERPRET``): each entry names a
kernel (module, function), its pointer dtypes, scalar kinds and constexpr values, as
``test_kernels_compile.py`` records them from launches under the interpreter. The interpreter runs
kernels as Python, so code the compiler rejects (a name bound only in a runtime branch, a type a loop
cannot carry, a bad ``tl.dot`` operand) passes there; this catches it before a GPU does. Prints one
``FAIL`` line a kernel that does not compile and ``compiled N failed M``; exit status 1 on a failure.
"""

from __future__ import annotations

import importlib
import json
import sys

POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "uint8": "*u8", "int32": "*i32",
                 "int64": "*i64"}
SCALAR_TYPES = {"int": "i32", "float": "fp32", "bool": "i1"}


def compile_all(entries: list[dict]) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for entry in entries:
        fn = getattr(importlib.import_module(entry["module"]), entry["kernel"])
        names = fn.arg_names
        pointers, scalars = entry["pointers"], entry["scalars"]
        signature = {names[i]: POINTER_TYPES[t] for i, t in enumerate(pointers)}
        signature |= {names[len(pointers) + j]: SCALAR_TYPES[t] for j, t in enumerate(scalars)}
        signature |= {name: "constexpr" for name in names[len(pointers) + len(scalars):]}
        try:
            triton.compile(ASTSource(fn, signature, constexprs=entry["constexprs"]), target=target,
                           options={"num_warps": entry.get("num_warps", 4), "num_stages": entry.get("num_stages", 2)})
        except Exception as error:  # noqa: BLE001  (every compiler error is a finding)
            failed += 1
            print(f"FAIL {entry['kernel']} {entry['pointers']} {entry['constexprs']}: "
                  f"{type(error).__name__}: {str(error)[:2000]}", flush=True)
    print(f"compiled {len(entries) - failed} failed {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(compile_all(json.loads(open(sys.argv[1]).read())))
