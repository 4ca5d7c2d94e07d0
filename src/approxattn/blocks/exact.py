"""Exact softmax attention through ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_valid: torch.Tensor | None = None,
    scale: float,
) -> torch.Tensor:
    """Exact attention; grouped-query heads handled by SDPA without copies.

    q ``(B, Hq, Nq, d)``, k/v ``(B, Hkv, Nk, d|dv)``, key_valid ``(B, Nk)`` bool or None.
    A query row left with no key (causal attention over left padding) returns zeros.
    """
    groups = q.shape[1] // k.shape[1]
    gqa = {"enable_gqa": True} if groups > 1 else {}
    if key_valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    allowed = key_valid[:, None, None, :]
    if causal:
        n = q.shape[2]
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    has_key = allowed.any(dim=-1, keepdim=True)
    # rows with no key would be NaN: let them attend everywhere, then zero them
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scale, **gqa)
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


def softmax_attention_matrix(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, key_valid: torch.Tensor | None = None, scale: float
) -> torch.Tensor:
    """The explicit ``(B, H, Nq, Nk)`` attention matrix (analysis and tests only: quadratic memory)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    if causal:
        n = logits.shape[-1]
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)
