"""Input checks shared by every method: clear errors instead of silent wrong answers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one attention call, read off validated inputs."""

    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    value_dim: int

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    def group_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, N, ...)`` → ``(B, Hkv, G, N, ...)``: each key/value head's query group (a view)."""
        return x.reshape(self.batch, self.kv_heads, self.groups, *x.shape[2:])

    def ungroup_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, G, N, ...)`` → ``(B, Hq, N, ...)``."""
        return x.reshape(self.batch, self.heads, *x.shape[3:])


def int_arg(name: str, value, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ≥ ``minimum``; else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int ≥ {minimum}, got {value}")
    return value


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_inputs(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Any = False,
    key_padding_mask: Any = None,
    scale: Any = None,
    mask_rows: bool = True,
) -> tuple[AttentionShape, float]:
    """Validate an attention call and return its sizes and the softmax scale.

    q: ``(B, Hq, Nq, d)``; k: ``(B, Hkv, Nk, d)``; v: ``(B, Hkv, Nk, dv)``;
    key_padding_mask: ``(B, Nk)`` bool, True = keep; scale: positive finite or None (1/√d).
    mask_rows: also check that every batch element keeps a key (reads the mask back from its
    device: a GPU sync); False checks only its type, shape and device.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seq, head_dim), got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected the same device as q ({q.device}), got {t.device}")
    B, Hq, Nq, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k, v: expected batch size {B} like q, got {k.shape[0]} and {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"v: expected {k.shape[1]} heads like k, got {v.shape[1]}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {Hq} (grouped-query attention), got {Hkv}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected head_dim {d} like q, got {k.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v: expected sequence length {k.shape[2]} like k, got {v.shape[2]}")
    Nk, dv = k.shape[2], v.shape[3]
    for name, size in (("batch", B), ("heads", Hq), ("seq_q", Nq), ("seq_k", Nk), ("head_dim", d), ("value_dim", dv)):
        if size == 0:
            raise ValueError(f"{name}: expected a non-empty dimension, got size 0")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if causal and Nq != Nk:
        raise ValueError(f"causal: causal attention needs seq_q == seq_k, got seq_q={Nq} and seq_k={Nk}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask: expected a bool tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = keep), got {key_padding_mask.dtype}")
        if _shape(key_padding_mask) != (B, Nk):
            raise ValueError(f"key_padding_mask: expected shape {(B, Nk)} (batch, seq_k), got {_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device} like q, got {key_padding_mask.device}")
        if mask_rows:
            empty = (~key_padding_mask.any(dim=1)).nonzero()
            if empty.numel():
                raise ValueError(
                    f"key_padding_mask: every batch element must keep at least one key; "
                    f"batch element {int(empty[0, 0])} keeps none"
                )
    if scale is None:
        scale_value = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a positive finite float or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a positive finite float or None, got {scale!r}")
        scale_value = float(scale)
    return AttentionShape(B, Hq, Hkv, Nq, Nk, d, dv), scale_value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs (exponentials and long sums need it), else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
