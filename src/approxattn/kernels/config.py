"""The description of a feature map that the fused kernels compute (no Triton needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cached import TensorKeyedCache, handed_out

# projection (and dtype, device, folded) → (hi, lo): the split is redone only when the projection
# changes (a redraw writes it in place, which bumps its version)
_SPLITS = TensorKeyedCache(limit=64)


@dataclass(frozen=True, eq=False)
class FeatureConfig:
    """One feature map φ and its constants.

    feature: ``"elu"`` (elu+1, m = d), ``"favor"`` (``ratio·(exp(xs·ωᵀx − xs²‖x‖²/2 − c) + eps)``)
    or ``"relu"`` (``relu(xs·ωᵀx) + eps``). projection: ``(m, d)`` rows ω (hyperbolic FAVOR
    passes ``[W; −W]``). stabilize: FAVOR's max subtraction (per query row; per (batch, head)
    over keys when non-causal, a running prefix max when causal).
    """

    feature: str
    projection: torch.Tensor | None = None
    x_scale: float = 1.0
    ratio: float = 1.0
    eps: float = 0.0
    stabilize: bool = True
    den_eps: float = 0.0

    def features(self, d: int) -> int:
        return d if self.projection is None else self.projection.shape[0]

    @property
    def use_key_max(self) -> bool:
        return self.feature == "favor" and self.stabilize

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        return like if self.projection is None else self.projection

    def weight_strides(self, like: torch.Tensor) -> tuple[int, int]:
        return (0, 0) if self.projection is None else tuple(self.projection.stride())

    def split_weight(self, like: torch.Tensor, *, folded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection as hi + lo halves in ``like``'s dtype (fp32: the projection twice).

        ``folded``: scaled by :meth:`weight_fold` first, the form the non-causal kernels take (their
        logits come out of the dot scaled, FAVOR's in base-2 units)."""
        if self.projection is None:
            return like, like
        projection = self.projection
        key = (like.dtype, projection.device, folded)
        hit = _SPLITS.get(projection, *key)
        if hit is not None:
            return handed_out(hit)
        w = projection.detach().float().contiguous()
        if folded:
            w = w * self.weight_fold()
        if like.dtype == torch.float32:
            hi = lo = w
        else:
            hi = w.to(like.dtype)
            lo = (w - hi.float()).to(like.dtype)
        return handed_out(_SPLITS.put(projection, (hi, lo), *key))

    def weight_fold(self) -> float:
        """The factor folded into the projection for the non-causal kernels: ``x_scale`` (the
        temperature split), times log2(e) for FAVOR, whose exponentials are then ``exp2``."""
        return self.x_scale * (math.log2(math.e) if self.feature == "favor" else 1.0)

    def key(self, d: int) -> tuple:
        """The constants a compiled launch depends on (not the projection's values)."""
        return (self.feature, self.features(d), self.x_scale, self.ratio, self.eps, self.stabilize, self.den_eps)

    @staticmethod
    def low_precision(t: torch.Tensor) -> bool:
        return t.dtype in (torch.float16, torch.bfloat16)

    def state_terms(self) -> tuple[float, float]:
        """(multiplier, constant) with φ = multiplier·e + constant for the kernels' core e."""
        if self.feature == "favor":
            return self.ratio, self.ratio * self.eps
        if self.feature == "relu":
            return 1.0, self.eps
        return 1.0, 0.0
