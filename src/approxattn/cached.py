"""Tensors handed out by process-wide caches, kept alive for the CUDA graphs that captured them.

A few caches outlive a call (the unpadded SEA layout per size, the split FAVOR weights per projection
version, the resize matrices per width): a CUDA graph captured while one of their tensors was in use
bakes in its address, and the cache may later evict it (their sizes are bounded) and the allocator hand
the memory to something else while the graph keeps reading it. So every cache returns what it hands
out through :func:`handed_out`, and a capture (``approxattn.graphed``) collects those values for as
long as its graph lives (:func:`collecting`). Not thread-safe: one capture at a time per process.

:class:`TensorKeyedCache` is the shared mechanism of the caches keyed by a tensor's identity and version.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import torch

T = TypeVar("T")
_COLLECTORS: list[list] = []


def handed_out(value: T) -> T:
    """``value`` (a cached tensor, or an object holding some), recorded for every collection under way."""
    for keep in _COLLECTORS:
        keep.append(value)
    return value


@contextmanager
def collecting() -> Iterator[list]:
    """A list that receives every cached value handed out inside the ``with`` block."""
    keep: list = []
    _COLLECTORS.append(keep)
    try:
        yield keep
    finally:  # by identity: list.remove compares by value, and two collections may hold equal lists
        del _COLLECTORS[next(i for i, c in enumerate(_COLLECTORS) if c is keep)]


def version(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter; −1 for an inference tensor, which has none (and cannot
    change outside inference mode)."""
    return -1 if tensor.is_inference() else tensor._version


class TensorKeyedCache:
    """Values derived from a tensor (and a few more key parts), valid while the tensor lives and is not
    written in place: entries are keyed by ``id`` and version and checked against a weak reference
    (an id may be reused by a later tensor). Bounded: past ``limit`` entries it starts afresh."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[tuple, tuple[weakref.ref, Any]] = {}

    @staticmethod
    def _key(tensor: torch.Tensor, extra: tuple) -> tuple:
        return (id(tensor), version(tensor), *extra)

    def get(self, tensor: torch.Tensor, *extra) -> Any | None:
        hit = self._entries.get(self._key(tensor, extra))
        return hit[1] if hit is not None and hit[0]() is tensor else None

    def put(self, tensor: torch.Tensor, value: T, *extra) -> T:
        if len(self._entries) >= self.limit:
            self._entries.clear()
        self._entries[self._key(tensor, extra)] = (weakref.ref(tensor), value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
