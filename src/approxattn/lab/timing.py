"""Wall-clock time and peak memory of one call, on the current device.

Time: median of repeated calls after a warm-up (CUDA calls synchronised), repeated until a
time budget is spent (at least ``min_reps``).

Peak memory: on CUDA, ``max_memory_allocated`` above the level before the call. On CPU, where
PyTorch keeps no such counter, a ``TorchDispatchMode`` follows every tensor the call's ops
allocate and frees it when the tensor dies: the peak of those live bytes (scratch memory
inside a single kernel is not seen). Both report the peak *beyond the output*, to line up with
the registry's ``peak_memory`` (activation memory beyond inputs and outputs).
"""

from __future__ import annotations

import statistics
import time
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 30,
    budget_s: float = 0.1,
) -> dict[str, float]:
    """Median, min and max seconds of ``fn()`` and the number of timed repetitions."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": len(times)}


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages allocated by ops run under it, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        self._count: dict[int, int] = {}
        self._size: dict[int, int] = {}

    def _release(self, tensor_id: int, key: int) -> Callable[[Any], None]:
        def callback(_ref: Any) -> None:
            self._refs.pop(tensor_id, None)
            self._count[key] -= 1
            if self._count[key] == 0:
                del self._count[key]
                self.current -= self._size.pop(key)

        return callback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or id(tensor) in self._refs:
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # pragma: no cover (storage-less tensors)
                continue
            key = storage.data_ptr()
            if key not in self._count:
                self._count[key] = 0
                self._size[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self._count[key] += 1
            self._refs[id(tensor)] = weakref.ref(tensor, self._release(id(tensor), key))
        return out


def peak_memory(fn: Callable[[], torch.Tensor], *, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by one call of ``fn`` beyond its returned tensor."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with torch.no_grad(), LiveTensorBytes() as tracker:
            out = fn()
        peak = tracker.peak
    out_bytes = out.untyped_storage().nbytes() if isinstance(out, torch.Tensor) else 0
    return max(int(peak) - out_bytes, 0)


def device_description(device: torch.device | str) -> dict[str, Any]:
    """What the measurements ran on (stored with every row)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {"device_type": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"
