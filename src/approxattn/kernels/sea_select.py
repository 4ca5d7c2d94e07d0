"""Triton kernel for SEA's selection: each row's best candidate cell in one pass over the estimate.

SEA keeps, for every (head, query row), the most probable compressed column that holds a key (its
"best cell"), then fills each group's budget. In PyTorch that is a masked copy of the whole estimate
followed by an argmax: at N = 65,536 causal on an H100, 0.85 + 0.56 ms of passes over a 0.5 GB map
(`benchmarks/results/h100/sea/session13`). Here one program reads ``BR`` rows of probabilities and
their samples' candidate rows and writes the index alone. Inference only (no gradient flows through
an argmax).

One op, :func:`masked_row_argmax`, with its PyTorch twin :func:`masked_row_argmax_reference`::

    best = probs.masked_fill(~candidates[:, None], -inf).argmax(-1)     # the first of equal maxima

(0 for a row without candidates, as torch's argmax of an all −inf row). :func:`fast_masked_row_argmax`
is the dispatching form: None where the kernel does not apply.
"""

from __future__ import annotations

import torch

from .dispatch import HAS_TRITON, interpreting, kernels_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the module still imports, fast_masked_row_argmax returns None
    triton = None

MAX_COLUMNS = 1024
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(probs, candidates) -> None:
    if not isinstance(probs, torch.Tensor) or not isinstance(candidates, torch.Tensor):
        raise TypeError("probs, candidates: expected tensors, got "
                        f"{type(probs).__name__}, {type(candidates).__name__}")
    if probs.dim() != 4 or not probs.is_floating_point():
        raise ValueError(f"probs: expected a floating (B, H, Nq, T) tensor, got {probs.dtype} {tuple(probs.shape)}")
    B, _, Nq, T = probs.shape
    if candidates.dtype != torch.bool or tuple(candidates.shape) != (B, Nq, T):
        raise ValueError(f"candidates: expected a bool ({B}, {Nq}, {T}) tensor, got {candidates.dtype} "
                         f"{tuple(candidates.shape)}")
    if candidates.device != probs.device:
        raise ValueError(f"candidates: expected a tensor on {probs.device} (probs' device), got {candidates.device}")


def masked_row_argmax_reference(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``(B, H, Nq)`` int64: each row's argmax of probs ``(B, H, Nq, T)`` over the columns where
    candidates ``(B, Nq, T)`` is True (first of equal maxima; 0 where a row has none)."""
    _check(probs, candidates)
    return probs.masked_fill(~candidates[:, None], float("-inf")).argmax(dim=-1)


if HAS_TRITON:

    @triton.jit
    def _masked_row_argmax_kernel(
        p_ptr, c_ptr, out_ptr, stride_pb, stride_ph, stride_pn, stride_cb, stride_cn,
        H, Nq, T, BR: tl.constexpr, BT: tl.constexpr,
    ):
        """Grid (row block, batch·head): BR rows of one head, all T columns."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid * BR + tl.arange(0, BR)
        cols = tl.arange(0, BT)
        row_ok = rows < Nq
        col_ok = cols < T
        keep = row_ok[:, None] & col_ok[None, :]
        p = tl.load(p_ptr + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
                    + rows[:, None].to(tl.int64) * stride_pn + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        cand = tl.load(c_ptr + b.to(tl.int64) * stride_cb + rows[:, None].to(tl.int64) * stride_cn + cols[None, :],
                       mask=keep, other=0) != 0
        score = tl.where(cand, p, float("-inf"))
        # a row of no candidate: every score −inf, and the first index (0) wins, as in torch
        best = tl.argmax(score, axis=1, tie_break_left=True)
        tl.store(out_ptr + bh.to(tl.int64) * Nq + rows, best.to(tl.int64), mask=row_ok)


def masked_row_argmax(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The Triton kernel's :func:`masked_row_argmax_reference` (probs with a unit last stride,
    T ≤ 1024, fp16/bf16/fp32). Raises ValueError/TypeError on bad inputs and RuntimeError where
    Triton cannot run on probs' device."""
    _check(probs, candidates)
    if probs.dtype not in KERNEL_DTYPES:
        raise TypeError(f"probs: expected dtype float16, bfloat16 or float32, got {probs.dtype}")
    if probs.shape[-1] > MAX_COLUMNS:
        raise ValueError(f"probs: expected at most {MAX_COLUMNS} columns, got {probs.shape[-1]}")
    return _launch(probs, candidates)


def _launch(probs, candidates):
    if not HAS_TRITON:
        raise RuntimeError("masked_row_argmax needs triton (pip install triton); use masked_row_argmax_reference")
    if not (probs.is_cuda or interpreting()):
        raise RuntimeError(f"probs: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {probs.device}")
    B, H, Nq, T = probs.shape
    out = torch.empty(B, H, Nq, dtype=torch.int64, device=probs.device)
    if out.numel() == 0:
        return out
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    cand = candidates.view(torch.uint8)
    if cand.stride(-1) != 1:
        cand = cand.contiguous()
    BT = max(16, triton.next_power_of_2(T))
    BR = 16 if interpreting() else max(1, min(64, 4096 // BT))
    _masked_row_argmax_kernel[(triton.cdiv(Nq, BR), B * H)](
        probs, cand, out, probs.stride(0), probs.stride(1), probs.stride(2), cand.stride(0), cand.stride(1),
        H, Nq, T, BR=BR, BT=BT,
    )
    return out


def fast_masked_row_argmax(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor | None:
    """:func:`masked_row_argmax`'s output, or None where the kernel does not apply (Triton missing,
    kernels disabled, not CUDA unless forced under the interpreter, dtype or width past its limits)."""
    _check(probs, candidates)
    if not kernels_enabled(probs) or probs.dtype not in KERNEL_DTYPES or probs.shape[-1] > MAX_COLUMNS:
        return None
    return _launch(probs, candidates)


__all__ = ["fast_masked_row_argmax", "masked_row_argmax", "masked_row_argmax_reference"]
