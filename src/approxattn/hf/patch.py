"""Any registered approxattn method inside a Hugging Face model, without touching the model's code.

Refactored transformers models (Llama-family decoders such as SmolLM2, BERT encoders such as
MiniLM, ...) call their attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with ``(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``, where
query is ``(B, Hq, Nq, d)`` after rotary embeddings and key/value are ``(B, Hkv, Nk, d)``, *not*
repeated for grouped-query attention. :func:`patch_model` registers one function under the name
``"approxattn"`` with transformers' ``AttentionInterface`` (and the boolean SDPA mask builder with
``AttentionMaskInterface``, so the function receives a ``(B, 1, Nq, Nk)`` bool mask or None),
switches the model to it, and attaches one approxattn module per attention module as the
submodule ``approxattn``: its parameters and buffers are trained and saved with the model.

The function:

* reads causality from the call's ``is_causal`` or the module's ``is_causal`` attribute;
* turns the HF mask into our ``key_padding_mask`` ``(B, Nk)`` bool (True = keep) and checks that
  the mask is exactly "causal (or full) and key padding", raising ``ValueError`` for any other
  pattern (sliding windows, packed sequences, custom masks) rather than silently ignoring it;
* passes the model's ``scaling`` as ``scale`` (methods without a temperature get None);
* passes k, v unrepeated (approxattn modules handle GQA themselves);
* on an attention module with no attached method computes exact softmax attention explicitly
  in fp32 — the *capture* path used to record a teacher's attention (:func:`capture`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..api import build
from ..blocks.exact import softmax_attention_matrix
from ..registry import causal_methods, get_method

IMPLEMENTATION = "approxattn"
ATTACHED = "approxattn"  # name of the attached approxattn module on each HF attention module
_RECORDER = "_approxattn_recorder"
_INDEX = "_approxattn_layer"
_PREVIOUS = "_approxattn_previous_implementation"
_METHOD = "_approxattn_method"
_DECODING = "_approxattn_decoding"  # {"state": decoding state or None, "why": reason it is None}


# ----------------------------------------------------------------------------- discovery


def _is_attention_module(module: nn.Module) -> bool:
    # every refactored HF attention module that calls the attention interface carries its
    # temperature (``scaling``), its causality (``is_causal``) and its model's ``config``
    return (
        hasattr(module, "scaling")
        and hasattr(module, "is_causal")
        and hasattr(module, "config")
        and any(True for _ in module.children())
    )


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's attention modules that call transformers' attention interface, in layer order,
    as ``(qualified name, module)``."""
    found = [(name, module) for name, module in model.named_modules() if _is_attention_module(module)]
    # a module nested inside another match (none in current models) would be called twice
    names = [name for name, _ in found]
    return [(name, module) for name, module in found
            if not any(name != other and name.startswith(other + ".") for other in names)]


