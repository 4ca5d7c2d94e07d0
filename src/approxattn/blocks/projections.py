"""Learned sequence projections (Linformer's E and F), shared by Linformer and FLuRKA."""

from __future__ import annotations

import torch
from torch import nn

from .fast_kernels import fast_kernel

SHARING_MODES = ("headwise", "kv", "none")
INITS = ("mean-pool", "gaussian")


def mean_pool_matrix(rank: int, max_len: int) -> torch.Tensor:
    """``(rank, max_len)`` segment-mean matrix: key j goes to segment ``⌊j·rank/max_len⌋``.

    With ``rank == max_len`` it is the identity, which makes Linformer exact.
    """
    segment = (torch.arange(max_len) * rank) // max_len
    matrix = torch.zeros(rank, max_len, dtype=torch.float64)
    matrix[segment, torch.arange(max_len)] = 1.0
    return (matrix / matrix.sum(dim=1, keepdim=True)).float()


class SequenceProjection(nn.Module):
    """Projects keys and values along the sequence axis: ``k_r = E k``, ``v_r = F v``.

    E and F have shape ``(rank, max_len)`` and are sliced to the actual length N ≤ max_len.
    Sharing (Linformer §4): ``"headwise"`` one E and one F shared by all heads of the layer;
    ``"kv"`` additionally E = F; ``"none"`` a separate pair per key/value head
    (``num_heads`` of them). Layer-wise sharing is one module passed to several layers.
    Init: ``"mean-pool"`` segment means (training-free, and the identity when
    rank == max_len) or ``"gaussian"`` N(0, 1/rank) entries (the Johnson–Lindenstrauss
    projection of the paper's analysis).
    """

    def __init__(
        self, *, rank: int, max_len: int, sharing: str, num_heads: int | None, init: str, generator: torch.Generator
    ) -> None:
        super().__init__()
        if rank > max_len:
            raise ValueError(f"option 'rank': expected at most max_len={max_len} (the longest sequence; in the functional form seq_k), got {rank}")
        if sharing == "none" and num_heads is None:
            raise ValueError("num_heads: sharing='none' keeps one projection per key/value head; expected an int, got None")
        self.rank, self.max_len, self.sharing = rank, max_len, sharing
        copies = num_heads if sharing == "none" else 1

        def initial() -> torch.Tensor:
            if init == "mean-pool":
                base = mean_pool_matrix(rank, max_len)
                return base.expand(copies, rank, max_len).clone()
            return torch.randn(copies, rank, max_len, generator=generator, dtype=torch.float64).float() * rank**-0.5

        self.key_projection = nn.Parameter(initial())
        self.value_projection = None if sharing == "kv" else nn.Parameter(initial())
        self._rows_cache: tuple | None = None  # (E's slice, version, dtype, device) → rows of E in use

    def forward(
        self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k ``(B, H, N, d)``, v ``(B, H, N, dv)``, key_valid ``(B, N)`` →
        ``k_r (B, H, r, d)``, ``v_r (B, H, r, dv)`` and the validity of the r projected keys
        ``(B, r)`` (a projected key whose row of E touches no valid key is masked out)."""
        length, heads = k.shape[2], k.shape[1]
        if length > self.max_len:
            raise ValueError(f"k: sequence length {length} exceeds this projection's max_len={self.max_len}")
        if self.sharing == "none" and heads != self.key_projection.shape[0]:
            raise ValueError(f"k: expected {self.key_projection.shape[0]} key/value heads (num_heads), got {heads}")
        e = self.key_projection[..., :length]
        f = e if self.value_projection is None else self.value_projection[..., :length]
        if key_valid is not None:
            zero = torch.zeros((), dtype=k.dtype, device=k.device)
            k = torch.where(key_valid[:, None, :, None], k, zero)
            v = torch.where(key_valid[:, None, :, None], v, zero)
        k_reduced, v_reduced = project_sequence(e, k), project_sequence(f, v)
        # a projected key whose row of E touches no valid key (padding, or a slice shorter than
        # max_len) holds only zeros and must not take part in the softmax
        if key_valid is None:
            reduced_valid = self._rows_in_use(e, k.dtype).expand(k.shape[0], -1)
        else:
            reduced_valid = (torch.einsum("hrn,bn->bhr", e.detach().to(k.dtype).abs(), key_valid.to(k.dtype)) > 0
                             ).any(dim=1)
        return k_reduced, v_reduced, reduced_valid

    def _rows_in_use(self, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(1, r)``: rows of E (sliced to N, rounded to the inputs' dtype) with a non-zero entry for some
        head; kept until E changes (its version), so unpadded calls spend no launches on it."""
        key = (e.shape, e._version, dtype, e.device)
        if self._rows_cache is None or self._rows_cache[0] != key:
            rows = (e.detach().to(dtype) != 0).any(dim=-1).any(dim=0)[None]
            self._rows_cache = (key, rows)
        return self._rows_cache[1]


def project_sequence(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E[h] @ x[b, h]``: e ``(C, r, N)`` (C = 1: shared by every head), x ``(B, H, N, d)`` →
    ``(B, H, r, d)`` in x's dtype (E rounded to it, as the products are taken). For fp16/bf16 x on CUDA
    (FLuRKA's fused path) one Triton kernel each way (``kernels.sequence_projection``: the einsum copies x
    into an ``(N, B·H·d)`` layout and its gradient back, ~2× the memory traffic);
    :func:`project_sequence_reference` otherwise (Linformer projects in fp32, so always)."""
    fast = fast_kernel("sequence_projection", "fast_sequence_projection")
    if fast is not None:
        out = fast(e, x)
        if out is not None:
            return out
    return project_sequence_reference(e, x)


def project_sequence_reference(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`project_sequence` in PyTorch: one einsum with E rounded to x's dtype."""
    return torch.einsum("hrn,bhnd->bhrd", e.to(x.dtype), x)
