"""Tensors handed out by process-wide caches, kept alive for the CUDA graphs that captured them.

A few caches outlive a call (the unpadded SEA layout per size, the split FAVOR weights per projection
version, the resize matrices per width): a CUDA graph captured while one of their tensors was in use
bakes in its address, and the cache may later evict it (their sizes are bounded) and the allocator hand
the memory to something else while the graph keeps reading it. So every cache returns what it hands
out through :func:`handed_out`, and a capture (``approxattn.graphed``) collects those values for as
long as its graph lives (:func:`collecting`). Not thread-safe: one capture at a time per process.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, TypeVar

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
