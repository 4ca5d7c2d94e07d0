"""Low-rank attention: Linformer's learned sequence projections."""

from __future__ import annotations

from typing import Any

import torch

from ..blocks.exact import softmax_attention
from ..blocks.projections import INITS, SHARING_MODES, SequenceProjection
from ..module import AttentionModule
from ..registry import Cost, ExactLimit, MethodSpec, Shape, choice_option, int_option, register, seed_option
from ..validation import AttentionShape, compute_dtype


def projection_options(rank: int) -> tuple:
    return (
        int_option("rank", rank, "projected sequence length r (rows of E and F)"),
        int_option("max_len", 4096, "longest supported sequence (columns of E and F); the functional form "
                   "uses seq_k"),
        choice_option("sharing", "headwise", "'headwise': one E, F per layer; 'kv': E = F; 'none': per head",
                      SHARING_MODES),
        int_option("num_heads", None, "key/value heads (needed for sharing='none')", allow_none=True),
        choice_option("init", "mean-pool", "E, F initialisation: segment means (training-free) or N(0, 1/r)",
                      INITS),
        seed_option(),
    )


def build_projection(options: dict, generator: torch.Generator) -> SequenceProjection:
    return SequenceProjection(
        rank=options["rank"], max_len=options["max_len"], sharing=options["sharing"],
        num_heads=options["num_heads"], init=options["init"], generator=generator,
    )


def infer_max_len(seq_q: int, seq_k: int) -> dict[str, Any]:
    return {"max_len": seq_k}


class LinformerAttention(AttentionModule):
    """Linformer (Wang et al. 2020): ``softmax(q (E k)ᵀ·scale) (F v)`` with E, F ``(r, max_len)``.

    E and F are sliced to the actual length; padded keys are zeroed before the projection
    and projected rows that touch no valid key are masked, so padding never changes
    outputs. Non-causal only: E mixes future tokens into every projected key.
    ``tie_projection(other)`` shares E and F with another layer (layer-wise sharing).
    """

    native_gqa = True

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        self.projection = build_projection(options, torch.Generator().manual_seed(options["seed"]))

    def tie_projection(self, other: "LinformerAttention") -> None:
        self.projection = other.projection

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        dtype = compute_dtype(q.dtype)
        k_reduced, v_reduced, reduced_valid = self.projection(k.to(dtype), v.to(dtype), key_padding_mask)
        return softmax_attention(q.to(dtype), k_reduced, v_reduced, key_valid=reduced_valid, scale=scale)


def projection_cost(shape: Shape, rank: int) -> Cost:
    """Cost of ``E k`` and ``F v``: the (r × N) projections of keys and values."""
    elems = shape.batch * shape.kv_heads * rank * (shape.head_dim + shape.value_dim)
    return Cost(
        flops=2.0 * elems * shape.seq_k,
        exps=0.0,
        bytes_moved=4.0 * (2 * rank * shape.seq_k + 2 * elems),
        peak_memory=4.0 * elems,
    )


def add_costs(*costs: Cost) -> Cost:
    return Cost(*(sum(getattr(c, f) for c in costs) for f in ("flops", "exps", "bytes_moved", "peak_memory")))


def linformer_cost(shape: Shape, options: dict) -> Cost:
    rank = min(options["rank"], shape.seq_k)
    probabilities = shape.batch * shape.heads * shape.seq_q * rank
    attention = Cost(
        flops=2.0 * probabilities * (shape.head_dim + shape.value_dim),
        exps=float(probabilities),
        bytes_moved=shape.io_bytes + 4.0 * 2 * probabilities,
        peak_memory=4.0 * probabilities,
    )
    return add_costs(projection_cost(shape, rank), attention)


register(MethodSpec(
    name="linformer",
    family="low-rank",
    summary="learned sequence projections E, F reduce keys and values to r rows",
    reference="Wang et al., Linformer: Self-Attention with Linear Complexity, 2020",
    supports_causal=False,
    options=projection_options(256),
    exact_limit=ExactLimit(
        parent="softmax",
        description="rank = max_len = N with init='mean-pool' (E = F = I)",
        options=lambda n: {"rank": n, "max_len": n, "init": "mean-pool"},
    ),
    cost_formula=linformer_cost,
    cost_doc="flops = 2·B·Hkv·r·Nk·(d+dv) (E k, F v) + 2·B·H·Nq·r·(d+dv); exps = B·H·Nq·r; "
             "bytes = q,k,v,o + E,F + fp32 N×r probabilities written and read; peak = N×r probabilities",
    module_class=LinformerAttention,
    infer_options=infer_max_len,
    example_options=lambda n: {"rank": max(1, n // 4)},
))
