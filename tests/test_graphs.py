"""``approxattn.graphed``: CUDA-graph replay of a module's inference forward, eager wherever replay
does not apply. The CPU tests check the eager paths and the argument checks; the GPU tests (``-m gpu``)
check replay against the eager module on fresh inputs, re-capture after a weight update, and the
fallbacks (gradients, training mode, a forward that cannot be captured)."""

from __future__ import annotations

import pytest
import torch

import approxattn
from helpers import qkv, rel_err


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="module: expected an approxattn AttentionModule"):
        approxattn.graphed(torch.nn.Linear(2, 2))
    module = approxattn.build("linear", head_dim=8)
    for name, value in (("max_graphs", 0), ("warmup", -1), ("max_graphs", 2.5), ("warmup", True)):
        with pytest.raises(ValueError, match=name):
            approxattn.graphed(module, **{name: value})


@pytest.mark.parametrize("method", ["performer", "sea"])
def test_cpu_calls_run_the_module(method):
    """On the CPU nothing is captured: the result is the module's, bad inputs get the module's errors."""
    torch.manual_seed(0)
    module = approxattn.build(method, head_dim=16).eval()
    fast = approxattn.graphed(module)
    q, k, v = qkv(batch=1, heads=2, kv_heads=2, seq_q=64, head_dim=16, generator=torch.Generator().manual_seed(1))
    for causal in (False, True):
        assert torch.equal(fast(q, k, v, causal=causal), module(q, k, v, causal=causal))
    assert fast.captures == fast.replays == 0 and "graphs=0" in repr(fast)
    with pytest.raises(ValueError, match="head_dim"):
        fast(q[..., :8], k[..., :8], v)


