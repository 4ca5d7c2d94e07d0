"""FLuRKA: low-rank sequence downsampling fused with a kernel feature map.

``out = φ(q)(φ(E k)ᵀ(F v)) / φ(q)(φ(E k)ᵀ1)``: Linformer's projections reduce keys and
values to r rows, then a kernel method attends from all N queries to those r keys,
re-associated so that nothing of size N×r or N×N is formed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..module import AttentionModule
from ..registry import ExactLimit, MethodSpec, Shape, Cost, get_method, register
from ..validation import AttentionShape, check_inputs, compute_dtype
from .kernel import performer_options
from .lowrank import add_costs, build_projection, infer_max_len, projection_cost, projection_options


class FlurkaAttention(AttentionModule):
    """FLuRKA (Gupta et al. 2023): Linformer downsampling, then kernel attention on the r keys.

    Subclasses fix the kernel: ``kernel_method`` names the registered kernel method and
    ``kernel_fixed`` the options it always gets. Reductions: rank = N with E = F = I is
    exactly the kernel method; an exact exponential kernel is exactly Linformer with the
    same E, F. Non-causal only (E mixes future tokens).
    """

    native_gqa = True
    kernel_method: ClassVar[str]
    kernel_fixed: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        self.projection = build_projection(options, torch.Generator().manual_seed(options["seed"]))
        inner = get_method(self.kernel_method)
        inner_options = {name: options[name] for name in inner.defaults if name in options} | self.kernel_fixed
        self.kernel = inner.module_class(head_dim=head_dim, **inner.resolve_options(inner_options))

    def attend(self, q, k, v, *, causal, key_padding_mask, scale, shape: AttentionShape) -> torch.Tensor:
        from ..kernels.dispatch import kernels_enabled

        # on the fused path the r-row reduction stays in the input dtype (fp32 accumulation) and
        # the kernel module below takes its Triton path; elsewhere everything runs in fp32
        dtype = q.dtype if kernels_enabled(q) else compute_dtype(q.dtype)
        q = q.to(dtype)
        k_reduced, v_reduced, reduced_valid = self.projection(k.to(dtype), v.to(dtype), key_padding_mask)
        # A sample whose valid keys all meet zero columns of E keeps no projected key: it then keeps them all
        # (zero rows, so its output is 0) instead of failing. The kernel module's own check_inputs would test the
        # mask on the host, a GPU sync in the middle of every call, so the inputs (already checked by this
        # module's forward) go straight to forward_checked.
        reduced_valid = reduced_valid | ~reduced_valid.any(dim=1, keepdim=True)
        inner_scale = scale if self.kernel.spec.uses_scale else None
        inner_shape, inner_scale_value = check_inputs(q, k_reduced, v_reduced, causal=causal, scale=inner_scale)
        return self.kernel.forward_checked(q, k_reduced, v_reduced, inner_shape, inner_scale_value, causal=causal,
                                           key_padding_mask=reduced_valid, scale_given=inner_scale is not None)


class FlurkaPerformer(FlurkaAttention):
    kernel_method = "performer"
    kernel_fixed = {"kernel": "softmax"}


class FlurkaRelu(FlurkaAttention):
    kernel_method = "performer"
    kernel_fixed = {"kernel": "relu"}


class FlurkaLinear(FlurkaAttention):
    kernel_method = "linear"


def flurka_cost(kernel_method: str, kernel_fixed: dict) -> Any:
    def cost(shape: Shape, options: dict) -> Cost:
        rank = min(options["rank"], shape.seq_k)
        inner = get_method(kernel_method)
        inner_options = {n: options[n] for n in inner.defaults if n in options} | kernel_fixed
        reduced = Shape(shape.batch, shape.heads, shape.seq_q, rank, shape.head_dim, shape.kv_heads,
                        shape.value_dim, False, shape.element_size)
        return add_costs(projection_cost(shape, rank), inner.cost_formula(reduced, inner.defaults | inner_options))

    return cost


def _performer_options_without(*names: str) -> tuple:
    return tuple(o for o in performer_options() if o.name not in names)


def _with_default(options: tuple, name: str, default: Any) -> tuple:
    return tuple(
        type(o)(o.name, default, o.doc, o.expected, o.type_ok, o.check) if o.name == name else o for o in options
    )


FLURKA_COST_DOC = ("projection 2·B·Hkv·r·Nk·(d+dv) flops, plus the kernel method's formula with Nk = r "
                   "(its exps, bytes and peak memory with r keys)")

# the projection options already carry the seed; the kernel option and causal chunking are fixed
_RANDOM_FEATURE_OPTIONS = _with_default(_performer_options_without("kernel", "chunk_size", "seed"), "num_features", 64)

# name, class, feature map, kernel options, parent method, example options for n tokens
_VARIANTS = (
    ("flurka-performer", FlurkaPerformer, "FAVOR+ positive random features", _RANDOM_FEATURE_OPTIONS, "performer",
     lambda n: {"rank": max(1, n // 4), "num_features": 16}),
    ("flurka-relu", FlurkaRelu, "ReLU random features", _RANDOM_FEATURE_OPTIONS, "performer",
     lambda n: {"rank": max(1, n // 4), "num_features": 16}),
    ("flurka-linear", FlurkaLinear, "the elu+1 feature map",
     tuple(o for o in get_method("linear").options if o.name != "chunk_size"), "linear",
     lambda n: {"rank": max(1, n // 4)}),
)

for _name, _cls, _features, _kernel_options, _parent, _example in _VARIANTS:
    register(MethodSpec(
        name=_name,
        family="hybrid",
        summary=f"FLuRKA: Linformer downsampling of k, v to r rows, then kernel attention with {_features}",
        reference="Gupta et al., FLuRKA: Fast and accurate unified Low-Rank & Kernel Attention, 2023",
        supports_causal=False,
        options=projection_options(128) + _kernel_options,
        exact_limit=ExactLimit(
            parent=_parent,
            description=f"rank = max_len = N with E = F = I (init='mean-pool') is exactly {_parent!r} with the "
                        "same kernel options and seed; an exact exponential kernel gives Linformer",
            options=lambda n: {"rank": n, "max_len": n, "init": "mean-pool"},
            parent_options=dict(_cls.kernel_fixed),
        ),
        cost_formula=flurka_cost(_cls.kernel_method, _cls.kernel_fixed),
        cost_doc=FLURKA_COST_DOC,
        module_class=_cls,
        infer_options=infer_max_len,
        uses_scale=get_method(_parent).uses_scale,
        example_options=_example,
    ))
