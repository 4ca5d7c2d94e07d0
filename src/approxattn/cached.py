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
from typing import Any, Callable, Iterator, TypeVar

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


# Values computed from a long-lived cached tensor alone (e.g. an unpadded SEA layout's column map),
# keyed by that tensor; values over DERIVED_MAX_BYTES are rebuilt each time instead of kept.
_DERIVED = TensorKeyedCache(limit=64)
DERIVED_MAX_BYTES = 64 << 20


def derived(source: torch.Tensor, key: tuple, build: Callable[[], T]) -> T:
    """``build()`` (a tensor or a tuple of tensors computed from ``source`` and ``key`` alone) once per
    ``(source, key)`` while ``source`` lives unwritten, handed out like every cached value. Only for
    sources that outlive many calls (a per-call source would keep its values until the cache starts
    afresh). Inside a CUDA graph capture the value is built fresh (a capture's kernels run only on
    replay), and a cached value written in place is rebuilt."""
    if source.is_cuda and torch.cuda.is_current_stream_capturing():
        return build()
    hit = _DERIVED.get(source, *key)
    if hit is not None and hit[1] == _versions(hit[0]):
        return handed_out(hit[0])
    with torch.inference_mode(False):   # the source serves autograd calls too: so must its values
        value = build()
    parts = value if isinstance(value, tuple) else (value,)
    if sum(t.numel() * t.element_size() for t in parts) <= DERIVED_MAX_BYTES:
        _DERIVED.put(source, (value, _versions(value)), *key)
    return handed_out(value)


def _versions(value) -> tuple[int, ...]:
    return tuple(version(t) for t in (value if isinstance(value, tuple) else (value,)))
