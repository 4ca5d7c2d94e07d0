"""Host-side helpers shared by the kernel-attention ops: the feature-map description,
block sizes and launch configurations (one fixed config per kernel and size class, tuned on
an H100; a single small config under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import functools
import os

import torch
import triton

from .config import FeatureConfig  # noqa: F401  (re-exported for the ops)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_sizes(m: int, d: int, dv: int) -> tuple[int, int, int]:
    return (max(16, triton.next_power_of_2(m)), max(16, triton.next_power_of_2(d)),
            max(16, triton.next_power_of_2(dv)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_hint(device: torch.device) -> int:
    """How many programs keep the device busy (8 per multiprocessor on a GPU)."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


PROGRAMS_PER_SM = 8


# Launch overrides for tuning runs: {kind: {BN, num_warps, num_stages}}.
OVERRIDES: dict[str, dict[str, int]] = {}


def pick_config(kind: str, m: int, d: int, dv: int) -> dict[str, int]:
    """Block size along N and launch parameters of one kernel for feature width m."""
    if interpreting():
        return {"BN": 16}
    if kind in OVERRIDES:
        return dict(OVERRIDES[kind])
    if kind.startswith("causal"):
        if triton.next_power_of_2(m) * triton.next_power_of_2(dv) >= 128 * 64:
            return {"BN": 32, "num_warps": 8, "num_stages": 1}
        return {"BN": 32, "num_warps": 4, "num_stages": 2}
    return dict(DEFAULTS.get(kind, {"BN": 64, "num_warps": 4, "num_stages": 2}))


# Non-causal kernels work on feature blocks of at most 64 columns, so one config per kind
# (picked on an H100 by benchmarks/tune.py at N = 65,536).
DEFAULTS: dict[str, dict[str, int]] = {
    "state": {"BN": 128, "num_warps": 4, "num_stages": 2},
    "out": {"BN": 128, "num_warps": 4, "num_stages": 3},
    "q_bwd": {"BN": 128, "num_warps": 4, "num_stages": 2},
    "dstate": {"BN": 64, "num_warps": 4, "num_stages": 2},
    "kv_bwd": {"BN": 64, "num_warps": 4, "num_stages": 3},
}


def key_valid_arg(valid: torch.Tensor | None, like: torch.Tensor):
    """A pointer, batch stride and token stride for the ``(B, N)`` bool key mask (a dummy when None)."""
    if valid is None:
        return like, 0, 0
    mask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    return mask, mask.stride(0), mask.stride(1)
