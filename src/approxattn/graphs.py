"""Inference through CUDA graphs: ``approxattn.graphed(module)``.

An attention method's forward is a few to a hundred small launches (SEA: ~140 at 16K tokens). Below
~16K tokens their host time, not the GPU, sets the pace: SEA's forward took 4.7–8.6 ms of host time for
~2.2 ms of GPU work at 16K on the H100 machine. :class:`GraphedAttention` captures the forward once per
input signature into a CUDA graph and replays it: one launch, whatever the method does inside.

What it replays is the forward of a module in eval mode under ``torch.no_grad()`` or
``torch.inference_mode()``. It calls the module itself (eagerly) when that does not hold — CPU tensors,
grad mode on (the module's own parameters may want gradients, and a method may compute differently
for autograd: SEA keeps its estimate in fp32 then), a module in training mode (its random features may
be redrawn) — and for a signature whose capture
failed (a forward that reads the device back on the host, as SEA does with a padding mask, cannot be
captured). Each signature keeps its own graph, memory pool and static input buffers (``max_graphs``
of them, least recently used dropped). The inputs are copied into the static buffers before each
replay and the output is copied out of the graph's pool, so the result is the caller's to keep.

The signature is everything a captured graph depends on: shapes, strides, dtypes and device of q, k,
v and the mask, ``causal`` and ``scale``, the module's options, inference mode, the fp32 matmul
precision, and the identity, address and version of every parameter and buffer of the module (an
in-place update of a weight bumps its version: the next call re-captures, so a graph never replays
with stale constants the forward derived from them). Under autocast it runs eagerly. Tensors that
process-wide caches handed the forward (``approxattn.cached``) are kept alive with the graph, so
evicting them from their cache cannot free memory the graph still reads.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .cached import collecting, version
from .module import AttentionModule


class GraphedAttention:
    """``GraphedAttention(module)(q, k, v, *, causal=False, key_padding_mask=None, scale=None)``:
    ``module``'s forward (same arguments and result, ``(B, Hq, Nq, dv)``), replayed from a CUDA graph
    per input signature where it can be (see the module doc)::

        fast = approxattn.graphed(approxattn.build("sea", head_dim=64).cuda().eval())
        with torch.no_grad():
            out = fast(q, k, v, causal=True)

    Args:
        module (AttentionModule): the attention method (``approxattn.build(...)``).
        max_graphs (int): signatures kept at once (each holds its graph's memory). Default: 8.
        warmup (int): eager calls on a side stream before a capture (compiles kernels, fills caches).
    """

    def __init__(self, module: AttentionModule, *, max_graphs: int = 8, warmup: int = 2) -> None:
        if not isinstance(module, AttentionModule):
            raise TypeError(f"module: expected an approxattn AttentionModule (approxattn.build), "
                            f"got {type(module).__name__}")
        for name, value in (("max_graphs", max_graphs), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.module = module
        self.max_graphs, self.warmup = max_graphs, warmup
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._uncapturable: set[tuple] = set()  # signatures whose capture failed: eager, warned once
        self._lock = threading.Lock()
        self.replays = self.captures = 0

    def __repr__(self) -> str:
        return f"GraphedAttention({self.module!r}, graphs={len(self._graphs)}, max_graphs={self.max_graphs})"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        call = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        if not self._replayable(q, k, v, key_padding_mask):
            return self.module(q, k, v, **call)
        key = self._signature(q, k, v, key_padding_mask, causal, scale)
        with self._lock:   # one caller at a time: a graph's static buffers are shared
            if key in self._graphs:
                self._graphs.move_to_end(key)
                captured = self._graphs[key]
            elif key in self._uncapturable:
                captured = None
            else:
                captured = self._capture(key, q, k, v, call)
            if captured is not None:
                self.replays += 1
                with torch.cuda.device(q.device):
                    return captured.replay(q, k, v, key_padding_mask)
        return self.module(q, k, v, **call)

    def _replayable(self, q, k, v, key_padding_mask) -> bool:
        tensors = (q, k, v) if key_padding_mask is None else (q, k, v, key_padding_mask)
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
            return False  # the module's own checks speak for bad inputs
        return not (torch.is_grad_enabled() or self.module.training or torch.is_autocast_enabled("cuda"))

    def _signature(self, q, k, v, key_padding_mask, causal, scale) -> tuple:
        def layout(t):
            return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)

        state = tuple((id(t), t.data_ptr(), version(t)) for t in _state_tensors(self.module))
        return (layout(q), layout(k), layout(v), layout(key_padding_mask), causal, scale, state,
                repr(self.module.options), torch.is_inference_mode_enabled(), torch.get_float32_matmul_precision())

    def _capture(self, key, q, k, v, call) -> "_Captured | None":
        try:
            with torch.cuda.device(q.device):
                captured = _Captured(self.module, q, k, v, call, self.warmup)
        except torch.cuda.OutOfMemoryError:
            return None  # not remembered: memory may be there next time
        except Exception as error:  # noqa: BLE001  (a forward that cannot be captured runs eagerly)
            warnings.warn(f"approxattn.graphed: {self.module.spec.name!r} cannot be captured for this input "
                          f"signature ({type(error).__name__}: {str(error)[:200]}); it runs eagerly",
                          RuntimeWarning, stacklevel=3)
            self._uncapturable.add(key)
            return None
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        self._graphs[key] = captured
        self.captures += 1
        return captured


def _state_tensors(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()


class _Captured:
    """One input signature's graph: static inputs, the captured output, the graph, and the cached
    tensors the forward was handed (kept alive with the graph)."""

    def __init__(self, module: AttentionModule, q, k, v, call: dict, warmup: int) -> None:
        mask = call["key_padding_mask"]
        with torch.inference_mode(False):  # refilled by copy_ whatever the caller's mode
            self.q, self.k, self.v = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                                      for t in (q, k, v))
            self.mask = None if mask is None else torch.empty_like(mask)
        self._fill(q, k, v, mask)
        static_call = dict(call, key_padding_mask=self.mask)
        with torch.no_grad(), collecting() as self.cached:
            side = torch.cuda.Stream(device=q.device)
            side.wait_stream(torch.cuda.current_stream(q.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    module(self.q, self.k, self.v, **static_call)
            torch.cuda.current_stream(q.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            self.out = capture(self.graph, lambda: module(self.q, self.k, self.v, **static_call))
        self.done = torch.cuda.Event()   # recorded after each replay's output copy

    def _fill(self, q, k, v, mask) -> None:
        for static, given in ((self.q, q), (self.k, k), (self.v, v), (self.mask, mask)):
            if static is not None:
                static.copy_(given)

    def replay(self, q, k, v, mask) -> torch.Tensor:
        """On the caller's stream, after the previous replay's copies (which may have run on another
        stream: its static inputs and pool must not be overwritten under it)."""
        stream = torch.cuda.current_stream()
        stream.wait_event(self.done)   # a no-op before the first record
        self._fill(q, k, v, mask)
        self.graph.replay()
        out = self.out.clone()
        self.done.record(stream)
        return out


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
# Captures that failed keep their graph objects alive and their pools out of use: the pinned-host
# allocator still routes to such a pool (no Python call ends that), through a filter that points at
# the graph. A few hundred bytes each, and GraphedAttention tries each signature once.
_FAILED_GRAPHS: list[torch.cuda.CUDAGraph] = []
_FAILED_POOLS: set = set()
_CAPTURE_LOCK = threading.RLock()


def capture_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every capture (and the eager warm-up before one), as
    ``torch.cuda.graph`` keeps one: graphs that share a memory pool reuse each other's freed blocks
    only when captured on the same stream."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _CAPTURE_STREAMS[device]


def capture(graph: torch.cuda.CUDAGraph, fn: Callable[[], Any], *, pool: Any = None) -> Any:
    """``fn()`` captured into ``graph`` on the device's capture stream, as ``torch.cuda.graph`` does
    (same synchronisation and cache release first); returns what ``fn`` returned (tensors in the
    graph's memory pool: ``pool``, else a pool of its own).

    Unlike ``torch.cuda.graph``, a capture that fails (a host sync inside ``fn``, e.g. ``.item()``)
    leaves the process usable: the caller's stream is current again, the device allocator stops
    routing allocations to the capture's pool and releases it, and the device's random generator
    leaves capture mode. torch's context manager stops at the failed ``capture_end``, before those
    steps. Measured on torch 2.11: every later random op on the device raised "Offset increment
    outside graph capture encountered unexpectedly" until some other capture succeeded. Read in
    torch's source, not measured: replays of graphs captured earlier raise the same way (they share
    the generator state), and ``torch.cuda.empty_cache()`` keeps every cached block while the
    allocator believes a capture is under way. The pinned-host allocator's routing to a failed pool
    cannot be ended from Python, so such a pool is not accepted again (ValueError). The error raised
    is ``fn``'s own when it raised; what the recovery could not do is added to it as notes."""
    with _CAPTURE_LOCK:   # one capture at a time in the process (global capture mode, one stream per device)
        return _capture(graph, fn, pool)


def _capture(graph: torch.cuda.CUDAGraph, fn: Callable[[], Any], pool: Any) -> Any:
    if pool is not None and pool in _FAILED_POOLS:
        raise ValueError(f"pool: expected a memory pool no failed capture used, got {pool!r} (a capture into it "
                         "failed; use torch.cuda.graph_pool_handle() for a new one)")
    device = torch.cuda.current_device()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    stream = capture_stream(device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()   # cached blocks cannot be handed back while a capture is under way
    stream.wait_stream(torch.cuda.current_stream(device))
    failure: BaseException | None = None
    ended = False
    with torch.cuda.stream(stream):
        try:
            graph.capture_begin(pool=pool)
        except BaseException as error:  # noqa: BLE001  (raised below, once the process is usable again)
            failure = error
        else:
            try:
                result = fn()
            except BaseException as error:  # noqa: BLE001
                failure = error
            try:
                with torch.cuda.stream(stream):   # where it began, whatever stream fn left current
                    graph.capture_end()
                ended = True
            except BaseException as error:  # noqa: BLE001
                if failure is None:
                    failure = error
                else:   # fn's error is the cause (a sync invalidates the capture); this one follows from it
                    failure.add_note(f"then capture_end: {type(error).__name__}: {str(error)[:200]}")
    if not ended:
        _FAILED_GRAPHS.append(graph)
        _FAILED_POOLS.add(pool)
        for problem in _recover_from_failed_capture(device, pool, stream):
            failure.add_note(f"approxattn.graphs.capture could not {problem}")
    if failure is None:
        return result
    try:
        raise failure
    finally:
        failure = None   # the traceback holds this frame: no cycle keeping fn's tensors alive


def _recover_from_failed_capture(device: int, pool: Any, stream: torch.cuda.Stream) -> list[str]:
    """What ``CUDAGraph.capture_end`` skips when it raises: the device allocator's routing to ``pool``
    ends (and the failed capture's use of the pool is released), and the generator state that
    ``capture_begin`` put in capture mode leaves it, through a throwaway capture of one in-place op
    (its epilogue clears the flag on that same state object, which graphs captured earlier share).
    Best effort: returns what it could not do, for the caller's error."""
    problems = []
    error = _end_routing(device, pool)
    if error is not None:
        problems.append(f"release the failed capture's memory pool ({type(error).__name__}: {error})")
    probe, probe_pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
    ended = False
    try:
        scratch = torch.zeros(1, device=f"cuda:{device}")
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            probe.capture_begin(pool=probe_pool)
            try:
                scratch.add_(1)
            finally:
                probe.capture_end()
                ended = True
    except Exception as error:  # noqa: BLE001
        problems.append(f"take the random generator out of capture mode ({type(error).__name__}: {error})")
        if not ended:
            _FAILED_GRAPHS.append(probe)
            _FAILED_POOLS.add(probe_pool)
            _end_routing(device, probe_pool)
            _CAPTURE_STREAMS.pop(device, None)   # it may still be capturing: later captures get a fresh one
    return problems


def _end_routing(device: int, pool: Any) -> Exception | None:
    """Ends the device allocator's routing to ``pool`` and releases the failed capture's use of it, as
    ``reset()`` would after a capture that ended; nothing where there was no routing (capture_begin
    failed before it). Returns the release's error, if any."""
    try:
        torch._C._cuda_endAllocateToPool(device, pool)
    except Exception:  # noqa: BLE001
        return None
    try:
        torch._C._cuda_releasePool(device, pool)
    except Exception as error:  # noqa: BLE001
        return error
    return None


def graphed(module: AttentionModule, **options: Any) -> GraphedAttention:
    """``module`` wrapped for inference through CUDA graphs (:class:`GraphedAttention`)."""
    return GraphedAttention(module, **options)
