"""The static census's pieces (``benchmarks/sass_census.py``) and the recorder's JIT specialization
(``sm90_compile.describe``), without compiling anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
tl = pytest.importorskip("triton.language")

import sass_census  # noqa: E402
from sm90_compile import describe  # noqa: E402

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/              @!P0 LDG.E.U16 R2, desc[UR4][R2.64] ;
        /*0030*/                   FFMA R4, R2, R3, R4 ;
        /*0040*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0050*/               @P0 BRA 0x20 ;
        /*0060*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0070*/                   BRA 0x70 ;
        /*0080*/                   EXIT ;
"""


def test_sass_lines_and_loops():
    instructions = [(int(a, 16), op.split(".")[0], rest) for a, op, rest in sass_census.SASS_LINE.findall(SASS)]
    assert [op for _, op, _ in instructions] == ["LDC", "S2R", "LDG", "FFMA", "ISETP", "BRA", "HMMA", "BRA", "EXIT"]
    # 0x20..0x50 is a loop of 4; the branch to itself at 0x70 is the end-of-kernel trap every kernel has, no loop
    assert sass_census.loop_bodies(instructions) == [4]


@pytest.mark.parametrize("registers,shared,warps,ctas", [
    (73, 68 * 1024, 8, 3),        # the head: registers and shared memory both allow 3
    (80, 32 * 1024, 8, 3),        # split dots: 80 registers (allocated as 80) still 3
    (64, 32 * 1024, 8, 4),        # maxnreg 64: 4
    (56, 0, 4, 9),                # the [P, v] kernel: registers allow 9
    (255, 96 * 1024, 8, 1),       # the strided GEMM
    (16, 0, 1, 32),               # the CTA cap
])
def test_resident_ctas(registers, shared, warps, ctas):
    assert sass_census.resident_ctas(registers, shared, warps) == ctas


def test_programs_sums_the_launches():
    assert sass_census.programs({"grids": [[4, 2], [3], [2, 2, 2]]}) == 8 + 3 + 8
    assert sass_census.programs({}) == 0


def test_describe_specializes_as_the_jit():
    def kernel(x_ptr, y_ptr, n, stride, unit, scale, flag, BLOCK: tl.constexpr):
        pass

    x = torch.zeros(64)
    entry = describe(kernel, (x, x[1:], 32, 7, 1, 0.5, True), {"BLOCK": 16, "num_warps": 8})
    sig = entry["signature"]
    assert sig == {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "stride": "i32", "unit": "constexpr",
                   "scale": "fp32", "flag": "i1", "BLOCK": "constexpr"}
    assert entry["constexprs"] == {"unit": 1, "BLOCK": 16}
    # x's storage is allocated 16-aligned, x[1:] starts 4 bytes in; 32 divides by 16, 7 does not
    assert entry["divisible"] == ["x_ptr", "n"]
    assert entry["options"] == {"num_warps": 8}
