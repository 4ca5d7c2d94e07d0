"""Timing, peak memory and roofline floors.

Times are medians of ``triton.testing.do_bench`` (CUDA events; 25 ms warm-up, 100 ms of
repeats), over inputs rotated among enough sets to exceed the L2 cache. A graphed case
(``Case.graphed``) captures one CUDA graph of the step per input set and times their replay. Forward is timed
under ``torch.no_grad()``; forward+backward computes ``torch.autograd.grad(out, (q, k, v), do)``.
Peak memory is ``max_memory_allocated`` during one fwd+bwd from fresh inputs, counting the
inputs, minus what was allocated before them.

Floors: the device's copy bandwidth and bf16 (or fp32) matmul rate, measured at the start of
the run, with the registry's cost formula for the method: forward
``max(flops / rate, io_bytes / bandwidth)`` with io_bytes = q, k, v read and o written once
(what a fused kernel must move; the registry's ``bytes_moved`` also counts the reference
path's fp32 feature tensors); forward+backward 3× the flops and 3× the bytes (q, k, v, o, do
read, dq, dk, dv written).
"""

from __future__ import annotations

import functools
import itertools
import math
import platform
import time
from typing import Any

import torch

from ..graphs import capture
from .case import Case
from .impls import build

L2_ROTATION_BYTES = 256 * 2**20


def measure_device(device: str = "cuda") -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and matmul rates of this device."""
    from triton.testing import do_bench

    props = torch.cuda.get_device_properties(device)
    src = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(functools.partial(dst.copy_, src), warmup=25, rep=200, return_mode="median")
    bandwidth = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)
    del src, dst
    rates = {}
    for name, dtype, n in (("bfloat16", torch.bfloat16, 8192), ("float32", torch.float32, 4096)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
        torch.backends.cuda.matmul.allow_tf32 = old
        rates[name] = 2 * n**3 / (ms * 1e-3)
    rates["float16"] = rates["bfloat16"]
    torch.cuda.empty_cache()
    return {
        "name": props.name, "multiprocessors": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30, "bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": rates, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


def floors(case: Case, device_info: dict[str, Any]) -> dict[str, float] | None:
    """Roofline floors in ms (fwd, fwd+bwd) from the registry's cost formula, or None."""
    if case.method is None:
        return None
    from ..registry import Shape, get_method

    spec = get_method(case.method)
    options = {} if case.impl == "sdpa" else dict(case.options)  # SDPA's options pick a backend, not a cost
    if "max_len" in spec.defaults:
        options.setdefault("max_len", case.seq)
    size = torch.empty((), dtype=case.torch_dtype).element_size()
    cost = spec.cost(case.batch, case.heads, case.seq, case.seq, case.head_dim, kv_heads=case.kv,
                     causal=case.causal, element_size=size, **options)
    io = Shape(case.batch, case.heads, case.seq, case.seq, case.head_dim, case.kv, case.head_dim, case.causal,
               size).io_bytes
    rate = device_info["matmul_flops_per_s"][case.dtype]
    bandwidth = device_info["bandwidth_bytes_per_s"]
    fwd = max(cost.flops / rate, io / bandwidth)
    both = max(3 * cost.flops / rate, 3 * io / bandwidth)
    return {"fwd": fwd * 1e3, "fwd+bwd": both * 1e3, "flops": cost.flops, "io_bytes": io,
            "bound": "compute" if cost.flops / rate > io / bandwidth else "memory"}


def _input_sets(make, requires_grad: bool) -> list[tuple]:
    first = make(requires_grad, 0)
    size = sum(t.numel() * t.element_size() for t in first)
    count = max(1, min(8, math.ceil(L2_ROTATION_BYTES / max(size, 1))))
    return [first] + [make(requires_grad, seed) for seed in range(1, count)]


def time_case(case: Case, modes=("fwd", "fwd+bwd"), *, warmup: int = 25, rep: int = 100,
              memory: bool = True) -> dict[str, Any]:
    """Median times (ms) for each mode and the fwd+bwd peak memory of one case."""
    from triton.testing import do_bench

    result: dict[str, Any] = {}
    try:
        run, make = build(case)
    except (ImportError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    for mode in modes:
        try:
            sets = _input_sets(make, mode == "fwd+bwd")
            cycle = itertools.cycle(sets)
            if mode == "fwd":
                def body(inputs):
                    q, k, v, _ = inputs
                    with torch.no_grad():
                        run(q, k, v)
            else:
                def body(inputs):
                    q, k, v, do = inputs
                    torch.autograd.grad(run(q, k, v), (q, k, v), do)
            if case.graphed:
                step = graphed_step(body, sets)
            else:
                def step():
                    body(next(cycle))
            result[mode] = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
        except torch.cuda.OutOfMemoryError:
            result[mode] = None
            result.setdefault("notes", []).append(f"{mode}: out of memory")
        except Exception as error:  # noqa: BLE001  (a failing peer must not stop the sweep)
            result[mode] = None
            result.setdefault("notes", []).append(f"{mode}: {type(error).__name__}: {str(error)[:200]}")
        finally:
            sets = cycle = step = None  # the step holds its graphs (and their memory pool)
            torch.cuda.empty_cache()
    if memory and "fwd+bwd" in modes and result.get("fwd+bwd") is not None and not case.graphed:
        result.update(peak_memory(run, make))
    return result


def graphed_step(body, sets: list[tuple]):
    """A step replaying one CUDA graph of ``body(inputs)`` per input set, in turn.

    Each body runs twice on a side stream before capture (what torch asks of a captured
    region: lazy initialisation, kernel compilation and the launch caches happen outside
    the graph); the captured outputs live in the graph's memory pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for inputs in sets:
            for _ in range(2):
                body(inputs)
    torch.cuda.current_stream().wait_stream(side)
    # one memory pool for all: a step keeps nothing past its end, and the graphs replay one at a time
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for inputs in sets:
        graph = torch.cuda.CUDAGraph()
        capture(graph, functools.partial(body, inputs), pool=pool)  # a failed capture leaves the RNG usable
        graphs.append(graph)
    cycle = itertools.cycle(graphs)
    return lambda: next(cycle).replay()


def peak_memory(run, make) -> dict[str, float]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    q, k, v, do = make(True, 0)
    out = run(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    io = sum(t.numel() * t.element_size() for t in (q, k, v, out, do, *grads))
    del q, k, v, do, out, grads
    torch.cuda.empty_cache()
    return {"peak_bytes": peak, "qkvo_and_grads_bytes": io, "peak_over_io": peak / io}
