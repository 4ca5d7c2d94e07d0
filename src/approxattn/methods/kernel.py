"""Kernel (random-feature) attention: Performer FAVOR+ and elu+1 linear attention.

Both re-associate ``softmax(qkᵀ)v ≈ φ(q)(φ(k)ᵀv) / φ(q)(φ(k)ᵀ1)`` so cost is linear in N.
"""

from __future__ import annotations

from typing import Any

import torch

from ..blocks.feature_maps import (
    causal_key_offsets,
    elu_features,
    favor_key_features,
    favor_log_features,
    favor_query_features,
    favor_ratio,
    relu_features,
    zero_padded,
)
from ..blocks.kernel_attention import causal_kernel_attention, noncausal_kernel_attention
from ..blocks.random_matrices import gaussian_iid_matrix, gaussian_orthogonal_matrix
from ..module import AttentionModule, RandomFeatureModule
from ..registry import (
    Cost,
    ExactLimit,
    MethodSpec,
    Shape,
    bool_option,
    choice_option,
    float_option,
    int_option,
    redraw_option,
    register,
    seed_option,
)
from ..validation import AttentionShape, compute_dtype

PERFORMER_KERNELS = ("softmax", "softmax-hyperbolic", "relu")
DEFAULT_EPS = {"softmax": 1e-6, "softmax-hyperbolic": 1e-6, "relu": 1e-3}


