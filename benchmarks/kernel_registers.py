"""Registers and spills of kernel attention's Triton kernels for an H100 (sm_90), at the launch configs a GPU gets,
on the CPU.

Each method's bf16 fwd+bwd (N = 256) runs under Triton's interpreter with the plans' configs taken as on a GPU
(``_launch.pick_config`` not told it is interpreting), every launch is recorded (``tests/sm90_compile.recording``),
compiled for sm_90 with the real compiler and its launch options, and ptxas ``-v`` reports registers and spill bytes.
The counts are this machine's Triton's code generation (3.9 here; the GPU machine has 3.6). A kernel at 255
registers with spills is a candidate for a smaller block or more warps; see ``projection_registers.py`` for the
sequence projection's config sweep.

    python benchmarks/kernel_registers.py                # ~5 minutes on 2 cores

With the GPU machine's Triton on a CPU machine that has another: ``pip install --target .triton36
triton==3.6.0``, then ``PYTHONPATH=.triton36:src RECORD_PYTHONPATH=src python benchmarks/kernel_registers.py`` (records
under the installed Triton, compiles with 3.6). Launches compile as the GPU's JIT specializes them (unit
strides constant, 16-divisible ints and pointers hinted: ``tests/sm90_compile.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CALLS = (  # (method, options, causal)
    ("performer", {"num_features": 256}, False), ("performer", {"num_features": 256}, True),
    ("performer", {"num_features": 256, "kernel": "relu"}, False), ("linear", {}, False), ("linear", {}, True),
    ("flurka-performer", {"rank": 128, "num_features": 256}, False), ("flurka-linear", {"rank": 128}, False),
)
SHOWN = ("BN", "BM", "BC", "BR", "BMB", "BD", "BDV", "NMB", "FEATURE", "PMAX", "EXACT", "FOLDED", "HAS_VALID")


def record(n: int = 256) -> list[dict]:
    """The launches of every call in ``CALLS`` (bf16, fwd+bwd), with GPU launch configs. Run under
    ``TRITON_INTERPRET=1`` (see :func:`main`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sm90_compile import recording

    import approxattn
    from approxattn.kernels import _launch

    _launch.interpreting = lambda: False   # configs as on a GPU; the kernels still run interpreted
    gen = torch.Generator().manual_seed(0)
    with recording() as launches:
        for method, options, causal in CALLS:
            q, k, v = (torch.randn(1, 2, n, 64, generator=gen).bfloat16().requires_grad_() for _ in range(3))
            approxattn.build(method, head_dim=64, **options)(q, k, v, causal=causal).float().sum().backward()
    return list(launches.values())


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sm90_compile import report_usage

    report_usage(__file__, record, SHOWN)


if __name__ == "__main__":
    main()
