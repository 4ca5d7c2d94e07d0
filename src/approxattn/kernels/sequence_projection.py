"""Triton kernels for Linformer's / FLuRKA's sequence projection ``x_r[b, h] = E[h] · x[b, h]``, fwd and bwd.

E is ``(C, r, N)`` with C = 1 (one matrix shared by every head) or C = H (one per key/value head),
x is ``(B, H, N, d)`` (keys or values, any strides). The reduction runs over the sequence, the long
axis, so the result ``(B, H, r, d)`` is small and everything the op costs is reading x (and E) and,
in the backward, writing dx and dE.

Why a kernel: ``torch.einsum("hrn,bhnd->bhrd")`` turns this into one GEMM over ``(N, B·H·d)`` by
copying x into that layout in the forward (and saving the copy), and its backward writes dx in that
layout and copies it back: about 0.9 GB moved per tensor at N = 65,536, H = 16, d = 64 in bf16,
where reading x once in the forward and x, E once / writing dx, dE once in the backward is 0.4 GB.

- forward ``_project_fwd``, grid (b·h, split): each program sums ``E[:, n-tile] @ x[n-tile, :]`` over
  its share of the sequence into fp32 registers and writes one ``(r, d)`` partial; the partials are
  summed by torch (a few MB).
- backward ``_project_bwd``, grid (n-tile, C): one program per tile of N reads its E tile once and,
  for every (b, h) that uses that matrix, ``dx = Eᵀ · dy`` (stored) and ``dE += dy · xᵀ`` (fp32
  registers), then stores its dE tile: x and E are read once, dx and dE written once.

E is rounded to x's dtype for the products (as the PyTorch path's ``E.to(x.dtype)``) with fp32
accumulation; fp32 inputs take IEEE fp32 products. :func:`sequence_projection_reference` is the
PyTorch twin; :func:`fast_sequence_projection` dispatches (None where the kernels do not apply).
"""

from __future__ import annotations

import math

import torch

from ..blocks.projections import (
    project_sequence_reference as sequence_projection_reference,  # noqa: F401  (the twin)
)
from .dispatch import HAS_TRITON, kernels_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._feature_map import _cast_out, _dot
    from ._launch import Launch, PlanCache, interpreting, layout_key, num_programs_hint
else:  # pragma: no cover - the module still imports, fast_sequence_projection returns None
    triton = None

MAX_RANK = 256
MAX_HEAD_DIM = 256
# the forward's (r, d) fp32 accumulator and the backward's dy tile grow as BR · BD: beyond 256 × 64 values
# (e.g. r = 256 with d = 128) the kernels would spill or run out of shared memory, so the einsum serves them
MAX_TILE = 256 * 64
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp32 x stays with torch's GEMMs: the kernels' IEEE fp32 dots made Linformer (which projects in fp32)
# 4× slower on an H100 (fwd+bwd at N = 65,536: 23.8 → 101.9 ms; benchmarks/results/h100/run9)
DISPATCH_DTYPES = (torch.float16, torch.bfloat16)


def _check(e: torch.Tensor, x: torch.Tensor) -> None:
    for name, t, dims in (("e", e, 3), ("x", x, 4)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(t.shape)}")
    if e.shape[2] != x.shape[2]:
        raise ValueError(f"e: expected {x.shape[2]} columns (x's sequence length), got shape {tuple(e.shape)}")
    if e.shape[0] not in (1, x.shape[1]):
        raise ValueError(f"e: expected 1 or {x.shape[1]} (x's heads) matrices, got shape {tuple(e.shape)}")