def _key_valid(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if key_padding_mask is None else key_padding_mask[:, None, :]


class PerformerAttention(RandomFeatureModule):
    """FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

    Kernels: ``"softmax"`` SM⁺ features ``exp(ωᵀx − ‖x‖²/2)/√m`` (unbiased for exp(xᵀy)),
    ``"softmax-hyperbolic"`` the ±ω variant with 2m features, and ``"relu"`` generalized
    attention ``relu(ωᵀx) + ε`` (a different kernel, not a softmax estimate).
    Stabilisers (softmax kernels): a per-row max for queries; for keys one max over all
    valid keys of a (batch, head) when non-causal, and a running prefix max (no look-ahead)
    when causal. Exponentials and sums run in fp32 for bf16/fp16 inputs. Causal attention
    uses chunked prefix sums (``chunk_size`` tokens per chunk).
    """

    native_gqa = True

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        self.register_buffer("projection", torch.empty(options["num_features"], head_dim))
        self.draw_features(self.generator(0))

    @property
    def eps(self) -> float:
        eps = self.options["eps"]
        return DEFAULT_EPS[self.options["kernel"]] if eps is None else eps

    def draw_features(self, generator: torch.Generator) -> None:
        draw = gaussian_orthogonal_matrix if self.options["orthogonal"] else gaussian_iid_matrix
        self.projection.copy_(draw(self.options["num_features"], self.head_dim, generator))

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        from ..kernels.dispatch import fast_kernel_attention  # fused Triton path on CUDA, else None

        fast = fast_kernel_attention(self, q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        if fast is not None:
            return fast
        dtype = compute_dtype(q.dtype)
        root_scale = scale**0.5  # split the temperature so that xᵀy = scale·qᵀk
        x, y, v = q.to(dtype) * root_scale, k.to(dtype) * root_scale, v.to(dtype)
        projection = self.projection.to(dtype)
        kernel, eps, stabilize = self.options["kernel"], self.eps, self.options["stabilize"]
        key_valid = _key_valid(key_padding_mask)
        chunk = self.options["chunk_size"]
        if kernel == "relu":
            query_features = relu_features(x, projection, eps=eps)
            key_features = zero_padded(relu_features(y, projection, eps=eps), key_valid)
            out = _kernel_attention(query_features, key_features, v, shape, causal, chunk, key_valid)
            return out
        hyperbolic = kernel == "softmax-hyperbolic"
        ratio = favor_ratio(self.options["num_features"], hyperbolic=hyperbolic)
        query_features = favor_query_features(
            favor_log_features(x, projection, hyperbolic=hyperbolic), ratio=ratio, eps=eps, stabilize=stabilize
        )
        key_logs = favor_log_features(y, projection, hyperbolic=hyperbolic)
        if causal and stabilize:
            offsets = causal_key_offsets(key_logs, key_valid)
            key_features = ratio * torch.exp((key_logs - offsets.unsqueeze(-1)).clamp(max=0.0))
            out = causal_kernel_attention(
                shape.group_queries(query_features), key_features, v, chunk_size=chunk,
                key_offsets=offsets, eps_feature=ratio * eps, key_valid=key_valid,
            )
            return shape.ungroup_queries(out)
        key_features = favor_key_features(key_logs, key_valid, ratio=ratio, eps=eps, stabilize=stabilize)
        return _kernel_attention(query_features, key_features, v, shape, causal, chunk, key_valid)


def _kernel_attention(query_features, key_features, v, shape, causal, chunk, key_valid, den_eps=0.0):
    grouped = shape.group_queries(query_features)
    if causal:
        out = causal_kernel_attention(grouped, key_features, v, chunk_size=chunk, key_valid=key_valid, den_eps=den_eps)
    else:
        v = zero_padded(v, key_valid)
        out = noncausal_kernel_attention(grouped, key_features, v, den_eps=den_eps)
    return shape.ungroup_queries(out)


class LinearAttention(AttentionModule):
    """Linear attention with φ(x) = elu(x) + 1 (Katharopoulos et al. 2020), causal or not.

    The feature map is scale-free (no softmax temperature). ``den_eps`` is added to the
    denominator as in the paper's code.
    """

    native_gqa = True

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        from ..kernels.dispatch import fast_kernel_attention  # fused Triton path on CUDA, else None

        fast = fast_kernel_attention(self, q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        if fast is not None:
            return fast
        dtype = compute_dtype(q.dtype)
        key_valid = _key_valid(key_padding_mask)
        query_features = elu_features(q.to(dtype))
        key_features = zero_padded(elu_features(k.to(dtype)), key_valid)
        return _kernel_attention(
            query_features, key_features, v.to(dtype), shape, causal, self.options["chunk_size"], key_valid,
            den_eps=self.options["den_eps"],
        )


# ----------------------------------------------------------------------------- costs


def kernel_attention_cost(shape: Shape, features: int, projection_flops: float, exps: float, chunk: int) -> Cost:
    """Cost of φ(q)(φ(k)ᵀv) given the feature width and the cost of computing the features."""
    b, h, hk = shape.batch, shape.heads, shape.kv_heads
    dv = shape.value_dim
    flops = projection_flops
    flops += 2.0 * b * hk * shape.seq_k * features * (dv + 1)  # φ(k)ᵀ[v, 1]
    flops += 2.0 * b * h * shape.seq_q * features * (dv + 1)  # φ(q)·[S, z]
    if shape.causal:
        flops += 2.0 * b * h * shape.seq_q * min(chunk, shape.seq_k) * (features + dv)  # intra-chunk blocks
    feature_elems = b * (h * shape.seq_q + hk * shape.seq_k) * features
    state_elems = b * hk * features * (dv + 1)
    return Cost(
        flops=flops,
        exps=exps,
        bytes_moved=shape.io_bytes + 4.0 * 2 * feature_elems,  # reference path writes and reads fp32 features
        peak_memory=4.0 * (feature_elems + state_elems),
    )


def performer_cost(shape: Shape, options: dict) -> Cost:
    m = options["num_features"]
    width = 2 * m if options["kernel"] == "softmax-hyperbolic" else m
    rows = shape.batch * (shape.heads * shape.seq_q + shape.kv_heads * shape.seq_k)
    projection_flops = 2.0 * rows * shape.head_dim * m
    exps = 0.0 if options["kernel"] == "relu" else float(rows * width)
    return kernel_attention_cost(shape, width, projection_flops, exps, options["chunk_size"])


def linear_cost(shape: Shape, options: dict) -> Cost:
    rows = shape.batch * (shape.heads * shape.seq_q + shape.kv_heads * shape.seq_k)
    return kernel_attention_cost(shape, shape.head_dim, 0.0, float(rows * shape.head_dim), options["chunk_size"])


KERNEL_COST_DOC = (
    "with feature width m' (m, 2m hyperbolic, d for elu+1): flops = 2·(B·H·Nq + B·Hkv·Nk)·d·m "
    "(projection) + 2·B·Hkv·Nk·m'·(dv+1) + 2·B·H·Nq·m'·(dv+1) [+ causal 2·B·H·Nq·C·(m'+dv)]; "
    "exps = (B·H·Nq + B·Hkv·Nk)·m'; bytes = q,k,v,o + fp32 features written and read once; "
    "peak = fp32 features + m'×(dv+1) state"
)


def performer_options() -> tuple:
    return (
        int_option("num_features", 256, "number of random features m (lucidrains default: d·ln d)"),
        choice_option("kernel", "softmax", "feature map: positive softmax (SM⁺), hyperbolic (SM^hyp+) or ReLU",
                      PERFORMER_KERNELS),
        bool_option("orthogonal", True, "orthogonal random features (False: i.i.d. Gaussian)"),
        float_option("eps", None, "ε added to every feature after stabilisation (None: 1e-6 softmax, 1e-3 relu)",
                     allow_none=True),
        bool_option("stabilize", True, "subtract the max before exponentiating (cancels exactly)"),
        redraw_option(1000),
        seed_option(),
        int_option("chunk_size", 64, "tokens per chunk of the causal prefix-sum scan"),
    )


register(MethodSpec(
    name="performer",
    family="kernel",
    summary="FAVOR+: positive orthogonal random features for the softmax kernel (or ReLU kernel)",
    reference="Choromanski et al., Rethinking Attention with Performers, ICLR 2021",
    supports_causal=True,
    options=performer_options(),
    exact_limit=ExactLimit(
        parent="softmax",
        description="num_features → ∞ (unbiased kernel estimate, error ∝ m^-1/2); kernel='relu' is a "
                    "different kernel with no softmax limit",
    ),
    cost_formula=performer_cost,
    cost_doc=KERNEL_COST_DOC,
    module_class=PerformerAttention,
    example_options=lambda n: {"num_features": 16, "chunk_size": 4},
))

register(MethodSpec(
    name="linear",
    family="kernel",
    summary="linear attention with the elu(x)+1 feature map",
    reference="Katharopoulos et al., Transformers are RNNs, ICML 2020",
    supports_causal=True,
    options=(
        float_option("den_eps", 1e-6, "added to the denominator"),
        int_option("chunk_size", 64, "tokens per chunk of the causal prefix-sum scan"),
    ),
    exact_limit=ExactLimit(
        parent="linear",
        description="not a softmax approximation: exact attention with the kernel (elu(q)+1)ᵀ(elu(k)+1)",
    ),
    cost_formula=linear_cost,
    cost_doc=KERNEL_COST_DOC,
    module_class=LinearAttention,
    uses_scale=False,
    example_options=lambda n: {"chunk_size": 4},
))
