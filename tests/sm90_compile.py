"""Compile kernel launches recorded under Triton's interpreter for an H100 (sm_90) with the real compiler.

The interpreter runs kernels as Python, so code that Triton's compiler rejects (a name bound to two types
in a runtime branch, a value a loop cannot carry, a bad ``tl.dot`` operand) can pass every CPU test and
fail only on a GPU. :func:`recording` notes each interpreted launch (kernel, argument types, constexpr
values, launch options); ``python tests/sm90_compile.py launches.json``, run without ``TRITON_INTERPRET``,
compiles each for sm_90 (to a cubin, with the ptxas that Triton ships), prints one ``FAIL`` line a launch
that does not compile and ``compiled N failed M``, and exits 1 on a failure. No GPU is needed.

Each launch is compiled as Triton's JIT specializes it on a GPU: an int argument equal to 1 becomes a constant
(a unit stride makes loads contiguous, so they vectorize), and an int divisible by 16 or a tensor whose address
is carries the ``tt.divisibility`` hint. The values are those of the recorded (small) launch; strides of the same
layouts at long sequences keep these properties.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import sys

POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64", "uint8": "*u8",
                 "int8": "*i8", "int16": "*i16", "int32": "*i32", "int64": "*i64", "bool": "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def describe(fn, args: tuple, kwargs: dict) -> dict:
    """One launch of the ``@triton.jit`` function ``fn`` (the undecorated Python function) as JSON."""
    import torch
    import triton.language as tl

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    signature, constexprs, divisible = {}, {}, []
    for name, param in params.items():
        value = bound.get(name, param.default)
        if "constexpr" in str(param.annotation) or value is None or (type(value) is int and value == 1):
            signature[name] = "constexpr"    # the JIT makes an int equal to 1 a constant too
            constexprs[name] = {"dtype": str(value)} if isinstance(value, tl.dtype) else value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[str(value.dtype).removeprefix("torch.")]
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} is not described")
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "options": {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}}


@contextlib.contextmanager
def recording():
    """Within the block, every interpreted kernel launch is described into the yielded dict (deduplicated; an
    entry's ``grids`` lists the grid of each of its launches)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        entry = describe(self.fn, args, kwargs)
        kept = launches.setdefault(json.dumps(entry, sort_keys=True), entry)
        if isinstance(grid, (tuple, list)):    # each launch's grid, for a census of programs
            kept.setdefault("grids", []).append([int(g) for g in grid])
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def compile_entry(entry: dict, constexprs: dict | None = None, options: dict | None = None):
    """One recorded launch compiled for sm_90 (``constexprs`` / ``options`` override the recorded ones)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(entry["module"]), entry["kernel"])
    recorded = {k: getattr(tl, v["dtype"]) if isinstance(v, dict) else v for k, v in entry["constexprs"].items()}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in entry.get("divisible", ())}
    return triton.compile(ASTSource(fn, entry["signature"], constexprs=recorded | (constexprs or {}), attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": 2} | entry["options"] | (options or {}))


def compile_all(entries: list[dict]) -> int:
    failed = 0
    for entry in entries:
        try:
            compile_entry(entry)
        except Exception as error:  # noqa: BLE001  (every compiler error is a finding)
            failed += 1
            print(f"FAIL {entry['kernel']} {entry['signature']} {entry['constexprs']}: "
                  f"{type(error).__name__}: {str(error)[:2000]}", flush=True)
    print(f"compiled {len(entries) - failed} failed {failed}", flush=True)
    return 1 if failed else 0


def launches_recorded_by(script: str, record) -> list[dict] | None:
    """The launches ``record()`` describes, recorded under the interpreter in a child process (interpreted kernels
    cannot be compiled in the process that recorded them): ``python script --record PATH`` with the interpreter on
    and kernels forced. In that child (``sys.argv`` says ``--record PATH``) this writes ``record()`` as JSON to PATH
    and returns None; the caller then stops. ``RECORD_PYTHONPATH``, where set, is the child's ``PYTHONPATH``: the
    GPU machine's Triton (3.6) compiles but its interpreter fails on these kernels, so
    ``PYTHONPATH=.triton36:src RECORD_PYTHONPATH=src`` records under the installed Triton and compiles with 3.6."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    if len(sys.argv) == 3 and sys.argv[1] == "--record":
        Path(sys.argv[2]).write_text(json.dumps(record()))
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "launches.json"
        env = dict(os.environ, TRITON_INTERPRET="1", APPROXATTN_FORCE_KERNELS="1")
        if "RECORD_PYTHONPATH" in os.environ:   # record under another Triton than the one that compiles
            env["PYTHONPATH"] = os.environ["RECORD_PYTHONPATH"]
        subprocess.run([sys.executable, script, "--record", str(path)], env=env, check=True)
        return json.loads(path.read_text())


def ptxas_usage(entry: dict, constexprs: dict | None = None, options: dict | None = None) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) a thread of one recorded launch compiled for sm_90, with
    ``constexprs`` / ``options`` overriding the recorded ones: ptxas ``-v`` (the newest ptxas Triton ships) on the
    compiler's PTX. No GPU needed; counts are this Triton's code generation."""
    return compiled_usage(compile_entry(entry, constexprs, options))


def compiled_usage(compiled) -> tuple[int, int, int]:
    """:func:`ptxas_usage` of a kernel already compiled by :func:`compile_entry`."""
    import os
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        text = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return int(re.search(r"Used (\d+) registers", text).group(1)), int(spill.group(1)), int(spill.group(2))


def print_usage_table(entries: list[dict], shown: tuple[str, ...]) -> None:
    """A markdown table of :func:`ptxas_usage` for each recorded launch at its own config: kernel, the
    constexprs named in ``shown``, warps, stages, registers and spill bytes (a row for a kernel that does not
    compile, too)."""
    print("| kernel | blocks | warps | stages | registers | spill stores / loads (bytes a thread) |")
    print("|---|---|---|---|---|---|")
    for entry in sorted(entries, key=lambda e: (e["module"], e["kernel"])):
        blocks = ", ".join(f"{k}={v}" for k, v in entry["constexprs"].items() if k in shown)
        options = {"num_warps": 4, "num_stages": 2} | entry["options"]
        try:
            regs, stores, loads = ptxas_usage(entry)
            found = f"{regs} | {stores} / {loads}"
        except Exception as error:  # noqa: BLE001  (a kernel that does not compile is a row too)
            found = f"— | {type(error).__name__}"
        print(f"| {entry['module'].rsplit('.', 1)[-1]}.{entry['kernel']} | {blocks} | {options['num_warps']} | "
              f"{options['num_stages']} | {found} |", flush=True)


def report_usage(script: str, record, shown: tuple[str, ...]) -> None:
    """A register script's ``main``: record ``record()``'s launches in a child (:func:`launches_recorded_by`), then
    print their :func:`print_usage_table`; in the recording child, nothing more."""
    entries = launches_recorded_by(script, record)
    if entries is not None:
        print_usage_table(entries, shown)


if __name__ == "__main__":
    sys.exit(compile_all(json.loads(open(sys.argv[1]).read())))
