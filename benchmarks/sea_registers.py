"""Registers and spills of SEA's non-causal inference kernels for an H100 (sm_90), at the launch configs a GPU
gets, on the CPU.

SEA's bf16 forward (H = 2, d = 64, T = 128, k = 1, N = 192: every row keeps one cell, so ``forward`` takes the
lean head and the one-column sparse step) runs under Triton's interpreter with each kernel module's launch
config taken as on a GPU (the modules' ``launch_config`` and ``_launch.pick_config`` not told they are
interpreting), every launch is recorded (``tests/sm90_compile.recording``), compiled for sm_90 with the real
compiler and its launch options, and ptxas ``-v`` reports registers and spill bytes. The counts are this
machine's Triton's code generation (3.9 here; the GPU machine has 3.6).

    python benchmarks/sea_registers.py                # ~2 minutes on 2 cores

With the GPU machine's Triton on a CPU machine that has another: ``pip install --target .triton36
triton==3.6.0``, then ``PYTHONPATH=.triton36:src RECORD_PYTHONPATH=src python benchmarks/sea_registers.py`` (records
under the installed Triton, compiles with 3.6). Launches compile as the GPU's JIT specializes them (unit
strides constant, 16-divisible ints and pointers hinted: ``tests/sm90_compile.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SHOWN = ("BM", "BN", "BK", "P", "BR", "BW", "BT", "BD", "BDV", "BMB", "C", "STORE_MAPS", "COLUMN_SUMS", "HAS_VALUE",
         "MIX", "FOLDED")


def _as_on_a_gpu() -> None:
    """Each SEA kernel module's launch config as a GPU gets it (the kernels still run interpreted)."""
    from approxattn.kernels import (
        _launch,
        band_conv,
        row_window_gemm,
        sea_decoder_head,
        sea_encoder,
        sea_values,
        single_column_attention,
    )

    _launch.interpreting = lambda: False
    for module in (sea_decoder_head, sea_encoder, sea_values, single_column_attention, row_window_gemm, band_conv):
        original = module.launch_config

        def gpu_config(*args, _original=original, _module=module, **kwargs):
            interpreting = _module.interpreting
            _module.interpreting = lambda: False
            try:
                return _original(*args, **kwargs)
            finally:
                _module.interpreting = interpreting

        module.launch_config = gpu_config


def record(n: int = 192) -> list[dict]:
    """The launches of SEA's bf16 inference forward at one cell a row, with GPU launch configs. Run under
    ``TRITON_INTERPRET=1`` (see :func:`main`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sm90_compile import recording

    import approxattn

    _as_on_a_gpu()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen).bfloat16() for _ in range(3))
    sea = approxattn.build("sea", head_dim=64, k=1, columns=128).eval()
    with recording() as launches, torch.no_grad():
        sea(q, k, v)
    return list(launches.values())


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sm90_compile import report_usage

    report_usage(__file__, record, SHOWN)


if __name__ == "__main__":
    main()
