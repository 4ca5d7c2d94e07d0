"""Host-side helpers shared by the kernel-attention ops: the feature-map description,
block sizes and launch configurations (one fixed config per kernel and size class, tuned on
an H100; a single small config under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import functools
import json
import os

import torch
import triton

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older Triton
    from triton.runtime.autotuner import OutOfResources

from .config import FeatureConfig  # noqa: F401  (re-exported for the ops)
from .dispatch import interpreting  # defined there: dispatch imports without Triton


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


def _overrides_from_env() -> dict[str, dict[str, int]]:
    """``APPROXATTN_LAUNCH_OVERRIDES='{"kv_bwd": {"BN": 64, "num_warps": 8, "num_stages": 1}}'`` (JSON)."""
    text = os.environ.get("APPROXATTN_LAUNCH_OVERRIDES", "").strip()
    if not text:
        return {}
    try:
        table = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"APPROXATTN_LAUNCH_OVERRIDES: expected JSON, got {text!r} ({error})") from None
    keys = {"BN", "num_warps", "num_stages"}
    if not isinstance(table, dict) or not all(isinstance(c, dict) and set(c) == keys and
                                              all(isinstance(x, int) and x > 0 for x in c.values())
                                              for c in table.values()):
        raise ValueError("APPROXATTN_LAUNCH_OVERRIDES: expected {kind: {BN, num_warps, num_stages} of positive "
                         f"integers}}, got {text!r}")
    return table


# Launch overrides for tuning runs (benchmarks/tune.py sets them; a run can take them from the
# environment, so a tuned config can be timed without editing DEFAULTS): {kind: {BN, num_warps, num_stages}}.
OVERRIDES: dict[str, dict[str, int]] = _overrides_from_env()


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
    if kind == "state" and m <= 64 and dv > 64:
        # one feature block, wide values (SEA's estimator: m = 33 over [P, v], dv = 128): swept on an H100 at
        # N = 65,536, forward (benchmarks/sea_estimator_tune.py, run17/call2): 0.464 ms against 0.796 at the default
        return {"BN": 64, "num_warps": 4, "num_stages": 3}
    return dict(DEFAULTS.get(kind, {"BN": 64, "num_warps": 4, "num_stages": 2}))


# Non-causal kernels work on feature blocks of at most 64 columns, so one config per kind
# (picked on an H100 by benchmarks/tune.py at N = 65,536).
DEFAULTS: dict[str, dict[str, int]] = {
    # re-swept after the folded projection and the state halves (benchmarks/results/h100/run11/tune):
    # FAVOR+ m = 256 2.50 -> 2.35 ms fwd+bwd, elu+1 1.16 -> 0.97 ms
    "state": {"BN": 128, "num_warps": 4, "num_stages": 3},
    "out": {"BN": 64, "num_warps": 4, "num_stages": 2},
    # the one-sweep query backward, now run for one feature block (ELU, m ≤ 64) or when forced; picked
    # (H100 sweep of BN 32–128, 4/8 warps, 1/2 stages) when it served every width: best overall for
    # FAVOR+/ReLU m = 256, FAVOR+ m = 128 and ELU (its 64/4/2 is 8% faster on ELU, 16% slower at m = 128)
    "q_bwd_fused": {"BN": 128, "num_warps": 8, "num_stages": 2},
    # _q_bwd_fused without the state sums, and the feature-major dS sweep (H100 sweep, FAVOR+ m = 256)
    "q_bwd": {"BN": 64, "num_warps": 4, "num_stages": 3},
    "dstate": {"BN": 64, "num_warps": 4, "num_stages": 3},  # since do·o comes from the query sweep (run11)
    "kv_bwd": {"BN": 64, "num_warps": 4, "num_stages": 3},
    # causal_chunked: "chunk" gives the chunk length BT that every one of its kernels shares (the
    # stored states' layout); the others only their num_warps / num_stages (their BN is ignored).
    # H100 sweep, FAVOR+ m = 256 with the prefix max, N = 65,536 (benchmarks/results/h100/run10):
    # BT 32/64/128 → 15.6/13.7/14.1 ms fwd+bwd; 8 → 4 warps made dk/dv 5.1 → 2.3 ms, dq 2.3 → 1.1
    "chunk": {"BN": 64, "num_warps": 4, "num_stages": 2},
    "chunk_states": {"BN": 64, "num_warps": 4, "num_stages": 3},
    "chunk_out": {"BN": 64, "num_warps": 4, "num_stages": 1},
    "chunk_dq": {"BN": 64, "num_warps": 4, "num_stages": 1},
    "chunk_dstates": {"BN": 64, "num_warps": 4, "num_stages": 1},
    "chunk_dkv": {"BN": 64, "num_warps": 4, "num_stages": 1},
}


def key_valid_arg(valid: torch.Tensor | None, like: torch.Tensor):
    """A pointer, batch stride and token stride for the ``(B, N)`` bool key mask (a dummy when None)."""
    if valid is None:
        return like, 0, 0
    mask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    return mask, mask.stride(0), mask.stride(1)


# ----------------------------------------------------------------------------- cached launches
# ``kernel[grid](...)`` re-specialises every argument on every call: with ~30–40 arguments that
# is tens of µs of host time per launch on the H100 machine, several launches per call. A
# :class:`Launch` binds one call site's constant arguments (sizes, strides, scalars, block sizes)
# and, after one ordinary launch, calls the compiled kernel (``CompiledKernel[grid]``, Triton's
# own launcher) with them directly. That is only valid while nothing Triton specialises on
# changes, so launches live in plans keyed by :func:`layout_key` (shapes, strides, dtypes and
# 16-byte alignment of every tensor) plus the feature map's constants.

DIRECT_LAUNCH = os.environ.get("APPROXATTN_DIRECT_LAUNCH", "1") == "1"
DEFAULT_NUM_STAGES = 3   # Triton's own default on CUDA, for launches that name none


class Launch:
    """One kernel launch with its non-pointer arguments fixed: ``launch(*pointers)``.

    ``consts`` follow the pointers in the kernel's signature; ``meta`` holds the constexpr
    parameters (which close the signature) and the launch options (num_warps, num_stages).
    """

    __slots__ = ("fn", "grid", "consts", "meta", "runner", "tail", "device")

    def __init__(self, fn, grid: tuple[int, ...], consts: tuple, meta: dict, device: torch.device):
        self.fn, self.grid, self.consts, self.meta = fn, grid, tuple(consts), meta
        self.runner = self.tail = None
        self.device = device.index if device.type == "cuda" else None

    def __call__(self, *pointers) -> None:
        global DIRECT_LAUNCH
        if self.runner is not None:
            try:
                # addresses, not tensors: for a tensor Triton's launcher calls data_ptr() and asks the
                # driver to validate the pointer (cuPointerGetAttribute), per pointer, per launch; the
                # plan's layout key has fixed device, dtype and strides already
                self.runner(*[p.data_ptr() for p in pointers], *self.tail, stream=_raw_stream(self.device))
                return
            except (TypeError, ValueError, AttributeError, IndexError):  # launcher refused the arguments
                DIRECT_LAUNCH = False
                self.runner = None
        compiled = self._first_launch(pointers)
        if DIRECT_LAUNCH and self.device is not None and not interpreting():
            self._bind(compiled, len(pointers))

    def _first_launch(self, pointers):
        """The ordinary launch (it compiles). The configs were tuned for half inputs: fp32 operands or a
        wider value head can need more shared memory than the device has for the pipelined loads (an
        fp32 state sweep with dv = 128 asked for 240 KiB of an H200's 227), so on OutOfResources the
        launch retries with one pipeline stage fewer, down to one, and keeps what fitted."""
        while True:
            try:
                return self.fn[self.grid](*pointers, *self.consts, **self.meta)
            except OutOfResources as error:
                # fewer stages only shrink the pipelined tiles (shared memory); a tuning run (OVERRIDES) must
                # see its config fail rather than be timed under another
                stages = self.meta.get("num_stages", DEFAULT_NUM_STAGES)
                if getattr(error, "name", "") != "shared memory" or stages <= 1 or OVERRIDES:
                    raise
                self.meta = {**self.meta, "num_stages": stages - 1}

    def _bind(self, compiled, num_pointers: int) -> None:
        global DIRECT_LAUNCH
        try:
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            constexprs = self.fn.arg_names[num_pointers + len(self.consts):]
            self.tail = self.consts + tuple(self.meta[name] for name in constexprs)
            grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
            self.runner = compiled[grid]
        except Exception:  # noqa: BLE001  (another Triton's internals: keep the ordinary launch)
            DIRECT_LAUNCH = False
            self.runner = None


def _raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def layout_key(*tensors) -> tuple:
    """Everything about ``tensors`` that a compiled launch depends on (None entries allowed)."""
    return tuple(None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0, t.device)
                 for t in tensors)


class PlanCache(dict):
    """Per-layout launch plans, bounded (oldest dropped) so varying shapes cannot grow it forever."""

    LIMIT = 256

    def add(self, key, plan):
        if len(self) >= self.LIMIT:
            del self[next(iter(self))]
        self[key] = plan
        return plan