def head_dim_of(module: nn.Module) -> int:
    """Head size of an HF attention module (``head_dim`` or ``attention_head_size`` or config)."""
    for attr in ("head_dim", "attention_head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    config = module.config
    value = getattr(config, "head_dim", None)
    if isinstance(value, int):
        return value
    return config.hidden_size // config.num_attention_heads


def is_causal_model(model: nn.Module) -> bool:
    """True when the model's attention modules are causal (decoders), False for encoders."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"model: found no attention module that uses transformers' attention interface in "
                         f"{type(model).__name__}")
    return any(bool(module.is_causal) for _, module in modules)


def patched_method(model: nn.Module) -> str | None:
    """The approxattn method the model is patched with, or None."""
    return getattr(model, _METHOD, None)


def attached_modules(model: nn.Module) -> list[nn.Module]:
    """The approxattn modules attached by :func:`patch_model`, in layer order."""
    return [getattr(module, ATTACHED) for _, module in attention_modules(model) if hasattr(module, ATTACHED)]


# ----------------------------------------------------------------------------- masks


@dataclass
class _MaskCache:
    mask: torch.Tensor | None = None
    version: int = -1
    causal: bool = False
    result: torch.Tensor | None = None


_mask_cache = _MaskCache()
# unpadded_mask's masks by (batch, seq, causal, device); a few at most, each holds seq² bytes
_UNPADDED_MASKS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_UNPADDED_MASKS_KEPT = 4


def unpadded_mask(batch: int, seq: int, *, causal: bool, device: torch.device | str) -> torch.Tensor:
    """A ``(batch, 1, seq, seq)`` bool mask of unpadded self-attention (the causal lower triangle, or all
    True), which approxattn's attention function recognises by identity without reading it.

    Give it to a model as ``attention_mask``: transformers passes a 4-D mask through as it is, where it
    would check a 2-D or missing one with host syncs (padding and packed-sequence checks) that a CUDA
    graph cannot capture. The same call returns the same tensor (a view of one ``seq × seq`` matrix)."""
    key = (batch, seq, causal, torch.device(device))
    mask = _UNPADDED_MASKS.get(key)
    if mask is None or mask._version != 0:
        square = torch.ones(seq, seq, dtype=torch.bool, device=device)
        mask = (square.tril() if causal else square).expand(batch, 1, seq, seq)
        _UNPADDED_MASKS[key] = mask
        while len(_UNPADDED_MASKS) > _UNPADDED_MASKS_KEPT:
            _UNPADDED_MASKS.popitem(last=False)
    _UNPADDED_MASKS.move_to_end(key)
    return mask


def _is_unpadded_mask(mask: torch.Tensor, *, batch: int, seq_q: int, seq_k: int, causal: bool) -> bool:
    """Whether ``mask`` is unpadded_mask's for this call (unchanged since: an in-place write bumps its version)."""
    kept = _UNPADDED_MASKS.get((batch, seq_k, causal, mask.device))
    return kept is mask and seq_q == seq_k and mask._version == 0


def key_padding_mask_from_hf(
    attention_mask: torch.Tensor | None, *, batch: int, seq_q: int, seq_k: int, causal: bool
) -> torch.Tensor | None:
    """Our ``(B, Nk)`` bool key padding mask (True = keep, None = no padding) from the mask a
    transformers model passes to its attention function.

    Accepts None, a ``(B, Nk)`` padding mask, or a 4-D ``(B, 1 | H, Nq, Nk)`` mask, boolean (True =
    attend) or additive float (0 = attend, very negative = masked). A 4-D mask must equal
    ``(causal lower triangle, if causal) & key padding`` on every query row that sees a key;
    anything else raises ``ValueError``.
    """
    if attention_mask is None or _is_unpadded_mask(attention_mask, batch=batch, seq_q=seq_q, seq_k=seq_k,
                                                   causal=causal):
        return None
    cache = _mask_cache
    if cache.mask is attention_mask and cache.version == attention_mask._version and cache.causal == causal:
        return cache.result  # every layer of one forward pass gets the same mask object
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    elif attention_mask.is_floating_point():
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        allowed = attention_mask != 0
    if allowed.dim() == 2:
        if tuple(allowed.shape) != (batch, seq_k):
            raise ValueError(f"attention_mask: expected a (batch, seq_k) = ({batch}, {seq_k}) padding mask, "
                             f"got shape {tuple(allowed.shape)}")
        keep = allowed
    elif allowed.dim() == 4:
        if allowed.shape[0] != batch or tuple(allowed.shape[2:]) != (seq_q, seq_k):
            raise ValueError(f"attention_mask: expected shape ({batch}, 1 or heads, {seq_q}, {seq_k}), "
                             f"got {tuple(allowed.shape)}")
        if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
            raise ValueError("attention_mask: approxattn needs the same mask for every head; this one differs per head")
        allowed = allowed[:, 0]
        keep = allowed.any(dim=1)  # a key is valid when some query may attend to it
        expected = keep[:, None, :].expand(batch, seq_q, seq_k)
        if causal:
            # queries are the last seq_q positions of the seq_k keys (a KV cache may precede them)
            rows = torch.arange(seq_k - seq_q, seq_k, device=allowed.device)[:, None]
            expected = expected & (torch.arange(seq_k, device=allowed.device)[None, :] <= rows)
        live_rows = expected.any(dim=-1, keepdim=True)  # padded queries' rows may hold anything
        if not bool(((allowed == expected) | ~live_rows).all()):
            raise ValueError(
                "attention_mask: approxattn supports plain "
                + ("causal" if causal else "bidirectional")
                + " attention with key padding only; this mask has another pattern (sliding window, packed "
                "sequences, chunked or custom attention?)"
            )
    else:
        raise ValueError(f"attention_mask: expected a 2-D or 4-D mask, got {allowed.dim()}-D")
    result = None if bool(keep.all()) else keep.contiguous()
    cache.mask, cache.version, cache.causal, cache.result = attention_mask, attention_mask._version, causal, result
    return result


# ----------------------------------------------------------------------------- recording


@dataclass
class LayerRecord:
    """What one attention call saw and produced (tensors keep their autograd graph).

    q ``(B, Hq, Nq, d)``, k ``(B, Hkv, Nk, d)``; context ``(B, Hq, Nq, dv)`` is the attention
    output before the model's output projection; key_padding_mask ``(B, Nk)`` or None.
    probabilities ``(B, Hq, Nq, Nk)`` fp32: only on the exact capture path (no attached method).
    details: the attached method's ``forward_with_details`` result, when it has one.
    """

    layer: int
    name: str
    q: torch.Tensor
    k: torch.Tensor
    context: torch.Tensor
    scale: float
    causal: bool
    key_padding_mask: torch.Tensor | None
    probabilities: torch.Tensor | None = None
    details: Any = None


def exact_attention_with_probabilities(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
    key_padding_mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention computed explicitly in fp32: (context ``(B, Hq, Nq, dv)`` fp32,
    probabilities ``(B, Hq, Nq, Nk)`` fp32). Rows with no key give zeros."""
    probabilities = softmax_attention_matrix(q.float(), k.float(), causal=causal, key_valid=key_padding_mask,
                                             scale=scale)
    groups = q.shape[1] // k.shape[1]
    context = probabilities @ v.float().repeat_interleave(groups, dim=1)
    return context, probabilities


def _autocast_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast, q, k, v in the autocast dtype when their dtypes differ.

    transformers' rotary embedding multiplies the projections (autocast: bf16) by fp32 cos/sin, so
    q and k arrive in fp32 beside a bf16 v; SDPA and HF's eager attention would compute in the
    autocast dtype, and so do the methods. Outside autocast, mixed dtypes stay an error."""
    device_type = query.device.type
    if query.dtype == key.dtype == value.dtype or not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def approxattn_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered with transformers' ``AttentionInterface`` as ``"approxattn"``.

    query ``(B, Hq, Nq, d)``, key/value ``(B, Hkv, Nk, d)`` → ``((B, Nq, Hq, dv), None)``.
    Attention dropout is not applied (approximate methods have no attention matrix to drop).
    """
    query, key, value = _autocast_inputs(query, key, value)
    batch, _, seq_q, head_dim = query.shape
    seq_k = key.shape[2]
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    key_padding_mask = key_padding_mask_from_hf(attention_mask, batch=batch, seq_q=seq_q, seq_k=seq_k, causal=causal)
    attached = getattr(module, ATTACHED, None)
    scale = float(scaling) if scaling is not None else head_dim ** -0.5
    slot = getattr(module, _DECODING, None)
    if causal and seq_q == 1 and seq_k > 1 and attached is not None and not attached.spec.kv_cache_decoding:
        if slot is None:
            raise NotImplementedError(
                f"approxattn: method {attached.spec.name!r} cannot decode one token over a KV cache exactly (its "
                "causal rows come from a causal estimator that needs every earlier query); generate inside "
                "approxattn.hf.cached_decoding(model), or with use_cache=False, or decode with the module's "
                "decoding_state/decode_step"
            )
        context = _decode_from_state(attached, slot, query, key, value, key_padding_mask, scale)
        return context.to(query.dtype).transpose(1, 2).contiguous(), None
    if causal and seq_q == 1:
        causal = False  # one new token after a KV cache sees every cached key
    if causal and seq_q != seq_k:
        raise NotImplementedError(
            f"approxattn: causal attention of {seq_q} new queries over {seq_k} cached keys (chunked prefill) is "
            "not supported; run the whole sequence at once, or decode one token at a time"
        )
    recorder = getattr(module, _RECORDER, None)
    details = probabilities = None
    if attached is None:
        context, probabilities = exact_attention_with_probabilities(
            query, key, value, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    else:
        method_scale = _method_scale(attached, scale)
        if recorder is not None and hasattr(attached, "forward_with_details"):
            details = attached.forward_with_details(query, key, value, causal=causal,
                                                    key_padding_mask=key_padding_mask, scale=method_scale)
            context = details.output
        else:
            context = attached(query, key, value, causal=causal, key_padding_mask=key_padding_mask,
                               scale=method_scale)
    if slot is not None and causal and seq_q == seq_k and attached is not None:
        _prefill_state(attached, slot, query, key, value, key_padding_mask, scale)
    if recorder is not None:
        recorder.append(LayerRecord(
            layer=getattr(module, _INDEX, len(recorder)), name=type(module).__name__, q=query, k=key,
            context=context, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
            probabilities=probabilities, details=details,
        ))
    return context.to(query.dtype).transpose(1, 2).contiguous(), None


def _method_scale(attached: nn.Module, scale: float) -> float | None:
    return scale if attached.spec.uses_scale else None


def _prefill_state(attached, slot: dict, query, key, value, key_padding_mask, scale: float) -> None:
    """The method's decoding state after a causal prompt (``prefill``: one pass, what ``decode_step``
    over every prompt token would leave; the prompt's output comes from the full forward)."""
    slot["state"] = None
    if key_padding_mask is not None:  # key_padding_mask_from_hf gives None when nothing is padded
        slot["why"] = "the prompt has padding (decoding states assume none); generate one unpadded sequence at a time"
        return
    state = attached.prefill(query, key, value, scale=_method_scale(attached, scale))
    slot["state"], slot["why"] = state, None


def _decode_from_state(attached, slot: dict, query, key, value, key_padding_mask, scale: float) -> torch.Tensor:
    """One token from the method's decoding state (``(B, Hq, 1, dv)``), after checking that the KV
    cache transformers passed is the one the state was built along (beam search reorders the
    cache, which the state cannot follow)."""
    state = slot.get("state")
    name = attached.spec.name
    if state is None:
        raise NotImplementedError(f"approxattn: no {name!r} decoding state for this KV cache: "
                                  f"{slot.get('why') or 'no causal prompt went through the model inside cached_decoding'}")
    past = key.shape[2] - 1
    matches = (state.position == past and state.batch == query.shape[0] and state.dtype == query.dtype
               and key_padding_mask is None
               and torch.equal(state.keys[:, :, :past], key[:, :, :past])
               and torch.equal(state.values[:, :, :past], value[:, :, :past]))
    if not matches:
        slot["state"], slot["why"] = None, "an earlier step found the KV cache changed"
        raise NotImplementedError(
            f"approxattn: the KV cache no longer matches method {name!r}'s decoding state (another sequence, "
            "padding, or a reordered cache as in beam search); cached generation with this method supports greedy "
            "or sampled decoding of unpadded prompts only")
    return attached.decode_step(query, key[:, :, -1:], value[:, :, -1:], state, scale=_method_scale(attached, scale))


@contextlib.contextmanager
def cached_decoding(model: nn.Module) -> Iterator[nn.Module]:
    """Cached generation with methods whose one-token step needs their own decoding state (SEA).

    Inside the block every causal prompt through a patched attention module also builds that
    module's decoding state (``prefill``: what ``decode_step`` over the prompt's tokens would leave),
    and each one-token step over transformers' KV cache is answered by ``decode_step`` from it,
    which equals the last row of the full causal forward. A step whose cache is not the one the
    state was built along (beam search's reordering, padding, another sequence) raises
    ``NotImplementedError`` rather than answering otherwise. Methods that decode from the KV
    cache alone need no block.

    ``with approxattn.hf.cached_decoding(model): model.generate(ids, use_cache=True, ...)``
    """
    _check_model(model)
    def decodes_from_own_state(attached: nn.Module | None) -> bool:
        return attached is not None and not attached.spec.kv_cache_decoding and hasattr(attached, "prefill")

    modules = [module for _, module in attention_modules(model) if decodes_from_own_state(getattr(module, ATTACHED, None))]
    if patched_method(model) is None or not modules:
        raise ValueError("model: expected a model patched (approxattn.hf.patch_model) with a method that decodes from "
                         f"its own decoding state (prefill/decode_step; others decode from the KV cache alone), got "
                         f"{patched_method(model)!r}")
    for module in modules:
        setattr(module, _DECODING, {"state": None, "why": None})
    try:
        yield model
    finally:
        for module in modules:
            if hasattr(module, _DECODING):
                delattr(module, _DECODING)


_registered = False


def register() -> None:
    """Register ``"approxattn"`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:  # pragma: no cover - transformers is an optional dependency
        raise ImportError("approxattn.hf needs transformers >= 4.56 with AttentionInterface "
                          "(pip install -e '.[lab]')") from error
    AttentionInterface.register(IMPLEMENTATION, approxattn_attention)
    # boolean (B, 1, Nq, Nk) masks, or None when plain causal/full attention needs none
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"model: {type(model).__name__} does not route its attention through transformers' AttentionInterface "
            "(_supports_attention_backend is False), so approxattn cannot be plugged in without editing its code"
        )


def _set_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def _index_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"model: found no attention module that uses transformers' attention interface in "
                         f"{type(model).__name__}")
    for index, (_, module) in enumerate(modules):
        setattr(module, _INDEX, index)
    return modules


def patch_model(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Put approxattn ``method`` (built with ``options``) into every attention module of ``model``.

    Returns the same model, switched to the ``"approxattn"`` attention implementation, with one
    fresh ``approxattn.build(method, head_dim=..., **options)`` module attached to each attention
    module as submodule ``approxattn`` (on the model's device; float32). :func:`unpatch` undoes it.
    """
    _check_model(model)
    spec = get_method(method)
    if patched_method(model) is not None:
        raise ValueError(f"model: already patched with {patched_method(model)!r}; call approxattn.hf.unpatch(model) first")
    modules = _index_layers(model)
    causal = any(bool(module.is_causal) for _, module in modules)
    if causal and not spec.supports_causal:
        raise NotImplementedError(
            f"method {spec.name!r} does not support causal attention, which {type(model).__name__} needs; "
            "methods that do: " + ", ".join(causal_methods())
        )
    register()
    built = []
    for _, module in modules:
        device = next(module.parameters()).device
        built.append(build(method, head_dim=head_dim_of(module), **options).to(device))
    for (_, module), attached in zip(modules, built):
        module.add_module(ATTACHED, attached)
    setattr(model, _PREVIOUS, model.config._attn_implementation)
    setattr(model, _METHOD, spec.name)
    _set_implementation(model, IMPLEMENTATION)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the attached approxattn modules and restore the model's previous attention implementation."""
    if patched_method(model) is None:
        raise ValueError("model: not patched by approxattn.hf.patch_model")
    for _, module in attention_modules(model):
        if hasattr(module, ATTACHED):
            delattr(module, ATTACHED)
    _set_implementation(model, getattr(model, _PREVIOUS))
    delattr(model, _PREVIOUS)
    delattr(model, _METHOD)
    return model


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[list[LayerRecord]]:
    """Record every attention call of ``model`` inside the ``with`` block, in call order.

    On a patched model the records hold the method's q, k, output (and ``forward_with_details``
    results where the method has them); on an unpatched model the model runs exact softmax
    attention in fp32 through the approxattn implementation for the duration, and the records
    also hold the attention probabilities — the teacher's side of distillation. The model's
    implementation is restored on exit; the list is cleared before each forward of the block.
    """
    _check_model(model)
    register()
    modules = _index_layers(model)
    records: list[LayerRecord] = []
    previous = model.config._attn_implementation
    switch = previous != IMPLEMENTATION
    if switch:
        _set_implementation(model, IMPLEMENTATION)
    for _, module in modules:
        setattr(module, _RECORDER, records)
    try:
        yield records
    finally:
        for _, module in modules:
            if hasattr(module, _RECORDER):
                delattr(module, _RECORDER)
        if switch:
            _set_implementation(model, previous)


def truncate_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep only the first ``num_layers`` transformer blocks (for quick tests and debugging).

    Finds the ``nn.ModuleList`` whose items each hold one attention module (Llama's
    ``model.layers``, BERT's ``encoder.layer``) and slices it; updates ``config.num_hidden_layers``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
    attention = {id(module) for _, module in attention_modules(model)}
    for _, candidate in model.named_modules():
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0 and all(
            sum(id(m) in attention for m in block.modules()) == 1 for block in candidate
        ):
            if num_layers > len(candidate):
                raise ValueError(f"num_layers: the model has {len(candidate)} layers, got {num_layers}")
            del candidate[num_layers:]
            model.config.num_hidden_layers = num_layers
            for sub in ("layer_types",):  # per-layer lists some configs carry
                value = getattr(model.config, sub, None)
                if isinstance(value, list):
                    setattr(model.config, sub, value[:num_layers])
            return model
    raise ValueError(f"model: found no list of transformer blocks in {type(model).__name__}")
