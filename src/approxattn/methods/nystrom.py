"""Nyström-family softmax attention: Nyströmformer, and the rank-r oracle it is measured against.

- ``nystromformer`` (Xiong et al. 2021): ``softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V``
  with segment-mean landmarks Q̃, K̃ and an iterative pseudo-inverse.
- ``lowrank-oracle``: the best rank-r approximation of the exact attention matrix (randomized
  SVD), quadratic on purpose — the yardstick for what any rank-r method could reach.

The Gaussian-kernel relatives (kernelized attention, Skyformer, SOFT) live in ``gaussian.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.exact import softmax_attention, softmax_attention_matrix
from ..blocks.gaussian_kernel import masked_rows, segment_means
from ..blocks.pseudo_inverse import nystromformer_pinv
from ..linalg import randomized_svd
from ..module import AttentionModule
from ..registry import (
    Cost,
    ExactLimit,
    MethodSpec,
    Shape,
    choice_option,
    int_option,
    register,
    seed_option,
)
from ..validation import AttentionShape, compute_dtype

PINV_MODES = ("iterative", "exact")


def query_validity(key_padding_mask: torch.Tensor | None, shape: AttentionShape) -> torch.Tensor | None:
    """Which query rows may serve as landmarks (``(B, Nq)`` bool, or None for all).

    The padding mask describes keys. In a self-attention-shaped call (``Nq == Nk``) the
    padded positions are the same tokens on the query side, so they are kept out of the
    query landmarks too (otherwise garbage queries at padded positions would move every
    output). For cross-attention (``Nq != Nk``) every query row counts.
    """
    if key_padding_mask is None or shape.seq_q != shape.seq_k:
        return None
    return key_padding_mask


def _masked_logits(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mask the last axis of ``logits (B, H, n, m)`` by ``valid (B, m)``."""
    if valid is None:
        return logits
    return logits.masked_fill(~valid[:, None, None, :], float("-inf"))


# ----------------------------------------------------------------------------- Nyströmformer