class _FakeCuda:
    """The torch.cuda calls ``approxattn.graphs.capture`` makes, recorded, with graphs whose
    ``capture_end`` can fail the way an invalidated capture does (``end_fails``: how many of the
    first ends fail) and a pool release that can fail. Pool handles are pool1, pool2, ..."""

    def __init__(self, monkeypatch, *, end_fails=0, release_fails=False):
        import contextlib

        import approxattn.graphs as graphs

        self.calls: list[str] = []
        fake = self
        ends = []

        class Graph:
            def capture_begin(self, pool=None):
                fake.calls.append(f"begin {pool}")

            def capture_end(self):
                fake.calls.append("end")
                ends.append(1)
                if len(ends) <= end_fails:
                    raise RuntimeError("operation failed due to a previous error during capture")

        def release(device, pool):
            fake.calls.append(f"release {pool}")
            if release_fails:
                raise RuntimeError("no such pool")

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        handles = iter(f"pool{i}" for i in range(1, 100))
        monkeypatch.setattr(graphs, "_CAPTURE_STREAMS", {})
        monkeypatch.setattr(graphs, "_FAILED_POOLS", set())
        monkeypatch.setattr(graphs, "_FAILED_GRAPHS", [])
        for name, value in (("current_device", lambda: 0), ("graph_pool_handle", lambda: next(handles)),
                            ("synchronize", lambda device=None: None), ("empty_cache", lambda: None),
                            ("current_stream", lambda device=None: None), ("Stream", Stream),
                            ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", Graph)):
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda device, pool: fake.calls.append(f"stop {pool}"),
                            raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool", release, raising=False)
        monkeypatch.setattr(torch, "zeros", lambda *a, **k: torch.empty(1))   # the probe's scratch, on the CPU
        self.Graph, self.graphs = Graph, graphs


def _syncs():
    raise RuntimeError("operation not permitted when stream is capturing")


def test_capture_control_flow(monkeypatch):
    """Without a GPU, with torch.cuda faked: a capture that succeeds returns fn's value and recovers
    nothing; a Python error inside a valid capture needs no recovery; when fn fails and so does
    capture_end, fn's error is raised (capture_end's as a note) after the allocator's routing to the
    pool is stopped and released and a probe capture (the generator's reset) has run in a pool of its
    own; the failed pool is refused afterwards."""
    from approxattn.graphs import capture

    fake = _FakeCuda(monkeypatch)
    assert capture(fake.Graph(), lambda: 42) == 42
    assert fake.calls == ["begin pool1", "end"]

    fake = _FakeCuda(monkeypatch)
    with pytest.raises(KeyError):
        capture(fake.Graph(), lambda: {}["missing"])
    assert fake.calls == ["begin pool1", "end"]

    fake = _FakeCuda(monkeypatch, end_fails=1)
    with pytest.raises(RuntimeError, match="not permitted") as raised:
        capture(fake.Graph(), _syncs)
    assert fake.calls == ["begin pool1", "end", "stop pool1", "release pool1", "begin pool2", "end"]
    assert any("capture_end" in note for note in raised.value.__notes__)
    assert "pool1" in fake.graphs._FAILED_POOLS and len(fake.graphs._FAILED_GRAPHS) == 1
    with pytest.raises(ValueError, match="pool: expected a memory pool no failed capture used"):
        capture(fake.Graph(), lambda: 1, pool="pool1")


def test_capture_recovery_problems_become_notes(monkeypatch):
    """What the recovery cannot do is added to the capture's error, never raised in its place: a pool
    release that fails; a probe capture that fails too (its pool's routing is ended, and the capture
    stream, which may still be capturing, is dropped for a fresh one)."""
    from approxattn.graphs import capture

    fake = _FakeCuda(monkeypatch, end_fails=1, release_fails=True)
    with pytest.raises(RuntimeError, match="previous error") as raised:
        capture(fake.Graph(), lambda: 1)
    assert any("memory pool" in note for note in raised.value.__notes__)
    assert fake.calls[-2:] == ["begin pool2", "end"]   # the generator's reset still ran

    fake = _FakeCuda(monkeypatch, end_fails=2)
    with pytest.raises(RuntimeError, match="not permitted") as raised:
        capture(fake.Graph(), _syncs)
    assert any("random generator" in note for note in raised.value.__notes__)
    assert fake.calls[-4:] == ["begin pool2", "end", "stop pool2", "release pool2"]
    assert fake.graphs._CAPTURE_STREAMS == {} and {"pool1", "pool2"} <= fake.graphs._FAILED_POOLS


gpu = pytest.mark.gpu
# (method, options, causal, N). SEA non-causal at 2K: several cells a row (k·T/N = 4), its shared-budget top-k,
# which under capture takes the full search with the host's budget; at 8K: one cell a row
CASES = [("performer", {}, False, 2048), ("performer", {}, True, 2048), ("linear", {}, True, 2048),
         ("sea", {}, False, 2048), ("sea", {}, False, 8192), ("sea", {}, True, 2048),
         ("flurka-performer", {"max_len": 2048}, False, 2048)]


def _cuda_inputs(n, seed, heads=4, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(2, heads, n, 64, generator=gen, device="cuda").to(dtype) for _ in range(3))


@gpu
@pytest.mark.parametrize("method,options,causal,n", CASES)
def test_replay_matches_the_module_on_fresh_inputs(method, options, causal, n):
    """Every replay sees its own inputs (static buffers refilled; output copied out of the pool): three
    input sets through one graph each agree with the eager module on the same inputs, and an earlier
    result is not overwritten by a later replay."""
    torch.manual_seed(0)
    module = approxattn.build(method, head_dim=64, **options).cuda().eval()
    fast = approxattn.graphed(module)
    results = []
    for seed in range(3):
        q, k, v = _cuda_inputs(n, seed)
        with torch.no_grad():
            expected = module(q, k, v, causal=causal)
            got = fast(q, k, v, causal=causal)
        assert rel_err(got.float(), expected.float()) < 1e-6, seed
        results.append((got.clone(), got))
    assert fast.captures == 1 and fast.replays == 3
    assert all(torch.equal(copy, kept) for copy, kept in results)


@gpu
def test_weight_update_recaptures():
    """An in-place update of a module's weight bumps its version: the next call captures again and
    agrees with the eager module (FAVOR+'s kernels cache the projection's split by version)."""
    module = approxattn.build("performer", head_dim=64).cuda().eval()
    fast = approxattn.graphed(module)
    q, k, v = _cuda_inputs(1024, 0)
    with torch.no_grad():
        fast(q, k, v)
        module.projection.mul_(0.5)
        expected = module(q, k, v)
        assert rel_err(fast(q, k, v).float(), expected.float()) < 1e-6
    assert fast.captures == 2


@gpu
def test_eager_where_replay_does_not_apply():
    """Grad mode (inputs or the module's own parameters may want gradients), a module in training mode
    and SEA with a padding mask (its forward reads the mask's rows back on the host, which a capture
    refuses: warned once, then eager) run the module itself."""
    module = approxattn.build("performer", head_dim=64).cuda().eval()
    fast = approxattn.graphed(module)
    q, k, v = (t.requires_grad_() for t in _cuda_inputs(1024, 0))
    fast(q, k, v).float().sum().backward()
    assert q.grad is not None and fast.captures == 0
    sea = approxattn.build("sea", head_dim=64).cuda().eval()
    fast = approxattn.graphed(sea)
    q, k, v = _cuda_inputs(1024, 1)
    out = fast(q, k, v)  # grad mode, plain inputs: SEA's estimator weights still get gradients
    assert out.requires_grad and fast.captures == 0
    sea.train()
    with torch.no_grad():
        fast(q, k, v)
    assert fast.captures == 0
    sea.eval()
    mask = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
    mask[1, 700:] = False
    with torch.no_grad():
        expected = sea(q, k, v, key_padding_mask=mask)
        with pytest.warns(RuntimeWarning, match="cannot be captured"):
            first = fast(q, k, v, key_padding_mask=mask)
        second = fast(q, k, v, key_padding_mask=mask)  # remembered: no second warning, no capture
    for got in (first, second):
        assert rel_err(got.float(), expected.float()) < 1e-6
    assert fast.captures == 0 and fast.replays == 0
    # the refusal left the process usable: random draws on the device, the caller's stream current
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(8, device="cuda").normal_()


@gpu
def test_replays_from_other_streams_and_threads():
    """A replay on one stream waits for the previous replay's copies on another (they share the static
    inputs), and calls from two threads are taken one at a time: every output is its own input's."""
    import threading

    module = approxattn.build("performer", head_dim=64).cuda().eval()
    fast = approxattn.graphed(module)
    inputs = [_cuda_inputs(4096, seed) for seed in range(4)]
    with torch.no_grad():
        expected = [module(*x) for x in inputs]
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        outs = []
        for i, x in enumerate(inputs * 3):
            with torch.cuda.stream(streams[i % 2]):
                outs.append(fast(*x))
        torch.cuda.synchronize()
        for i, out in enumerate(outs):
            assert rel_err(out.float(), expected[i % 4].float()) < 1e-6, i
        results: dict[int, list] = {0: [], 1: []}

        def work(worker):
            with torch.no_grad(), torch.cuda.stream(streams[worker]):
                for i in range(8):
                    results[worker].append((i % 4, fast(*inputs[i % 4])))

        threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        torch.cuda.synchronize()
    assert fast.captures == 1 and all(len(r) == 8 for r in results.values())
    for worker_results in results.values():
        for index, out in worker_results:
            assert rel_err(out.float(), expected[index].float()) < 1e-6


@gpu
def test_failed_capture_leaves_rng_and_stream_usable():
    """torch.cuda.graph leaves the device's generator in capture mode after a capture that failed
    (a host sync inside it), so every later random op raised, and its allocator still routing to the
    failed capture's pool; approxattn.graphs.capture restores the generator (for graphs captured
    before the failure too), the allocator and the caller's stream."""
    from approxattn.graphs import capture

    x = torch.ones(16, device="cuda")
    earlier = torch.cuda.CUDAGraph()
    earlier_out = capture(earlier, lambda: torch.rand(1024, device="cuda") + x.sum())
    with pytest.raises(Exception):  # noqa: B017  (the CUDA error's type varies across torch versions)
        capture(torch.cuda.CUDAGraph(), lambda: (x * 2).sum().item())
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.manual_seed(0)
    first = torch.rand(4, device="cuda")
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4, device="cuda"), first)  # same seed, same draws: the state is intact
    draws = []
    for graph, out in ((earlier, earlier_out), (torch.cuda.CUDAGraph(), None)):
        if out is None:
            out = capture(graph, lambda: torch.rand(1024, device="cuda") + x.sum())
        for _ in range(2):
            graph.replay()   # the graph captured before the failure replays too
            draws.append(out.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[2], draws[3])  # fresh draws per replay
    # the allocator is out of capture mode: empty_cache hands a freed block back
    torch.cuda.synchronize()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    reserved = torch.cuda.memory_reserved()
    del block
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() < reserved
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_collecting_keeps_what_caches_hand_out():
    """approxattn.cached: values handed out inside a collection are recorded (nested collections both
    get them), outside none is."""
    from approxattn.cached import collecting, handed_out

    marker = object()
    handed_out(marker)
    with collecting() as outer:
        with collecting() as inner:
            assert handed_out(marker) is marker
        handed_out(1)
    assert outer == [marker, 1] and inner == [marker]


