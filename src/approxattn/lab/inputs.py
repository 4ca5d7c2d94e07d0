"""Attention inputs for the lab: real Q, K, V from pretrained models and synthetic families.

An input is named by a spec string ``SOURCE[:key=value[:key=value...]]`` where values may be
comma lists (each combination becomes one input):

* ``minilm`` / ``smollm2`` (real, see :mod:`.models`): ``text=kjv|fortunes``, ``n=`` tokens,
  ``layers=``, ``heads=`` (query heads; with grouped-query attention every query head of the
  chosen heads' key/value groups is taken, so GQA stays GQA), ``offset=`` (characters into the text).
* ``gaussian``: i.i.d. Gaussian q, k with logits of standard deviation ``spread`` (q, k entries
  ~ N(0, spread) so q·k/√d has variance spread²), v ~ N(0, 1); ``n=``, ``spread=``, ``heads=``,
  ``d=``, ``seed=``, ``causal=0|1``.
* ``peaked``: low-entropy rows: each query points at one random key with logit ``sharpness``
  above the rest (q_i = sharpness·√d·k_j/‖k_j‖² + noise); ``n=``, ``sharpness=``, ``heads=``,
  ``d=``, ``seed=``, ``causal=0|1``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .budgets import parse_value
from .models import MODELS, check_request, get_model_info
from .text import TEXTS

SYNTHETIC = ("gaussian", "peaked")

SPEC_KEYS = {
    "model": {"text", "n", "layers", "heads", "offset"},
    "gaussian": {"n", "spread", "heads", "d", "seed", "causal"},
    "peaked": {"n", "sharpness", "heads", "d", "seed", "causal"},
}
SYNTHETIC_DEFAULTS = {
    "gaussian": {"n": [512], "spread": [2.0], "heads": [4], "d": [64], "seed": [0], "causal": [0]},
    "peaked": {"n": [512], "sharpness": [8.0], "heads": [4], "d": [64], "seed": [0], "causal": [0]},
}


@dataclass
class AttentionInput:
    """One attention problem: q ``(1, Hq, N, d)``, k, v ``(1, Hkv, N, d)``, causal flag and scale."""

    id: str
    source: str
    kind: str  # "real" | "synthetic"
    seq_len: int
    head_dim: int
    heads: int
    kv_heads: int
    causal: bool
    meta: dict[str, Any]
    loader: Callable[[], dict[str, Any]] = field(repr=False)
    _data: dict[str, Any] | None = field(default=None, repr=False)

    def load(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self.loader()
        return self._data

    @property
    def q(self) -> torch.Tensor:
        return self.load()["q"]

    @property
    def k(self) -> torch.Tensor:
        return self.load()["k"]

    @property
    def v(self) -> torch.Tensor:
        return self.load()["v"]

    @property
    def scale(self) -> float:
        return float(self.load()["scale"])

    def describe(self) -> dict[str, Any]:
        return {"input": self.id, "source": self.source, "input_kind": self.kind, "seq_len": self.seq_len,
                "head_dim": self.head_dim, "heads": self.heads, "kv_heads": self.kv_heads, "causal": self.causal,
                **self.meta}


def parse_spec(spec: str) -> tuple[str, dict[str, list[Any]]]:
    """``"minilm:n=256,512:layers=1"`` → ``("minilm", {"n": [256, 512], "layers": [1]})`` (clear errors)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"input: expected SOURCE[:key=value...], got {spec!r}")
    source, *parts = spec.strip().split(":")
    sources = list(MODELS) + list(SYNTHETIC)
    if source not in sources:
        raise ValueError(f"input {spec!r}: unknown source {source!r}; available: {', '.join(sources)}")
    allowed = SPEC_KEYS["model" if source in MODELS else source]
    values: dict[str, list[Any]] = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"input {spec!r}: expected key=value, got {part!r}")
        key, text = part.split("=", 1)
        if key not in allowed:
            raise ValueError(f"input {spec!r}: unknown key {key!r} for {source}; valid keys: {', '.join(sorted(allowed))}")
        values[key] = [parse_value(v) for v in text.split(",") if v.strip()]
        if not values[key]:
            raise ValueError(f"input {spec!r}: no value for {key!r}")
    return source, values


def _ints(spec: str, key: str, values: list[Any], minimum: int) -> list[int]:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"input {spec!r}: {key} expects ints >= {minimum}, got {value!r}")
    return list(values)


def expand_spec(
    spec: str, *, cache: str | None = None, on_load: Callable[[str], None] | None = None,
    overrides: dict[str, list[Any]] | None = None,
) -> list[AttentionInput]:
    """The inputs a spec names (lazy: nothing is loaded or captured until ``.load()``).

    ``overrides`` (from ``--seq-len``, ``--layers``, ``--heads``, ``--text``) replace keys the
    source accepts.
    """
    source, values = parse_spec(spec)
    allowed = SPEC_KEYS["model" if source in MODELS else source]
    for key, given in (overrides or {}).items():
        if key in allowed and given:
            values[key] = list(given)
    if source in MODELS:
        return _real_inputs(spec, source, values, cache, on_load)
    return _synthetic_inputs(spec, source, values)


