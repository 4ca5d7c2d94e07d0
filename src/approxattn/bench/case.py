"""One benchmark case: an implementation at one problem size (no imports of the implementations,
so presets, the runner and each implementation module can all depend on it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

IMPLS = ("fused", "reference", "graphed", "sdpa", "flex", "fla", "performer-pytorch",
         "sparse-kernel", "sparse-runs", "sparse-flex", "sparse-reference")


@dataclass
class Case:
    impl: str
    label: str
    seq: int
    causal: bool
    batch: int = 1
    heads: int = 16
    kv_heads: int | None = None
    head_dim: int = 64
    dtype: str = "bfloat16"
    method: str | None = None  # registry method (ours), also used for the roofline floor
    options: dict[str, Any] = field(default_factory=dict)
    feature_dim: int | None = None  # fla's K / performer-pytorch's nb_features
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")  # what the runner times
    # replayed from CUDA graphs (one per input set): the GPU's time without Python's launch
    # overhead, which bounds every path below ~8K tokens
    graphed: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def key(self) -> dict[str, Any]:
        return {"impl": self.impl, "label": self.label, "seq": self.seq, "causal": self.causal, "batch": self.batch,
                "heads": self.heads, "kv_heads": self.kv, "head_dim": self.head_dim, "dtype": self.dtype,
                "method": self.method, "options": self.options, "feature_dim": self.feature_dim,
                "graphed": self.graphed}


def graphed_label(label: str) -> str:
    """The label of a case's CUDA-graph twin: ``X (fused)`` → ``X (fused, CUDA graph)``,
    ``SDPA flash`` → ``SDPA flash (CUDA graph)``."""
    return label[:-1] + ", CUDA graph)" if label.endswith(")") else label + " (CUDA graph)"
