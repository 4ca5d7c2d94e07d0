"""Where a block hands its work to a fused kernel: the kernels package is optional, so it is looked up lazily."""

from __future__ import annotations

import importlib


def fast_kernel(module: str, name: str):
    """``approxattn.kernels.<module>.<name>`` (a dispatching op that returns None where its kernel
    does not apply), or None when the kernels package cannot be imported."""
    try:
        return getattr(importlib.import_module(f"..kernels.{module}", __package__), name)
    except ImportError:  # pragma: no cover - the kernels package is optional
        return None