def _real_inputs(spec, source, values, cache, on_load) -> list[AttentionInput]:
    info = get_model_info(source)
    texts = values.get("text", ["kjv"])
    for text in texts:
        if text not in TEXTS:
            raise ValueError(f"input {spec!r}: unknown text {text!r}; available: {', '.join(TEXTS)}")
    lengths = _ints(spec, "n", values.get("n", [min(512, info.max_positions)]), 2)
    layers = _ints(spec, "layers", values.get("layers", [1]), 0)
    offsets = _ints(spec, "offset", values.get("offset", [0]), 0)
    heads = _ints(spec, "heads", values.get("heads", list(range(info.num_heads))), 0)
    for head in heads:
        if head >= info.num_heads:
            raise ValueError(f"input {spec!r}: {source} has query heads 0..{info.num_heads - 1}, got {head}")
    for n in lengths:
        try:
            check_request(info, n, layers)
        except ValueError as err:
            raise ValueError(f"input {spec!r}: {err}") from None
    groups = sorted({h // info.groups for h in heads})
    q_heads = [g * info.groups + j for g in groups for j in range(info.groups)]
    longest = max(lengths)
    out = []
    for text, offset, layer, n in itertools.product(texts, offsets, layers, sorted(lengths)):
        # a causal model's capture at the longest length serves every shorter one
        capture_n = longest if info.causal else n

        def loader(text=text, offset=offset, layer=layer, n=n, capture_n=capture_n):
            from .models import captured_qkv

            # every layer of the spec in one forward pass (cached together), then this one
            data = captured_qkv(source, text, capture_n, layers, offset=offset, cache=cache, on_load=on_load)[layer]
            q = data["q"][:, q_heads, :n].contiguous()
            k = data["k"][:, groups, :n].contiguous()
            v = data["v"][:, groups, :n].contiguous()
            return {"q": q, "k": k, "v": v, "scale": data["scale"]}

        ident = f"{source}/{text}" + (f"+{offset}" if offset else "") + f"/L{layer}/n{n}"
        out.append(AttentionInput(
            id=ident, source=source, kind="real", seq_len=n, head_dim=info.head_dim, heads=len(q_heads),
            kv_heads=len(groups), causal=info.causal,
            meta={"text": text, "layer": layer, "offset": offset, "head_ids": q_heads, "kv_head_ids": groups,
                  "model": info.title},
            loader=loader,
        ))
    return out


def _synthetic_inputs(spec, source, values) -> list[AttentionInput]:
    merged = SYNTHETIC_DEFAULTS[source] | values
    lengths = _ints(spec, "n", merged["n"], 2)
    heads = _ints(spec, "heads", merged["heads"], 1)
    dims = _ints(spec, "d", merged["d"], 1)
    seeds = _ints(spec, "seed", merged["seed"], 0)
    causal_values = [bool(c) for c in _ints(spec, "causal", merged["causal"], 0)]
    knob = "spread" if source == "gaussian" else "sharpness"
    for value in merged[knob]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"input {spec!r}: {knob} expects positive numbers, got {value!r}")
    out = []
    for n, h, d, seed, causal, value in itertools.product(
        lengths, heads, dims, seeds, causal_values, merged[knob]
    ):
        def loader(n=n, h=h, d=d, seed=seed, value=float(value)):
            return synthetic_qkv(source, n=n, heads=h, head_dim=d, seed=seed, **{knob: value})

        tag = {"spread": "s", "sharpness": "a"}[knob]
        ident = f"{source}/{tag}{value:g}/h{h}d{d}" + ("/causal" if causal else "") + (f"/seed{seed}" if seed else "") + f"/n{n}"
        out.append(AttentionInput(
            id=ident, source=source, kind="synthetic", seq_len=n, head_dim=d, heads=h, kv_heads=h, causal=causal,
            meta={knob: float(value), "seed": seed}, loader=loader,
        ))
    return out


def synthetic_qkv(
    source: str, *, n: int, heads: int, head_dim: int, seed: int = 0, spread: float = 2.0, sharpness: float = 8.0
) -> dict[str, Any]:
    """q, k, v ``(1, heads, n, head_dim)`` of a synthetic family (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, heads, n, head_dim)
    scale = head_dim ** -0.5
    if source == "gaussian":
        sigma = math.sqrt(spread)
        q = torch.randn(shape, generator=gen) * sigma
        k = torch.randn(shape, generator=gen) * sigma
    elif source == "peaked":
        k = torch.randn(shape, generator=gen)
        target = torch.randint(0, n, (1, heads, n), generator=gen)
        chosen = k.gather(2, target[..., None].expand(shape))
        q = sharpness / scale * chosen / chosen.pow(2).sum(-1, keepdim=True) + 0.1 * torch.randn(shape, generator=gen)
    else:
        raise ValueError(f"source: expected one of {SYNTHETIC}, got {source!r}")
    v = torch.randn(shape, generator=gen)
    return {"q": q, "k": k, "v": v, "scale": scale}
