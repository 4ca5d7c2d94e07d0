"""The method registry: every attention method carries its own metadata.

Shared code (the functional API, the CLI, the lab, the tests) reads a method's
:class:`MethodSpec` instead of branching on its name: family, causal support,
options with defaults and checks, exact limit and cost formula all live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .module import AttentionModule

FAMILIES = ("exact", "low-rank", "kernel", "hybrid", "nystrom", "sparse")


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One user-facing option of a method.

    ``check(value)`` returns ``None`` when the value is acceptable and otherwise a short
    description of what was expected. A value of the wrong type raises ``TypeError``
    (``type_ok`` decides), a value of the right type outside the allowed range ``ValueError``.
    """

    name: str
    default: Any
    doc: str
    expected: str
    type_ok: Callable[[Any], bool] = lambda value: True
    check: Callable[[Any], bool] = lambda value: True

    def validate(self, method: str, value: Any) -> None:
        if not self.type_ok(value):
            raise TypeError(
                f"option {self.name!r} of method {method!r}: expected {self.expected}, "
                f"got {type(value).__name__} {value!r}"
            )
        if not self.check(value):
            raise ValueError(f"option {self.name!r} of method {method!r}: expected {self.expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_option(name: str, default: Any, doc: str, *, minimum: int = 1, allow_none: bool = False) -> Option:
    return Option(
        name, default, doc,
        expected=f"an int >= {minimum}" + (" or None" if allow_none else ""),
        type_ok=lambda v: (v is None and allow_none) or _is_int(v),
        check=lambda v: v is None or v >= minimum,
    )


def float_option(
    name: str, default: Any, doc: str, *, minimum: float = 0.0, strict: bool = False, allow_none: bool = False
) -> Option:
    bound = f"> {minimum}" if strict else f">= {minimum}"
    return Option(
        name, default, doc,
        expected=f"a finite real number {bound}" + (" or None" if allow_none else ""),
        type_ok=lambda v: (v is None and allow_none) or _is_real(v),
        check=lambda v: v is None or (math.isfinite(v) and (v > minimum if strict else v >= minimum)),
    )


def choice_option(name: str, default: Any, doc: str, choices: tuple[Any, ...]) -> Option:
    return Option(
        name, default, doc,
        expected="one of " + ", ".join(repr(c) for c in choices),
        type_ok=lambda v: isinstance(v, str),
        check=lambda v: v in choices,
    )


def bool_option(name: str, default: bool, doc: str) -> Option:
    return Option(name, default, doc, expected="a bool", type_ok=lambda v: isinstance(v, bool))


def redraw_option(default: Any = 1000) -> Option:
    """The random-feature redraw policy shared by every random-feature method."""
    return Option(
        "redraw",
        default,
        "when to draw new random features in training mode: 'never', 'every_call' or every N training "
        "calls; never in eval mode",
        expected="'never', 'every_call' or a positive int (redraw every that many training calls)",
        type_ok=lambda v: isinstance(v, str) or _is_int(v),
        check=lambda v: v in ("never", "every_call") or (_is_int(v) and v > 0),
    )


def seed_option() -> Option:
    return int_option("seed", 0, "seed of the generator that draws random parameters", minimum=0)


# ----------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Cost:
    """Cost of one forward call, from a method's documented formula.

    flops: floating-point operations (a multiply-add counts 2).
    exps: transcendental evaluations (exp, elu's exp, ...).
    bytes_moved: bytes read and written from/to main memory by an implementation that
        keeps nothing larger than ``O(N·m)`` alive (inputs, outputs and materialised
        intermediates, each once).
    peak_memory: bytes of activation memory beyond inputs and outputs (forward only).
    """

    flops: float
    exps: float
    bytes_moved: float
    peak_memory: float

    def as_dict(self) -> dict[str, float]:
        return {
            "flops": self.flops,
            "exps": self.exps,
            "bytes_moved": self.bytes_moved,
            "peak_memory": self.peak_memory,
        }


@dataclass(frozen=True)
class Shape:
    """The problem size a cost formula is evaluated at."""

    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    kv_heads: int
    value_dim: int
    causal: bool
    element_size: int

    @property
    def io_bytes(self) -> float:
        """Bytes of reading q, k, v and writing the output once."""
        q_and_out = self.batch * self.heads * self.seq_q * (self.head_dim + self.value_dim)
        k_and_v = self.batch * self.kv_heads * self.seq_k * (self.head_dim + self.value_dim)
        return float(self.element_size * (q_and_out + k_and_v))


# ----------------------------------------------------------------------------- exact limits


@dataclass(frozen=True)
class ExactLimit:
    """The setting under which a method must equal its parent.

    ``options(seq_len)`` returns the options that make the method reproduce ``parent``
    exactly (to floating-point tolerance) on sequences of ``seq_len`` tokens, or ``None``
    when the limit is only reached asymptotically (``description`` says how). The parent is
    built with the options both methods share (same seed, same feature count) plus
    ``parent_options``.
    """

    parent: str
    description: str
    options: Callable[[int], dict[str, Any]] | None = None
    parent_options: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- method spec


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of the library may know about one method."""

    name: str
    family: str
    summary: str
    reference: str
    supports_causal: bool
    options: tuple[Option, ...]
    exact_limit: ExactLimit
    cost_formula: Callable[[Shape, dict[str, Any]], Cost]
    cost_doc: str
    module_class: type["AttentionModule"] = field(repr=False)
    # options filled from the inputs when the functional form is used and the caller
    # did not give them (e.g. Linformer's max_len = seq_k)
    infer_options: Callable[[int, int], dict[str, Any]] | None = field(default=None, repr=False)
    uses_scale: bool = True
    # one new query over cached keys, unmasked, gives the last row of the causal call, so a KV-cache
    # decoder (transformers' generate) decodes exactly; False where the causal path is its own
    # model (SEA's causal estimator and decoder), which decodes through its own state
    # (decoding_state/decode_step; in transformers inside approxattn.hf.cached_decoding)
    kv_cache_decoding: bool = True
    # a cheap working configuration for sequences of n tokens (tests, smoke runs, docs)
    example_options: Callable[[int], dict[str, Any]] = field(default=lambda n: {}, repr=False)

    @property
    def defaults(self) -> dict[str, Any]:
        return {option.name: option.default for option in self.options}

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Check ``options`` and return them merged over the defaults."""
        known = {option.name: option for option in self.options}
        for name in options:
            if name not in known:
                valid = ", ".join(sorted(known)) or "none"
                raise ValueError(f"unknown option {name!r} for method {self.name!r}; valid options: {valid}")
        resolved = self.defaults | dict(options)
        for name, value in resolved.items():
            known[name].validate(self.name, value)
        return resolved

    def cost(
        self,
        batch: int,
        heads: int,
        seq_q: int,
        seq_k: int,
        head_dim: int,
        *,
        kv_heads: int | None = None,
        value_dim: int | None = None,
        causal: bool = False,
        element_size: int = 2,
        **options: Any,
    ) -> Cost:
        """FLOPs, exponentials, bytes moved and peak activation memory of one forward call."""
        for label, value in (("batch", batch), ("heads", heads), ("seq_q", seq_q), ("seq_k", seq_k),
                             ("head_dim", head_dim), ("element_size", element_size)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{label}: expected a positive int, got {value!r}")
        shape = Shape(
            batch, heads, seq_q, seq_k, head_dim,
            kv_heads if kv_heads is not None else heads,
            value_dim if value_dim is not None else head_dim,
            causal, element_size,
        )
        return self.cost_formula(shape, self.resolve_options(options))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (used by ``approxattn list --json`` and reports)."""
        return {
            "name": self.name,
            "family": self.family,
            "summary": self.summary,
            "reference": self.reference,
            "supports_causal": self.supports_causal,
            "kv_cache_decoding": self.kv_cache_decoding,
            "options": {o.name: {"default": o.default, "doc": o.doc} for o in self.options},
            "exact_limit": {"parent": self.exact_limit.parent, "description": self.exact_limit.description},
            "cost": self.cost_doc,
        }


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {spec.family!r}")
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    names = [option.name for option in spec.options]
    if len(names) != len(set(names)):
        raise ValueError(f"method {spec.name!r} declares an option twice: {names}")
    _REGISTRY[spec.name] = spec
    spec.module_class.spec = spec
    return spec


def available_methods() -> dict[str, MethodSpec]:
    """All registered methods, by name, in registration order."""
    _ensure_loaded()
    return dict(_REGISTRY)


def get_method(name: Any) -> MethodSpec:
    """The spec of ``name``; a clear error for anything else."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"method: expected a method name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"method: unknown method {name!r}; available: {', '.join(_REGISTRY)}"
        ) from None


def causal_methods() -> list[str]:
    _ensure_loaded()
    return [name for name, spec in _REGISTRY.items() if spec.supports_causal]


def _ensure_loaded() -> None:
    from . import methods  # noqa: F401  (importing registers every method family)