class NystromformerAttention(AttentionModule):
    """Nyströmformer (Xiong et al., AAAI 2021).

    With ``m = landmarks`` (clamped to Nq for the query side and to Nk for the key side):

    1. landmarks ``Q̃ = mean_seg(Q)`` ``(B, H, mq, d)``, ``K̃ = mean_seg(K)`` ``(B, H, mk, d)``:
       means of contiguous segments of the *valid* tokens (padding-aware; with m | N and no
       padding exactly the paper's segment means; no need to pad N to a multiple of m);
    2. ``F = softmax(scale·Q K̃ᵀ)`` ``(Nq, mk)``, ``A = softmax(scale·Q̃ K̃ᵀ)`` ``(mq, mk)``,
       ``B = softmax(scale·Q̃ Kᵀ)`` ``(mq, Nk)`` over valid keys;
    3. ``A⁺`` by 6 hyper-power iterations from the Razavi init (``pinv='iterative'``,
       per (batch, head) scaling), or ``torch.linalg.pinv`` (``pinv='exact'``);
    4. ``out = F (A⁺ (B V))``, right to left, nothing N×N formed;
    5. optional skip: a depthwise convolution of V along the sequence, one ``k×1`` kernel
       per head (``conv_kernel_size``; the paper's LRA setting is 35), added to out.

    With as many landmarks as tokens and ``pinv='exact'``, ``F = A = B`` = the softmax
    matrix and ``out = A A⁺ A V = A V``: exact attention. Landmark segments that hold no
    valid token (only when a sequence has fewer valid tokens than landmarks) are masked out.
    Non-causal only: every landmark mixes tokens from the whole sequence.
    """

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        size = options["conv_kernel_size"]
        self.conv_weight: nn.Parameter | None = None
        if size is not None:
            heads = options["num_heads"]
            if heads is None:
                raise ValueError(
                    "option 'num_heads' of method 'nystromformer': conv_kernel_size needs the number of "
                    "(query) heads for its per-head kernels; expected an int, got None"
                )
            generator = torch.Generator().manual_seed(options["seed"])
            bound = 1.0 / math.sqrt(size)  # nn.Conv2d's default init for fan_in = size
            weight = (torch.rand(heads, size, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            self.conv_weight = nn.Parameter(weight.float())

    def depthwise_conv(self, v: torch.Tensor) -> torch.Tensor:
        """Per-head convolution of v ``(B, H, N, dv)`` along N with zero padding ("same" length)."""
        weight = self.conv_weight
        batch, heads, length, dv = v.shape
        if heads != weight.shape[0]:
            raise ValueError(
                f"q: expected {weight.shape[0]} heads (option num_heads, for the conv skip), got {heads}"
            )
        size = weight.shape[1]
        x = v.permute(0, 3, 1, 2).reshape(batch * dv, heads, length)
        x = F.pad(x, ((size - 1) // 2, size // 2))
        out = F.conv1d(x, weight.to(v.dtype).unsqueeze(1), groups=heads)
        return out.reshape(batch, dv, heads, length).permute(0, 2, 3, 1)

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k, v = masked_rows(k, key_padding_mask), masked_rows(v, key_padding_mask)
        if self.conv_weight is not None and shape.seq_q != shape.seq_k:
            raise ValueError(
                "option 'conv_kernel_size' of method 'nystromformer': the conv skip adds conv(v) to the "
                f"output rows, which needs seq_q == seq_k; got seq_q={shape.seq_q}, seq_k={shape.seq_k}"
            )
        landmarks = self.options["landmarks"]
        q_valid = query_validity(key_padding_mask, shape)
        q_land, q_land_valid = segment_means(q, q_valid, min(landmarks, shape.seq_q))
        k_land, k_land_valid = segment_means(k, key_padding_mask, min(landmarks, shape.seq_k))

        kernel_f = torch.softmax(_masked_logits(scale * q @ k_land.transpose(-1, -2), k_land_valid), dim=-1)
        kernel_a = torch.softmax(_masked_logits(scale * q_land @ k_land.transpose(-1, -2), k_land_valid), dim=-1)
        kernel_b = torch.softmax(_masked_logits(scale * q_land @ k.transpose(-1, -2), key_padding_mask), dim=-1)
        kernel_a = masked_rows(kernel_a, q_land_valid)
        kernel_b = masked_rows(kernel_b, q_land_valid)

        if self.options["pinv"] == "exact":
            a_pinv = torch.linalg.pinv(kernel_a)
        else:
            a_pinv = nystromformer_pinv(kernel_a, iterations=self.options["pinv_iterations"])
        out = kernel_f @ (a_pinv @ (kernel_b @ v))
        if self.conv_weight is not None:
            out = out + self.depthwise_conv(v)
        return out


def nystromformer_cost(shape: Shape, options: dict) -> Cost:
    b, h, d, dv = shape.batch, shape.heads, shape.head_dim, shape.value_dim
    mq, mk = min(options["landmarks"], shape.seq_q), min(options["landmarks"], shape.seq_k)
    nq, nk = shape.seq_q, shape.seq_k
    iterations = 0 if options["pinv"] == "exact" else options["pinv_iterations"]
    per_head = (
        (nq + nk) * d  # segment means
        + 2.0 * (nq * mk + mq * mk + mq * nk) * d  # the three logit matrices
        + iterations * 2.0 * (2 * mq * mk * mq + 2 * mq**3)  # A Z, two mq³ products, Z·(…)
        + 2.0 * (mq * nk + mk * mq + nq * mk) * dv  # B V, A⁺(…), F(…)
    )
    if options["pinv"] == "exact":
        per_head += 20.0 * mq * mk * min(mq, mk)  # SVD-based pinv, rough constant
    if options["conv_kernel_size"] is not None:
        per_head += 2.0 * nq * dv * options["conv_kernel_size"]
    kernel_elems = b * h * (nq * mk + mq * mk + mq * nk)
    return Cost(
        flops=b * h * per_head,
        exps=float(kernel_elems),
        bytes_moved=shape.io_bytes + 4.0 * 2 * kernel_elems,
        peak_memory=4.0 * (kernel_elems + 3 * b * h * mq * mq + b * h * (mq + mk) * d),
    )


register(MethodSpec(
    name="nystromformer",
    family="nystrom",
    summary="Nyström approximation of softmax attention with segment-mean landmarks and an iterative "
            "pseudo-inverse",
    reference="Xiong et al., Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention, AAAI 2021",
    supports_causal=False,
    options=(
        int_option("landmarks", 64, "number of landmarks m (segment means of q and of k); clamped to the "
                   "sequence length (m >= N is exact with pinv='exact')"),
        choice_option("pinv", "iterative", "'iterative': the paper's hyper-power iteration; 'exact': "
                      "torch.linalg.pinv (SVD)", PINV_MODES),
        int_option("pinv_iterations", 6, "iterations of the pseudo-inverse (pinv='iterative')"),
        int_option("conv_kernel_size", None, "length of the depthwise conv skip on v along the sequence "
                   "(None: no skip; LRA setting 35); needs num_heads", allow_none=True),
        int_option("num_heads", None, "query heads (for the per-head conv skip weights)", allow_none=True),
        seed_option(),
    ),
    exact_limit=ExactLimit(
        parent="softmax",
        description="landmarks = N (one token per segment) with pinv='exact': A A⁺ A = A",
        options=lambda n: {"landmarks": n, "pinv": "exact"},
    ),
    cost_formula=nystromformer_cost,
    cost_doc="per head, mq = min(m, Nq), mk = min(m, Nk): flops = 2·(Nq·mk + mq·mk + mq·Nk)·d (logits) "
             "+ iterations·(4·mq²·mk + 4·mq³) (pseudo-inverse) + 2·(mq·Nk + mk·mq + Nq·mk)·dv "
             "[+ 2·Nq·dv·k conv]; exps = Nq·mk + mq·mk + mq·Nk; bytes = q,k,v,o + fp32 N×m kernels "
             "written and read; peak = the three kernels + m×m iteration temporaries",
    module_class=NystromformerAttention,
    example_options=lambda n: {"landmarks": max(1, n // 4)},
))


# ----------------------------------------------------------------------------- low-rank oracle


class LowRankOracleAttention(AttentionModule):
    """``A_r V`` where ``A_r`` is the (randomized) best rank-r approximation of the exact attention matrix.

    ``A = softmax(scale·q kᵀ)`` over valid keys is formed explicitly (quadratic time and
    memory, on purpose) and truncated by :func:`approxattn.linalg.randomized_svd` with a
    Gaussian test matrix drawn from the ``seed`` (the same on every call). Gradients treat the
    randomized range basis Q as fixed: they are exact when ``rank + oversample >= min(Nq, Nk)``
    (Q then spans everything), and otherwise the gradient of ``Q·T_r(QᵀA)`` at that Q. By
    Eckart–Young, no rank-r factorisation ``out = L Rᵀ V`` (Linformer, Nyström, random
    features with r features...) can have a smaller spectral or Frobenius error on A than
    A_r. With ``rank >= min(Nq, Nk)`` A_r = A and the exact softmax output is returned.
    Non-causal: A_r is not lower-triangular.
    """

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        # in the state_dict, so that a restored module draws the same test matrix
        self.register_buffer("test_matrix_seed", torch.tensor(options["seed"], dtype=torch.long))

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        v = masked_rows(v, key_padding_mask)
        rank = self.options["rank"]
        if rank >= min(shape.seq_q, shape.seq_k):
            return softmax_attention(q, masked_rows(k, key_padding_mask), v, key_valid=key_padding_mask, scale=scale)
        matrix = softmax_attention_matrix(q, k, key_valid=key_padding_mask, scale=scale)
        generator = torch.Generator().manual_seed(int(self.test_matrix_seed))
        u, s, vh = randomized_svd(
            matrix, rank, oversample=self.options["oversample"],
            power_iterations=self.options["power_iterations"], generator=generator, differentiate_basis=False,
        )
        return u @ (s.unsqueeze(-1) * (vh @ v))


def lowrank_oracle_cost(shape: Shape, options: dict) -> Cost:
    b, h, nq, nk, d, dv = shape.batch, shape.heads, shape.seq_q, shape.seq_k, shape.head_dim, shape.value_dim
    pairs = b * h * nq * nk
    r = min(options["rank"], nq, nk)
    if r >= min(nq, nk):
        return Cost(flops=2.0 * pairs * (d + dv), exps=float(pairs), bytes_moved=shape.io_bytes,
                    peak_memory=4.0 * b * h * nq)
    width = min(r + options["oversample"], nq, nk)
    passes = 2 * options["power_iterations"] + 2  # A Ω, the power iterations, Qᵀ A
    qr_and_svd = b * h * (2 * options["power_iterations"] + 1) * 4.0 * (nq + nk) * width**2 + b * h * 4.0 * nk * width**2
    flops = 2.0 * pairs * d + passes * 2.0 * pairs * width + qr_and_svd + 2.0 * b * h * (nk + nq) * r * dv
    return Cost(
        flops=flops,
        exps=float(pairs),
        bytes_moved=shape.io_bytes + 4.0 * pairs * (1 + passes),
        peak_memory=4.0 * (pairs + b * h * (nq + nk) * width),
    )


register(MethodSpec(
    name="lowrank-oracle",
    family="low-rank",
    summary="best rank-r approximation of the exact softmax attention matrix by randomized SVD; quadratic "
            "on purpose: the yardstick for any rank-r method",
    reference="Halko, Martinsson & Tropp, Finding Structure with Randomness, SIAM Review 2011 (Eckart–Young)",
    supports_causal=False,
    options=(
        int_option("rank", 64, "rank r of the approximation (>= min(Nq, Nk): exact attention)"),
        int_option("oversample", 10, "extra random directions of the range finder", minimum=0),
        int_option("power_iterations", 2, "power (subspace) iterations of the range finder", minimum=0),
        seed_option(),
    ),
    exact_limit=ExactLimit(
        parent="softmax",
        description="rank >= min(Nq, Nk): the best rank-r approximation is A itself",
        options=lambda n: {"rank": n},
    ),
    cost_formula=lowrank_oracle_cost,
    cost_doc="QUADRATIC on purpose: flops = 2·B·H·Nq·Nk·d (logits) + (2p+2)·2·B·H·Nq·Nk·l (passes over A, "
             "l = r + oversample, p power iterations) + QR/SVD O((Nq+Nk)·l²) + 2·B·H·(Nq+Nk)·r·dv; "
             "exps = B·H·Nq·Nk; bytes = q,k,v,o + fp32 N×N matrix written and read per pass; peak = N×N",
    module_class=LowRankOracleAttention,
    example_options=lambda n: {"rank": max(1, n // 4)},
))
