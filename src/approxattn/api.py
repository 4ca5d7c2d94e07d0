"""The functional API: ``attention``, ``build`` and the registry lookup."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .module import AttentionModule
from .registry import get_method
from .validation import check_inputs

_FUNCTIONAL_CACHE: OrderedDict[tuple, AttentionModule] = OrderedDict()
_FUNCTIONAL_CACHE_SIZE = 32


def build(method: str, *, head_dim: int, **options: Any) -> AttentionModule:
    """A fresh :class:`AttentionModule` for ``method`` and heads of size ``head_dim``.

    Options are checked against the method's registry entry (unknown names and bad values
    raise ``ValueError``/``TypeError``) and merged over its defaults.
    """
    spec = get_method(method)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim: expected a positive int, got {type(head_dim).__name__}")
    if head_dim <= 0:
        raise ValueError(f"head_dim: expected a positive int, got {head_dim}")
    return spec.module_class(head_dim=head_dim, **spec.resolve_options(options))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    /,
    method: str = "softmax",
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    **options: Any,
) -> torch.Tensor:
    """Attention by ``method``, shaped like ``scaled_dot_product_attention``.

    q ``(B, Hq, Nq, d)``, k ``(B, Hkv, Nk, d)``, v ``(B, Hkv, Nk, dv)`` with Hq a multiple of
    Hkv; key_padding_mask ``(B, Nk)`` bool, True = keep → ``(B, Hq, Nq, dv)``.
    q, k, v are positional-only, so a method option may be called ``k`` (SEA's top-k budget).

    The functional form uses a module in eval mode (random features never redrawn) built
    from ``options`` and the method's ``seed`` (default 0), so the same call gives the same
    answer; modules are cached per (method, head_dim, options, device). Options that depend
    on the input (e.g. Linformer's ``max_len``) default to what the inputs need. Parameters
    of such modules (e.g. Linformer's E, F) are fixed: use :func:`build` to train them.
    """
    spec = get_method(method)
    shape, scale_value = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    module = _functional_module(spec, shape, q.device, options)
    # inputs are checked once, here; the module runs only its method-specific checks
    return module.forward_checked(q, k, v, shape, scale_value, causal=causal,
                                  key_padding_mask=key_padding_mask, scale_given=scale is not None)


def attention_matrices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    /,
    method: str = "softmax",
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """The dense ``(B, Hq, Nq, Nk)`` matrices behind :func:`attention` for these inputs (same
    module, same options): ``"attention"`` is A with ``attention(q, k, v, ...) = A @ v``; some
    methods add views (SEA: ``"sparse"``, ``"estimated"``). Quadratic in N: for inspection."""
    spec = get_method(method)
    shape, _ = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    module = _functional_module(spec, shape, q.device, options)
    return module.attention_matrices(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def _functional_module(spec, shape, device: torch.device, options: dict[str, Any]) -> AttentionModule:
    """The cached eval-mode module of the functional form for (method, head_dim, options, device)."""
    if spec.infer_options is not None:
        options = spec.infer_options(shape.seq_q, shape.seq_k) | options
    resolved = spec.resolve_options(options)
    key = (spec.name, shape.head_dim, tuple(sorted(resolved.items())), str(device))
    module = _FUNCTIONAL_CACHE.get(key)
    if module is None:
        module = spec.module_class(head_dim=shape.head_dim, **resolved).to(device).eval().requires_grad_(False)
        _FUNCTIONAL_CACHE[key] = module
        if len(_FUNCTIONAL_CACHE) > _FUNCTIONAL_CACHE_SIZE:
            _FUNCTIONAL_CACHE.popitem(last=False)
    else:
        _FUNCTIONAL_CACHE.move_to_end(key)
    return module
