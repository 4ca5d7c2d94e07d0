"""Drop-in attention layers built on any registered method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .api import build


class MultiheadAttention(nn.Module):
    """Self- or cross-attention with q/k/v/out projections and any registered ``method``.

    Inputs are batch-first ``(B, N, embed_dim)``. ``num_kv_heads`` < ``num_heads`` gives
    grouped-query attention; ``kdim``/``vdim`` are the widths of the key and value inputs
    for cross-attention (default ``embed_dim``). Extra ``options`` go to the method.

    forward(query, key=None, value=None, *, key_padding_mask=None, causal=False)
        query ``(B, Nq, E)``; key ``(B, Nk, kdim)`` and value ``(B, Nk, vdim)`` default to
        query (self-attention); key_padding_mask ``(B, Nk)`` bool, True = keep
        → ``(B, Nq, E)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        method: str = "softmax",
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a positive divisor of num_heads={num_heads}, got {num_kv_heads!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, kv_width, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attention = build(method, head_dim=self.head_dim, **options)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a (batch, seq, features) tensor, got {got}")
        q = self._heads(self.q_proj(query), self.num_heads)
        k = self._heads(self.k_proj(key), self.num_kv_heads)
        v = self._heads(self.v_proj(value), self.num_kv_heads)
        out = self.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim))