@gpu
def test_replay_survives_cache_eviction():
    """A captured SEA graph reads the cached layout, split weights and resize matrix; evicting them from
    their caches and filling fresh allocations with junk must not change the replay (the graph keeps
    what it was handed)."""
    from approxattn.blocks import sea_estimator, sparse_attention
    from approxattn.blocks.sparse_attention import column_layout
    from approxattn.kernels import config

    sea = approxattn.build("sea", head_dim=64).cuda().eval()
    fast = approxattn.graphed(sea)
    q, k, v = _cuda_inputs(1024, 0)
    with torch.no_grad():
        expected = sea(q, k, v)
        fast(q, k, v)
        for n in range(1000, 1040):
            column_layout(2, n, n, 128, causal=False, device="cuda")
        sparse_attention._unpadded_layout.cache_clear()
        sea_estimator._cached_interpolation_matrix.cache_clear()
        config._SPLITS.clear()
        torch.cuda.empty_cache()
        junk = [torch.full((1 << 20,), -5, device="cuda", dtype=torch.int64) for _ in range(64)]
        got = fast(q, k, v)
    del junk
    assert fast.captures == 1 and rel_err(got.float(), expected.float()) < 1e-6


@gpu
def test_inference_mode_and_autocast():
    """Captured under torch.inference_mode, replayed there, and a no_grad call of the same shapes is
    another signature (static buffers are ordinary tensors either way); under autocast: eager."""
    module = approxattn.build("sea", head_dim=64).cuda().eval()
    fast = approxattn.graphed(module)
    q, k, v = _cuda_inputs(1024, 3)
    with torch.no_grad():
        expected = module(q, k, v, causal=True)
    with torch.inference_mode():
        first = fast(q, k, v, causal=True)
        again = fast(q, k, v, causal=True)
    with torch.no_grad():
        plain = fast(q, k, v, causal=True)
        with torch.autocast("cuda", dtype=torch.float16):
            fast(q, k, v, causal=True)
    for got in (first, again, plain):
        assert rel_err(got.float(), expected.float()) < 1e-6
    assert fast.captures == 2 and fast.replays == 3


def test_tensor_keyed_cache():
    """The cache behind FAVOR's split weights and SEA's host budgets: a hit needs the same live tensor at the
    same version (and the same extra key parts); inference tensors (no version counter) are taken; past its
    limit it starts afresh."""
    from approxattn.cached import TensorKeyedCache

    cache = TensorKeyedCache(limit=2)
    t = torch.zeros(3)
    assert cache.put(t, "a", 1) == "a" and cache.get(t, 1) == "a"
    assert cache.get(t, 2) is None and cache.get(torch.zeros(3), 1) is None
    t.add_(1)  # written in place: a new version, the old value is stale
    assert cache.get(t, 1) is None
    with torch.inference_mode():
        frozen = torch.ones(2)
    cache.put(frozen, "b")
    assert cache.get(frozen) == "b"
    cache.put(t, "c", 1)  # a third entry at the limit of two: the cache starts afresh
    assert len(cache) == 1 and cache.get(frozen) is None and cache.get(t, 1) == "c"