if HAS_TRITON:

    @triton.jit
    def _project_fwd(
        e_ptr, x_ptr, part_ptr,
        N, R, D, H, tiles_per_split,
        s_ec, s_er, s_en, s_xb, s_xh, s_xn, s_xd,
        LP: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """Grid (b·h, split): ``part[split, b·h] = Σ_{n in split} E[h, :, n] x[b, h, n, :]`` in fp32
        (a shared E comes with ``s_ec = 0``). Heads vary fastest in launch order, so (with a shared E)
        the programs of one split run together and read its E columns from L2 (fp32 E is 4× the bytes of a bf16 x tile)."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_r = tl.arange(0, BR)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        e_base = e_ptr + h.to(tl.int64) * s_ec + offs_r[:, None].to(tl.int64) * s_er
        x_base = x_ptr + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + offs_d[None, :].to(tl.int64) * s_xd
        acc = tl.zeros([BR, BD], dtype=tl.float32)
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BN))
        for tile in range(first, last):
            n = tile * BN + offs_n
            e = tl.load(e_base + n[None, :].to(tl.int64) * s_en, mask=(offs_r[:, None] < R) & (n[None, :] < N),
                        other=0.0)
            x = tl.load(x_base + n[:, None].to(tl.int64) * s_xn, mask=(n[:, None] < N) & (offs_d[None, :] < D),
                        other=0.0)
            acc += _dot(_cast_out(e, x.dtype), x, LP)
        out = part_ptr + (split.to(tl.int64) * tl.num_programs(0) + bh) * BR * BD
        tl.store(out + offs_r[:, None] * BD + offs_d[None, :], acc)

    @triton.jit
    def _sum_parts(part_ptr, out_ptr, splits, R, D, BR: tl.constexpr, BD: tl.constexpr):
        """Grid (b·h): ``out[b, h] = Σ_split part[split, b·h]`` cut to ``(R, D)``, in out's dtype
        (out contiguous ``(B, H, R, D)``): one launch instead of torch's sum, slice, copy and cast."""
        bh = tl.program_id(0)
        offs_r = tl.arange(0, BR)
        offs_d = tl.arange(0, BD)
        tile = offs_r[:, None] * BD + offs_d[None, :]
        acc = tl.zeros([BR, BD], dtype=tl.float32)
        for split in range(0, splits):
            acc += tl.load(part_ptr + (split * tl.num_programs(0) + bh).to(tl.int64) * BR * BD + tile)
        out = out_ptr + bh.to(tl.int64) * R * D
        tl.store(out + offs_r[:, None] * D + offs_d[None, :], _cast_out(acc, out_ptr.dtype.element_ty),
                 mask=(offs_r[:, None] < R) & (offs_d[None, :] < D))

    @triton.jit
    def _project_bwd(
        e_ptr, x_ptr, dy_ptr, dx_ptr, de_ptr,
        N, R, D, B, H, heads_per_matrix,
        s_ec, s_er, s_en, s_xb, s_xh, s_xn, s_xd, s_yb, s_yh, s_yr, s_yd, s_dxb, s_dxh, s_dxn, s_dxd,
        s_dec, s_der, s_den,
        NEED_DX: tl.constexpr, NEED_DE: tl.constexpr, LP: tl.constexpr,
        BR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """Grid (n-tile, C): ``dx[b, h, tile] = E[c, :, tile]ᵀ dy[b, h]`` and
        ``dE[c, :, tile] = Σ_{(b, h) using c} dy[b, h] x[b, h, tile]ᵀ``. ``heads_per_matrix`` is H for
        a shared E (C = 1, c = 0: every head) and 1 for one E per head (c = h)."""
        tile = tl.program_id(0)
        c = tl.program_id(1)
        offs_r = tl.arange(0, BR)
        n = tile * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        r_ok = offs_r < R
        n_ok = n < N
        d_ok = offs_d < D
        e = tl.load(e_ptr + c.to(tl.int64) * s_ec + offs_r[:, None].to(tl.int64) * s_er
                    + n[None, :].to(tl.int64) * s_en,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        de = tl.zeros([BR, BN], dtype=tl.float32)
        for i in range(B * heads_per_matrix):
            b = i // heads_per_matrix
            h = i % heads_per_matrix + c
            dy = tl.load(dy_ptr + b.to(tl.int64) * s_yb + h.to(tl.int64) * s_yh
                         + offs_r[:, None].to(tl.int64) * s_yr + offs_d[None, :].to(tl.int64) * s_yd, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            if NEED_DX:
                dx = _dot(tl.trans(_cast_out(e, dy.dtype)), dy, LP)
                tl.store(dx_ptr + b.to(tl.int64) * s_dxb + h.to(tl.int64) * s_dxh + n[:, None].to(tl.int64) * s_dxn
                         + offs_d[None, :].to(tl.int64) * s_dxd, _cast_out(dx, dx_ptr.dtype.element_ty),
                         mask=n_ok[:, None] & d_ok[None, :])
            if NEED_DE:
                xt = tl.load(x_ptr + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + n[None, :].to(tl.int64) * s_xn
                             + offs_d[:, None].to(tl.int64) * s_xd, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                de += _dot(dy, xt, LP)
        if NEED_DE:
            tl.store(de_ptr + c.to(tl.int64) * s_dec + offs_r[:, None].to(tl.int64) * s_der
                     + n[None, :].to(tl.int64) * s_den,
                     _cast_out(de, de_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


def _blocks(R: int, D: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(R)), max(16, triton.next_power_of_2(D))


# Launch configs by the (rank, head dim) block, shared with ``benchmarks/projection_registers.py``, which reports the
# registers and spills of these and the alternatives for sm_90 on the CPU: at 4 warps both kernels spill from a
# 128 × 64 tile on (run 16's notes; a config that spills none awaits its GPU A/B there).
def _warps(BR: int, BD: int) -> int:
    """Warps of both kernels."""
    return 4


def _forward_block_n(BR: int, BD: int) -> int:
    """Rows of x a forward step reads."""
    return 64


def _backward_block_n(BR: int, BD: int) -> int:
    """Sequence positions a backward program takes: its dE fp32 accumulator holds BR × BN values, 8K per
    program (64 registers a thread at 4 warps)."""
    return max(16, min(64, 8192 // BR))


# Launches are built once per layout (shapes, strides, dtypes, alignment of e, x, dy) and called
# through ``_launch.Launch``: an ordinary ``kernel[grid](...)`` re-specialises its ~20 arguments on
# every call, ~0.1 ms of host time each on the H100 machine, and FLuRKA is host-bound at every N.
_FORWARD_PLANS = PlanCache() if HAS_TRITON else None
_BACKWARD_PLANS = PlanCache() if HAS_TRITON else None


class _ForwardPlan:
    def __init__(self, e: torch.Tensor, x: torch.Tensor):
        B, H, N, D = x.shape
        R = e.shape[1]
        BR, BD = _blocks(R, D)
        BN = 16 if interpreting() else _forward_block_n(BR, BD)
        tiles = triton.cdiv(N, BN)
        # about two programs per multiprocessor: enough to stream x at full bandwidth, few partials to sum
        splits = max(1, min(tiles, triton.cdiv(num_programs_hint(x.device) // 4, B * H)))
        tiles_per_split = triton.cdiv(tiles, splits)
        splits = triton.cdiv(tiles, tiles_per_split)
        self.part_shape, self.out_shape = (splits, B * H, BR, BD), (B, H, R, D)
        meta = {} if interpreting() else {"num_warps": _warps(BR, BD), "num_stages": 3}
        self.project = Launch(
            _project_fwd, (B * H, splits),
            (N, R, D, H, tiles_per_split, 0 if e.shape[0] == 1 else e.stride(0), *e.stride()[1:], *x.stride()),
            dict(LP=x.dtype != torch.float32, BR=BR, BN=BN, BD=BD, **meta), x.device,
        )
        self.sum = Launch(_sum_parts, (B * H,), (splits, R, D), dict(BR=BR, BD=BD), x.device)


def _forward(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    R = e.shape[1]
    if N == 0 or R == 0 or B * H == 0:
        return x.new_zeros(B, H, R, D)
    key = layout_key(e, x)
    plan = _FORWARD_PLANS.get(key) or _FORWARD_PLANS.add(key, _ForwardPlan(e, x))
    part = torch.empty(plan.part_shape, device=x.device, dtype=torch.float32)
    out = torch.empty(plan.out_shape, device=x.device, dtype=x.dtype)
    plan.project(e, x, part)
    plan.sum(part, out)
    return out


class _BackwardPlan:
    def __init__(self, e, x, dy, need_dx: bool, need_de: bool):
        B, H, N, D = x.shape
        C, R = e.shape[0], e.shape[1]
        BR, BD = _blocks(R, D)
        BN = 16 if interpreting() else _backward_block_n(BR, BD)
        dx_strides = torch.empty(x.shape, device="meta").stride() if need_dx else x.stride()  # dx: dense
        de_strides = torch.empty(e.shape, device="meta").stride() if need_de else e.stride()
        meta = {} if interpreting() else {"num_warps": _warps(BR, BD), "num_stages": 2}
        self.launch = Launch(
            _project_bwd, (triton.cdiv(N, BN), C),
            (N, R, D, B, H, H if C == 1 else 1, *e.stride(), *x.stride(), *dy.stride(), *dx_strides, *de_strides),
            dict(NEED_DX=need_dx, NEED_DE=need_de, LP=x.dtype != torch.float32, BR=BR, BN=BN, BD=BD, **meta),
            x.device,
        )


def _backward(e, x, dy, need_dx: bool, need_de: bool):
    if x.numel() == 0 or e.shape[1] == 0:
        return (torch.zeros_like(x) if need_dx else None), (torch.zeros_like(e) if need_de else None)
    key = (layout_key(e, x, dy), need_dx, need_de)
    plan = _BACKWARD_PLANS.get(key) or _BACKWARD_PLANS.add(key, _BackwardPlan(e, x, dy, need_dx, need_de))
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_dx else None   # dense even for an expanded x
    de = torch.empty(e.shape, device=e.device, dtype=e.dtype) if need_de else None
    plan.launch(e, x, dy, dx if need_dx else x, de if need_de else e)
    return dx, de


class _SequenceProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, x):
        ctx.save_for_backward(e, x)
        return _forward(e, x)

    @staticmethod
    @torch.autograd.function.once_differentiable   # no double backward: create_graph raises, never a silent zero
    def backward(ctx, dy):
        e, x = ctx.saved_tensors
        need_de, need_dx = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_de or need_dx):
            return None, None
        dx, de = _backward(e, x, dy, need_dx, need_de)
        return de, dx


def sequence_projection(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E[h] @ x[b, h]`` by the Triton kernels: e ``(C, r, N)`` (C = 1 or H; fp32/bf16/fp16, any strides,
    e.g. a parameter sliced to N columns), x ``(B, H, N, d)`` fp16/bf16/fp32 → ``(B, H, r, d)`` in x's dtype;
    differentiable in both (dE in e's dtype). r ≤ 256, d ≤ 256."""
    _check(e, x)
    if not HAS_TRITON:
        raise RuntimeError("sequence_projection: Triton is not installed (use fast_sequence_projection)")
    if e.shape[1] > MAX_RANK or x.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"e, x: expected r ≤ {MAX_RANK} and d ≤ {MAX_HEAD_DIM}, got r = {e.shape[1]}, "
                         f"d = {x.shape[3]}")
    if e.dtype not in KERNEL_DTYPES or x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"e, x: expected fp16/bf16/fp32, got {e.dtype} and {x.dtype}")
    if e.device != x.device:
        raise ValueError(f"e: expected x's device {x.device}, got {e.device}")
    return _SequenceProjection.apply(e, x)


def fast_sequence_projection(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """:func:`sequence_projection`'s output, or None where the kernels do not apply (the caller then
    runs :func:`sequence_projection_reference`): Triton missing, ``APPROXATTN_DISABLE_KERNELS=1``, x not
    on CUDA (unless ``TRITON_INTERPRET=1`` and ``APPROXATTN_FORCE_KERNELS=1``), e on another device,
    r or d over 256 or r · d beyond 256 · 64 (padded to powers of two), an empty tensor, x not fp16/bf16
    (fp32 keeps torch's GEMMs) or e not fp16/bf16/fp32. Bad shapes raise."""
    _check(e, x)
    if not kernels_enabled(x) or e.device != x.device or x.numel() == 0 or e.shape[1] == 0:
        return None
    if e.shape[1] > MAX_RANK or x.shape[3] > MAX_HEAD_DIM or math.prod(_blocks(e.shape[1], x.shape[3])) > MAX_TILE:
        return None
    if e.dtype not in KERNEL_DTYPES or x.dtype not in DISPATCH_DTYPES:
        return None
    return _SequenceProjection.apply(e, x)
