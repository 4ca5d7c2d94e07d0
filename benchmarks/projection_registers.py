"""Registers and spills of the sequence projection's kernels for an H100 (sm_90), on the CPU, by launch config.

Why: FLuRKA r = 256 ran 0.7 ms slower than r = 128 at N = 65,536 on an H100 (run 16) although the projection's bytes
do not grow with r; spills were the suspect. No GPU is needed: each kernel is recorded under Triton's interpreter
(``tests/sm90_compile.recording``), compiled for sm_90 with the real compiler at each (BN, warps) here, and ptxas
(``-v``, the newest one Triton ships) reports its registers and spill bytes. Caveat: this machine's Triton may differ
from the GPU machine's (3.9 here, 3.6 there), so the counts are its code generation, not necessarily the GPU's.

    python benchmarks/projection_registers.py            # r = 128 and 256, d = 64, bf16; ~2 minutes on 2 cores

With the GPU machine's Triton on a CPU machine that has another: ``pip install --target .triton36
triton==3.6.0``, then ``PYTHONPATH=.triton36:src RECORD_PYTHONPATH=src python benchmarks/projection_registers.py`` (records
under the installed Triton, compiles with 3.6). Launches compile as the GPU's JIT specializes them (unit
strides constant, 16-divisible ints and pointers hinted: ``tests/sm90_compile.py``).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

RANKS = (128, 256)
BLOCKS_N = (16, 32, 64)
WARPS = (4, 8)
STAGES = {"_project_fwd": 3, "_project_bwd": 2}


def current(kernel: str, BR: int, BD: int) -> tuple[int, int]:
    """(BN, warps) that the source launches ``kernel`` with on a GPU (``sequence_projection``'s config functions)."""
    from approxattn.kernels import sequence_projection as sp

    block_n = sp._forward_block_n if kernel == "_project_fwd" else sp._backward_block_n
    return block_n(BR, BD), sp._warps(BR, BD)


def record(ranks=RANKS, head_dim=64) -> list[dict]:
    """The projection's launches at each rank, forward and backward, described as ``sm90_compile`` does. Run with
    ``TRITON_INTERPRET=1`` (see :func:`main`): interpreted kernels cannot be compiled in the same process."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sm90_compile import recording

    from approxattn.kernels.sequence_projection import sequence_projection

    with recording() as launches:
        for r in ranks:
            e = torch.randn(1, r, 64, requires_grad=True)
            x = torch.randn(1, 2, 64, head_dim).bfloat16().requires_grad_()
            sequence_projection(e, x).float().sum().backward()
    return [v for v in launches.values() if v["kernel"] in STAGES]


def usage(entry: dict, block_n: int, warps: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) a thread of one compiled config."""
    from sm90_compile import ptxas_usage

    return ptxas_usage(entry, {"BN": block_n}, {"num_warps": warps, "num_stages": STAGES[entry["kernel"]]})


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sm90_compile import launches_recorded_by

    entries = launches_recorded_by(__file__, record)
    if entries is None:   # this was the recording child
        return
    print("| kernel | BR (rank block) | BN | warps | registers | spill stores / loads (bytes a thread) | now |")
    print("|---|---|---|---|---|---|---|")
    for entry in entries:
        BR = entry["constexprs"]["BR"]
        for block_n, warps in itertools.product(BLOCKS_N, WARPS):
            regs, stores, loads = usage(entry, block_n, warps)
            now = "**yes**" if current(entry["kernel"], BR, entry["constexprs"]["BD"]) == (block_n, warps) else ""
            print(f"| {entry['kernel']} | {BR} | {block_n} | {warps} | {regs} | {stores} / {loads} | {now} |",
                  flush=True)


if __name__ == "__main__":
    main()
