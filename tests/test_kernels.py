"""Fused Triton kernels against their PyTorch twins: outputs and every gradient.

On CPU the kernels run under ``TRITON_INTERPRET=1`` at tiny sizes; on a GPU (``-m gpu``) they
run compiled at real sizes. Every output is poisoned (``torch.empty`` returns NaNs), so an
element a kernel fails to write fails the comparison. Thresholds: relative error < 1e-4 in
fp32 and < 1e-2 in bf16, against the fp64 twin on the same (rounded) inputs.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# conftest.py switches Triton to its interpreter on CPU, before any test module is imported

import approxattn  # noqa: E402
from approxattn.kernels import FeatureConfig, feature_attention, naive_feature_attention  # noqa: E402
from approxattn.kernels import dispatch  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled tensors, so unwritten outputs fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty_like(*args, **kwargs):
        out = empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten or overflowed)"
    return float((out - ref).norm() / ref.norm())


def make_cfg(feature, d, m, *, stabilize=True, generator=None, eps=1e-6):
    if feature == "elu":
        return FeatureConfig("elu", den_eps=1e-6)
    projection = torch.randn(m, d, generator=generator)
    if feature == "relu":
        return FeatureConfig("relu", projection, x_scale=d**-0.25, eps=1e-3)
    return FeatureConfig("favor", projection, x_scale=d**-0.25, ratio=m**-0.5, eps=eps, stabilize=stabilize)


def inputs(B, HQ, HKV, N, NK, d, dv, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, N, d, generator=gen) * 0.8
    k = torch.randn(B, HKV, NK, d, generator=gen) * 0.8
    v = torch.randn(B, HKV, NK, dv, generator=gen)
    do = torch.randn(B, HQ, N, dv, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)], gen


def check(feature, dtype, *, causal, B=2, HQ=4, HKV=2, N=48, NK=None, d=16, dv=16, m=32, padding=None,
          stabilize=True, device="cpu", seed=0, tol=None, key_ramp=None, eps=1e-6):
    NK = N if NK is None else NK
    (q, k, v, do), gen = inputs(B, HQ, HKV, N, NK, d, dv, dtype, device, seed)
    if key_ramp is not None:  # keys growing along the sequence: the causal prefix max keeps rising
        k = (k.float() * torch.linspace(*key_ramp, NK, device=device)[:, None]).to(dtype)
    cfg = make_cfg(feature, d, m, stabilize=stabilize, generator=gen, eps=eps)
    if cfg.projection is not None:
        cfg = FeatureConfig(**{**cfg.__dict__, "projection": cfg.projection.to(device)})
    mask = None
    if padding is not None:
        mask = torch.ones(B, NK, dtype=torch.bool, device=device)
        mask[0, NK - padding:] = False
        if not causal:  # a causal row with no valid key before it has no defined output
            mask[-1, :3] = False
    fast = [t.clone().requires_grad_() for t in (q, k, v)]
    out = feature_attention(*fast, cfg, causal=causal, key_padding_mask=mask)
    assert out.dtype == dtype and out.shape == (B, HQ, N, dv)
    out.backward(do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = naive_feature_attention(*ref_in, cfg, causal=causal, key_padding_mask=mask)
    ref.backward(do.double())
    tol = TOL[dtype] if tol is None else tol
    errors = {"out": rel_err(out, ref)}
    for name, a, b in zip("qkv", fast, ref_in):
        errors["d" + name] = rel_err(a.grad, b.grad)
    assert max(errors.values()) < tol, errors
    return errors


# ----------------------------------------------------------------------------- CPU (interpreter)

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run where there is no GPU")


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["elu", "favor", "relu"])
def test_noncausal_fp32_gqa_padding_cross_lengths(feature):
    check(feature, torch.float32, causal=False, N=37, NK=50, padding=9, m=150)  # 3 feature blocks, last partial


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["elu", "favor"])
def test_noncausal_bf16(feature):
    check(feature, torch.bfloat16, causal=False, B=1, HQ=2, HKV=1, N=64, d=32, dv=32, m=64)


@needs_triton
@cpu_only
def test_noncausal_odd_sizes_unstabilised():
    check("favor", torch.float32, causal=False, B=1, HQ=3, HKV=3, N=21, d=12, dv=20, m=24, stabilize=False)


QUERY_BACKWARDS = ["split", "fused", "auto"]


@pytest.fixture(params=QUERY_BACKWARDS)
def query_backward(request, monkeypatch):
    """Both ways of the non-causal backward's query side (``linear_attn.QUERY_BACKWARD``), with
    fresh plan caches."""
    from approxattn.kernels import linear_attn
    from approxattn.kernels._launch import PlanCache

    monkeypatch.setattr(linear_attn, "QUERY_BACKWARD", request.param)
    monkeypatch.setattr(linear_attn, "_FORWARD_PLANS", PlanCache())
    monkeypatch.setattr(linear_attn, "_BACKWARD_PLANS", PlanCache())
    return request.param


@needs_triton
@pytest.mark.parametrize("feature,m", [("elu", 16), ("favor", 24), ("favor", 150), ("relu", 256), ("favor", 257),
                                       ("favor", 320)])
def test_noncausal_backward_query_launches(feature, m, query_backward):
    """Every feature width: dq from ``_q_bwd_fused`` over (query head, query split), with the partial
    dS, dz in the same sweep ("fused") or from ``_dstate_bwd`` over (query head × feature block,
    query split) ("split")."""
    from approxattn.kernels import linear_attn

    (q, k, v, do), gen = inputs(1, 4, 2, 40, 40, 16, 16, torch.float32, "cpu", 0)
    cfg = make_cfg(feature, 16, m, generator=gen)
    plan = linear_attn._BackwardPlan(do, q, k, v, None, cfg)
    assert plan.q_bwd.fn is linear_attn._q_bwd_fused
    assert plan.q_bwd.grid[0] == 4
    blocks = linear_attn.feature_blocks(cfg, 16, 16)[2]
    fused = query_backward == "fused" or (query_backward == "auto" and blocks == 1)
    assert plan.q_bwd.meta["STATE"] == fused
    if fused:
        assert plan.dstate is None
    else:
        assert plan.dstate.fn is linear_attn._dstate_bwd and plan.dstate.grid[0] == 4 * blocks


@needs_triton
@cpu_only
def test_noncausal_query_backward_320_features(query_backward):
    """Five feature blocks (the last partial): summed by _dstate_bwd (split, auto) or in the
    one-sweep kernel's record (fused)."""
    check("favor", torch.float32, causal=False, N=37, NK=50, padding=9, m=320)


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["elu", "favor"])
def test_noncausal_one_feature_block_either_way(feature, query_backward):
    """One feature block (ELU; FAVOR+ m = 32) through each query backward: _dstate_bwd is
    checked numerically here too, not only at several blocks."""
    check(feature, torch.float32, causal=False, B=1, HQ=4, HKV=2, N=40, NK=33, padding=5)


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["favor", "relu"])
def test_noncausal_backward_gqa_split_ragged_rows(feature, query_backward, monkeypatch):
    """The query backward with 4 query heads on 2 key/value heads, four feature blocks (m = 256;
    fused: summed in the split's record, one block in registers being the ELU and m ≤ 64 tests
    above) and two query splits, the second ending in a partial row block (N = 300 = 256 + 44)."""
    from approxattn.kernels import linear_attn

    monkeypatch.setattr(linear_attn, "num_programs_hint", lambda device: 64)  # splits of 256 rows
    check(feature, torch.float32, causal=False, B=1, HQ=4, HKV=2, N=300, NK=90, padding=11, m=256)
    (plan,) = linear_attn._BACKWARD_PLANS.values()
    assert plan.q_bwd.grid == (4, 2)
    if query_backward != "fused":  # auto: four feature blocks, split
        assert plan.dstate.grid == (16, 2)


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["favor", "relu"])
def test_noncausal_key_splits_rising_keys(feature, monkeypatch):
    """The key state summed over three key splits (600 keys, splits of 256, the last partial and
    padded) and two feature blocks (m = 96, the second partial); keys whose logits rise along N,
    so FAVOR's per-feature offsets differ between splits and features and the combine must
    bring them to one maximum."""
    from approxattn.kernels import linear_attn
    from approxattn.kernels._launch import PlanCache

    monkeypatch.setattr(linear_attn, "num_programs_hint", lambda device: 64)
    monkeypatch.setattr(linear_attn, "_FORWARD_PLANS", PlanCache())
    monkeypatch.setattr(linear_attn, "_BACKWARD_PLANS", PlanCache())
    check(feature, torch.float32, causal=False, B=1, HQ=2, HKV=1, N=40, NK=600, m=96, padding=9,
          key_ramp=(0.3, 2.5))
    (plan,) = linear_attn._FORWARD_PLANS.values()
    assert plan.state.grid == (2, 3)


@needs_triton
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncausal_favor_large_eps(dtype):
    """ε = 0.05: the ε part of φ(q) (``ratio·ε·Σ_m S_m``, from the combine's per-block column sums)
    is visible (ε = 1e-6 hides it); two feature blocks, the second partial."""
    check("favor", dtype, causal=False, B=1, HQ=4, HKV=2, N=48, NK=40, padding=5, m=96, eps=0.05)


@needs_triton
@cpu_only
def test_combine_writes_state_halves_and_sums():
    """``_combine_parts`` alone: the combined record, S's bf16 halves (hi the nearest bf16 of S,
    hi + lo within 2⁻¹⁶ of it) and each feature block's column sums of S and z."""
    from approxattn.kernels import linear_attn

    gen = torch.Generator().manual_seed(3)
    outputs, sources, m, dv, BMB, BDV = 2, 3, 80, 16, 64, 16
    NMB = -(-m // BMB)
    rec = linear_attn.record_size(m, dv)
    parts = torch.randn(outputs * sources, rec, generator=gen) * 3
    buffers = linear_attn.StateBuffers(outputs, m, dv, NMB, BDV, halves=True)
    records, halves, sums, tail = buffers.allocate("cpu")
    assert tail.numel() == 0
    launch = linear_attn.combine_launch(outputs, sources, m, dv, BMB, BDV, NMB, mult=0.5, const=0.25,
                                        use_max=False, device=torch.device("cpu"), halves=True, sums=True)
    launch(parts.view(-1), records, halves, sums)
    p = parts.double().view(outputs, sources, rec)
    A = 0.5 * p[..., : m * dv].sum(1).view(outputs, m, dv) + 0.25 * p[..., m * dv + m: m * dv + m + dv].sum(1)[:, None]
    z = 0.5 * p[..., m * dv: m * dv + m].sum(1) + 0.25 * p[..., m * dv + m + dv].sum(1)[:, None]
    got = records.view(outputs, rec).double()
    assert rel_err(got[:, : m * dv].view(outputs, m, dv), A) < 1e-6
    assert rel_err(got[:, m * dv: m * dv + m], z) < 1e-6
    hi, lo = halves.view(outputs, 2, m, dv).unbind(1)
    assert torch.equal(hi, got[:, : m * dv].view(outputs, m, dv).float().to(torch.bfloat16))
    assert rel_err(hi.double() + lo.double(), A) < 2.0**-16
    col = sums[: outputs * NMB * (BDV + 1)].view(outputs, NMB, BDV + 1).double()
    for blk in range(NMB):
        rows = slice(blk * BMB, min(m, (blk + 1) * BMB))
        assert rel_err(col[:, blk, :dv], A[:, rows].sum(1)) < 1e-6
        assert rel_err(col[:, blk, BDV], z[:, rows].sum(1)) < 1e-6


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["elu", "relu"])
def test_causal_fp32_gqa_padding(feature):
    check(feature, torch.float32, causal=True, N=45, padding=7)


@needs_triton
@cpu_only
def test_causal_favor_prefix_max_fp32_gqa_padding():
    """The no-look-ahead stabiliser: running prefix max over key rows, rescaled states."""
    check("favor", torch.float32, causal=True, N=45, padding=7)


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["favor", "elu"])
def test_causal_segments_rising_keys(feature):
    """One query head: several segments (scans across them), keys whose logits rise along N."""
    check(feature, torch.float32, causal=True, B=1, HQ=1, HKV=1, N=100, padding=5, key_ramp=(0.3, 2.5))


@needs_triton
@cpu_only
def test_causal_segments_rising_keys_two_feature_blocks():
    """Segments scanned with FAVOR's prefix max over two feature blocks (m = 96, the second
    partial): every segment's offsets per feature, from both blocks, join the running maximum."""
    check("favor", torch.float32, causal=True, B=1, HQ=1, HKV=1, N=100, m=96, padding=5, key_ramp=(0.3, 2.5))


@needs_triton
@cpu_only
def test_causal_bf16_elu():
    check("elu", torch.bfloat16, causal=True, B=1, HQ=2, HKV=1, N=70, d=32, dv=32)


@pytest.fixture
def chunked_causal(monkeypatch):
    """Causal calls go to the chunk-parallel kernels; yields their plan cache (to see them used)."""
    from approxattn.kernels import causal_chunked

    monkeypatch.setattr(causal_chunked, "CAUSAL_KERNEL", "chunk")
    monkeypatch.setattr(causal_chunked, "_PLANS", causal_chunked.PlanCache())
    yield causal_chunked._PLANS
    assert causal_chunked._PLANS, "the chunk-parallel kernels were not used"


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["elu", "relu", "favor"])
def test_causal_chunked_fp32_gqa_padding(feature, chunked_causal):
    check(feature, torch.float32, causal=True, N=45, padding=7, stabilize=False)


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["relu", "favor"])
def test_causal_chunked_segments_two_feature_blocks(feature, chunked_causal):
    """One head, several segments (scans across them) and chunks, m = 96: a full feature block and a
    partial one; keys rising along N."""
    check(feature, torch.float32, causal=True, B=1, HQ=1, HKV=1, N=100, m=96, padding=5, key_ramp=(0.3, 2.5),
          stabilize=False)


@needs_triton
@cpu_only
def test_causal_chunked_prefix_max_fp32_gqa_padding(chunked_causal):
    """FAVOR+ with the no-look-ahead stabiliser, chunk-parallel."""
    check("favor", torch.float32, causal=True, N=45, padding=7)


@needs_triton
@cpu_only
@pytest.mark.parametrize("m", [32, 96])
def test_causal_chunked_prefix_max_segments_rising_keys(m, chunked_causal):
    """Keys rising along N, so the prefix max moves within and across chunks and segments; m = 96:
    each query row's max over two feature blocks taken as a running max."""
    check("favor", torch.float32, causal=True, B=1, HQ=1, HKV=1, N=100, m=m, padding=5, key_ramp=(0.3, 2.5))


@needs_triton
@cpu_only
@pytest.mark.parametrize("feature", ["relu", "favor"])
def test_causal_chunked_head_groups(feature, chunked_causal, monkeypatch):
    """States stored for one key/value head at a time (a budget too small for more): four groups in
    turn, each with its query heads (GQA), the prefix max (favor) and padding."""
    from approxattn.kernels import causal_chunked

    monkeypatch.setattr(causal_chunked, "STATE_BUDGET", 1e-6)
    check(feature, torch.float32, causal=True, N=45, m=40, padding=7, key_ramp=(0.3, 2.5))
    assert [plan.groups for plan in chunked_causal.values()] == [[0, 1, 2, 3]]


def test_kv_group_size():
    from approxattn.kernels.causal_chunked import kv_group_size

    assert kv_group_size(16, 4 * 100, 100) == 8  # states 4× q's bytes, budget 2×: two groups
    assert kv_group_size(16, 2 * 100, 100) == 16
    assert kv_group_size(6, 5 * 100, 100) == 2  # three groups: the fewest dividing the heads
    assert kv_group_size(5, 9 * 100, 100) == 1


@needs_triton
@cpu_only
@pytest.mark.parametrize("stabilize", [False, True], ids=["unstabilised", "prefix_max"])
def test_causal_chunked_future_tokens_change_nothing_before(stabilize, chunked_causal):
    """Causal canary through the chunk kernels: new q, k, v after row i (inside i's chunk and in later
    chunks and segments, keys larger than any before: the prefix max moves) leave rows ≤ i as they were,
    and a loss on rows ≤ i sends no gradient to the rows after."""
    (q, k, v, _), gen = inputs(1, 2, 1, 100, 100, 16, 16, torch.float32, "cpu", seed=7)
    cfg = make_cfg("favor", 16, 96, stabilize=stabilize, generator=gen)
    i = 37  # inside a 16-row chunk under the interpreter
    late = torch.arange(100) > i
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    q2[:, :, late] = torch.randn(q2[:, :, late].shape, generator=gen)
    k2[:, :, late] = 3.0 * torch.randn(k2[:, :, late].shape, generator=gen)
    v2[:, :, late] = torch.randn(v2[:, :, late].shape, generator=gen)
    fast = [t.clone().requires_grad_() for t in (q, k, v)]
    out = feature_attention(*fast, cfg, causal=True)
    out2 = feature_attention(q2, k2, v2, cfg, causal=True)
    assert rel_err(out2[:, :, : i + 1], out[:, :, : i + 1]) < 1e-6
    assert rel_err(out2[:, :, late], out[:, :, late]) > 1e-2  # the change did reach the later rows
    out[:, :, : i + 1].sum().backward()
    for t in fast:
        assert torch.isfinite(t.grad).all() and t.grad[:, :, late].abs().max() == 0
        assert t.grad[:, :, : i + 1].abs().max() > 0


@needs_triton
@cpu_only
def test_causal_chunked_prefix_max_large_eps(chunked_causal):
    """FAVOR's ε = 0.05 (1e-6 elsewhere hides the ε parts, carried apart from the offset states)."""
    check("favor", torch.float32, causal=True, B=1, HQ=2, HKV=1, N=100, m=40, padding=5, key_ramp=(0.3, 2.5), eps=0.05)


@needs_triton
@cpu_only
def test_causal_chunked_prefix_max_bf16_gqa(chunked_causal):
    check("favor", torch.bfloat16, causal=True, B=1, HQ=2, HKV=1, N=70, d=32, dv=32, m=80, key_ramp=(0.5, 1.5))


@needs_triton
@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_causal_chunked_half(dtype, chunked_causal):
    """Half inputs: the per-chunk states stored in bf16 (both dtypes), GQA over two segments."""
    check("relu", dtype, causal=True, B=1, HQ=2, HKV=1, N=70, d=32, dv=32, m=80)


def test_causal_chunked_takes_wide_maps(monkeypatch):
    from approxattn.kernels import causal_chunked

    wide = make_cfg("relu", 64, 256)
    monkeypatch.setattr(causal_chunked, "CAUSAL_KERNEL", "auto")
    assert causal_chunked.takes(wide, 64)
    assert not causal_chunked.takes(make_cfg("elu", 64, 64), 64)  # one feature block: the scan holds it
    assert causal_chunked.takes(make_cfg("favor", 64, 256), 64)  # with the prefix-max stabiliser too
    assert causal_chunked.takes(make_cfg("favor", 64, 256, stabilize=False), 64)
    assert not causal_chunked.takes(make_cfg("favor", 64, 64), 64)
    monkeypatch.setattr(causal_chunked, "CAUSAL_KERNEL", "scan")
    assert not causal_chunked.takes(wide, 64)


@needs_triton
@cpu_only
def test_modules_dispatch_to_kernels(monkeypatch):
    """The modules' fused path (forced on CPU) agrees with their reference path."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 24, 16, generator=gen)
    k = torch.randn(2, 2, 24, 16, generator=gen)
    v = torch.randn(2, 2, 24, 16, generator=gen)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 20:] = False
    cases = [
        ("performer", dict(num_features=32), False),
        ("performer", dict(num_features=16, kernel="softmax-hyperbolic"), False),
        ("performer", dict(num_features=32, kernel="relu"), True),
        ("performer", dict(num_features=32), True),  # causal FAVOR+ with the prefix-max stabiliser
        ("linear", {}, True),
        ("flurka-performer", dict(num_features=32, rank=8), False),
    ]
    for method, options, causal in cases:
        module = approxattn.build(method, head_dim=16, **options)
        with monkeypatch.context() as mp:
            mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
            ref = module(q, k, v, causal=causal, key_padding_mask=mask)
        calls = []
        with monkeypatch.context() as mp:
            mp.setenv("APPROXATTN_FORCE_KERNELS", "1")
            mp.setattr(dispatch, "supported", lambda *a, _s=dispatch.supported: calls.append(1) or _s(*a))
            out = module(q, k, v, causal=causal, key_padding_mask=mask)
        assert calls, f"{method}: fused path not taken"
        assert rel_err(out, ref) < 1e-4, (method, options)


interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors through the interpreter")


def _fused_against_reference(monkeypatch, module, q, k, v, do, **call) -> list[float]:
    """Relative errors of the output, dq, dk and dv: ``module`` on the fused path (forced on CPU tensors)
    against the same module with the kernels disabled."""
    results, calls = [], []
    for fused in (True, False):
        with monkeypatch.context() as mp:
            mp.setenv("APPROXATTN_FORCE_KERNELS" if fused else "APPROXATTN_DISABLE_KERNELS", "1")
            mp.setattr(dispatch, "supported", lambda *a, _s=dispatch.supported: calls.append(fused) or _s(*a))
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            out = module(*ins, **call)
            out.backward(do)
            results.append([out] + [t.grad for t in ins])
    assert calls == [True], "the fused path was not taken (or the reference took it)"
    return [rel_err(a, b) for a, b in zip(*results)]


@needs_triton
@interpreter_only
def test_flurka_linear_bf16_gradients_survive_the_cancellation(monkeypatch):
    """Mean-pooled FLuRKA keys make each row's attention nearly uniform, so dq's two terms
    (do·S and (do·o)z) cancel ~7×, and elu+1 features sit near 1, where a bf16 operand keeps ~2⁻⁸ of
    the deviation that carries the attention. Before do·o came from the fp32 features and the state
    sweep split its features into bf16 halves, dq was 4.5e-2 off the fp32 reference here (1.9e-2 at
    the GPU test's shape); the other outputs were within 6e-3 then too. On CUDA
    test_gpu_modules_match_reference checks it."""
    (q, k, v, do), _ = inputs(1, 2, 1, 512, 512, 64, 64, torch.bfloat16, "cpu", 7)
    mask = torch.ones(1, 512, dtype=torch.bool)
    mask[0, 480:] = False
    module = approxattn.build("flurka-linear", head_dim=64, rank=32)
    errors = _fused_against_reference(monkeypatch, module, q, k, v, do, key_padding_mask=mask)
    assert max(errors) < 1e-2, errors


def _causal_small_key_errors(monkeypatch, mode: str, device: str = "cpu", n: int = 512, padded: bool = False
                             ) -> list[float]:
    """Relative errors of the output, dq, dk, dv: causal elu+1 with keys and values x 0.25, fused (``mode``)
    against the reference; ``padded``: the last eighth of the keys masked."""
    from approxattn.kernels import causal_linear_attn

    monkeypatch.setattr(causal_linear_attn, "CAUSAL_DQ", mode)
    monkeypatch.setattr(causal_linear_attn, "_PLANS", causal_linear_attn.PlanCache())  # no plan of the other mode
    (q, k, v, do), _ = inputs(1, 2, 1, n, n, 64, 64, torch.bfloat16, device, 7)
    k, v = (k.float() * 0.25).bfloat16(), (v.float() * 0.25).bfloat16()
    mask = None
    if padded:
        mask = torch.ones(1, n, dtype=torch.bool, device=device)
        mask[0, n - n // 8:] = False
    return _fused_against_reference(monkeypatch, approxattn.build("linear", head_dim=64), q, k, v, do, causal=True,
                                    key_padding_mask=mask)


@needs_triton
@interpreter_only
def test_causal_exact_dq_future_tokens_change_nothing_before(monkeypatch):
    """Causal canary through the segment scan's EXACT dq (bf16 elu+1, the only inputs that take it): new q, k, v
    after row i leave every gradient a loss on rows ≤ i sends to rows ≤ i as it was, and send nothing after i;
    the same as the fast dq to bf16 rounding."""
    from approxattn.kernels import causal_linear_attn

    monkeypatch.setattr(causal_linear_attn, "_PLANS", causal_linear_attn.PlanCache())
    (q, k, v, _), gen = inputs(1, 2, 1, 100, 100, 64, 64, torch.bfloat16, "cpu", seed=3)
    i, late = 37, torch.arange(100) > 37
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, late] = torch.randn(t[:, :, late].shape, generator=gen).bfloat16()
    module = approxattn.build("linear", head_dim=64)
    grads = {}
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    for mode in ("exact", "fast"):
        monkeypatch.setattr(causal_linear_attn, "CAUSAL_DQ", mode)
        for name, inputs_ in (("same", (q, k, v)), ("changed", (q2, k2, v2))):
            causal_linear_attn._PLANS.clear()
            ins = [t.clone().requires_grad_() for t in inputs_]
            module(*ins, causal=True)[:, :, : i + 1].float().sum().backward()
            grads[mode, name] = [t.grad for t in ins]
    for same, changed in zip(grads["exact", "same"], grads["exact", "changed"]):
        assert torch.equal(same[:, :, : i + 1], changed[:, :, : i + 1]) and changed[:, :, late].abs().max() == 0
    assert rel_err(grads["exact", "same"][0], grads["fast", "same"][0]) < 1e-2  # dq


@needs_triton
@interpreter_only
@pytest.mark.xfail(strict=True, reason=(
    "measured under the interpreter: causal elu+1 bf16 dq 1.5e-2 against the fp32 reference with keys and values "
    "scaled by 0.25 (6.3e-3 unscaled) in the opt-in APPROXATTN_CAUSAL_DQ=fast mode. It reads the stored (bf16) o "
    "for do·o and rounds elu+1 features (near 1) to bf16 in its dots; float64 emulation gives 1.0e-2 and 0.94e-2 "
    "for each alone. The default (exact, next test) fixes both for +2 % of causal elu+1's fwd+bwd on an H100"))
def test_causal_elu_bf16_fast_dq_with_small_keys(monkeypatch):
    """Small keys (e.g. at initialisation) make causal elu+1 attention nearly uniform, so dq's terms
    cancel as in the FLuRKA-linear test above: the fast dq's known error, kept as a strict xfail so a change that
    mends or worsens it is seen."""
    assert _causal_small_key_errors(monkeypatch, "fast")[1] < 1e-2


@needs_triton
@interpreter_only
def test_causal_elu_bf16_exact_dq_with_small_keys(monkeypatch):
    """The segment scan's EXACT dq (the default, ``APPROXATTN_CAUSAL_DQ=exact``): 7e-5 where fast is 1.5e-2."""
    for padded in (False, True):
        errors = _causal_small_key_errors(monkeypatch, "exact", padded=padded)
        assert max(errors) < 1e-2 and errors[1] < 1e-3, (padded, errors)


# ----------------------------------------------------------------------------- dispatch rules


def test_reference_path_without_cuda_or_triton(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("APPROXATTN_FORCE_KERNELS", raising=False)
    assert not dispatch.kernels_enabled(t)
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    assert not dispatch.kernels_enabled(t)


def test_causal_favor_with_prefix_max_is_fused():
    module = approxattn.build("performer", head_dim=8, num_features=16)
    q = torch.randn(1, 1, 8, 8)
    cfg = dispatch.performer_config(module, 8**-0.5)
    assert cfg.use_key_max
    assert dispatch.supported(cfg, q, q, q, causal=True)


test_causal_favor_with_prefix_max_is_fused = needs_triton(test_causal_favor_with_prefix_max_is_fused)


# ----------------------------------------------------------------------------- GPU, real sizes

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@needs_cuda
@needs_triton
def test_gpu_causal_elu_dq_with_small_keys(monkeypatch):
    """The interpreter's small-key case at 4,096 tokens on the GPU, where split dots are bf16 halves (not exact fp32
    as there): EXACT's dq within 3e-3 of the fp32 reference (the other gradients' level; the bf16 store of dq alone
    flips some last bits against the reference's) and a third of the fast dq's at most (1.5e-2 interpreted)."""
    fast = _causal_small_key_errors(monkeypatch, "fast", device="cuda", n=4096)
    exact = _causal_small_key_errors(monkeypatch, "exact", device="cuda", n=4096)
    print(f"causal elu+1, keys x0.25, N=4096: out, dq, dk, dv errors fast {fast}, exact {exact}")
    assert exact[1] < 3e-3 and exact[1] < fast[1] / 3 and max(exact) < 1e-2, (fast, exact)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("feature,m", [("elu", 64), ("favor", 256), ("relu", 256)])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gpu_real_sizes(feature, m, dtype, causal):
    # causal FAVOR+: the prefix-max stabiliser, keys rising along N so that the prefix max moves
    check(feature, dtype, causal=causal, B=2, HQ=8, HKV=4, N=4096, d=64, dv=64, m=m, padding=300, device="cuda",
          key_ramp=(0.5, 1.5) if causal and feature == "favor" else None)


@gpu
@pytest.mark.gpu_heavy  # the reference's autograd at N = 65,536 takes ~50 GB (run 7: OOM beside 7 other workers)
@needs_cuda
@needs_triton
@pytest.mark.parametrize("feature,m", [("favor", 256), ("relu", 256), ("favor", 512)])
def test_gpu_headline_shape_noncausal(feature, m):
    # the benchmark's shape: long key and query splits, several feature blocks (the split query
    # backward; the one-sweep kernel's record at this shape is the test below)
    check(feature, torch.bfloat16, causal=False, B=1, HQ=16, HKV=16, N=65536, d=64, dv=64, m=m, device="cuda")


@gpu
@pytest.mark.gpu_heavy
@needs_cuda
@needs_triton
def test_gpu_headline_shape_fused_query_backward(monkeypatch):
    """The same with the query backward's state sums fused into the dq sweep: 64 row blocks a
    split read-modify-writing its dS record, where an ordering bug between row blocks would show."""
    from approxattn.kernels import linear_attn

    monkeypatch.setattr(linear_attn, "QUERY_BACKWARD", "fused")
    monkeypatch.setattr(linear_attn, "_BACKWARD_PLANS", linear_attn.PlanCache())
    check("favor", torch.bfloat16, causal=False, B=1, HQ=16, HKV=16, N=65536, d=64, dv=64, m=256, device="cuda")


@gpu
@needs_cuda
@needs_triton
def test_gpu_causal_favor_unstabilised():
    check("favor", torch.bfloat16, causal=True, B=2, HQ=8, HKV=4, N=4096, d=64, dv=64, m=256, padding=300,
          device="cuda", stabilize=False)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("feature,m,stabilize", [("elu", 64, False), ("favor", 256, False), ("relu", 200, False),
                                                ("favor", 200, True)])
def test_gpu_causal_chunked(feature, m, stabilize, dtype, chunked_causal):
    """The chunk-parallel causal kernels at real sizes (forced, so elu+1 too): GQA, padding, several
    segments; m = 200 leaves the last feature block partial; FAVOR+'s prefix max with rising keys."""
    check(feature, dtype, causal=True, B=2, HQ=8, HKV=4, N=4096, d=64, dv=64, m=m, padding=300, device="cuda",
          stabilize=stabilize, key_ramp=(0.5, 1.5) if stabilize else None)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gpu_cached_launches(causal):
    """Repeated calls of one layout take the cached direct launches; each is checked afresh."""
    from approxattn.kernels import _launch

    for seed in range(3):
        check("favor", torch.bfloat16, causal=causal, B=1, HQ=4, HKV=2, N=1500, d=64, dv=64, m=128,
              device="cuda", seed=seed)
    assert _launch.DIRECT_LAUNCH, "the direct launch path was switched off (Triton's launcher refused it)"


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("feature,causal", [("favor", False), ("relu", True)], ids=["noncausal", "causal"])
def test_gpu_wide_values(feature, causal, dtype):
    """SEA's estimator shape: values with the positional probe (dv = 2d = 128) and 33 features, in fp32
    as distillation runs it. The state sweep's tuned launch (BN 128, 3 stages) asked for 240 KiB of
    shared memory there (an H200 has 227): launches now retry with fewer stages."""
    check(feature, dtype, causal=causal, B=1, HQ=4, HKV=2, N=2048, d=64, dv=128, m=33, padding=100,
          device="cuda")


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gpu_fp16_and_odd_sizes(causal):
    check("elu", torch.float16, causal=causal, B=1, HQ=4, HKV=1, N=1000, d=60, dv=48, device="cuda")
    if not causal:
        check("favor", torch.float16, causal=False, B=1, HQ=4, HKV=2, N=777, NK=1500, d=64, dv=64, m=266,
              device="cuda")


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("method,options,causal", [
    ("performer", {"num_features": 256}, False),
    ("performer", {"num_features": 128, "kernel": "softmax-hyperbolic"}, False),
    ("performer", {"num_features": 256, "kernel": "relu"}, True),
    ("linear", {}, True),
    ("linear", {}, False),
    ("flurka-performer", {"num_features": 64, "rank": 128}, False),
    ("flurka-linear", {"rank": 128}, False),  # dq was 1.9e-2 (H100) before the fix its CPU test describes
])
def test_gpu_modules_match_reference(method, options, causal, monkeypatch):
    """Modules on CUDA (fused path) against the same modules with APPROXATTN_DISABLE_KERNELS=1."""
    (q, k, v, do), _ = inputs(2, 8, 4, 2048, 2048, 64, 64, torch.bfloat16, "cuda", 7)
    mask = torch.ones(2, 2048, dtype=torch.bool, device="cuda")
    mask[1, 1900:] = False
    module = approxattn.build(method, head_dim=64, **options).cuda()
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = module(*ins, causal=causal, key_padding_mask=mask)
    out.backward(do)
    with monkeypatch.context() as mp:
        mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = module(*ref_in, causal=causal, key_padding_mask=mask)
        ref.backward(do)
    errors = [rel_err(out, ref)] + [rel_err(a.grad, b.grad) for a, b in zip(ins, ref_in)]
    assert max(errors) < 1e-2, errors


def _bad_feature_calls():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 16)
    w = torch.randn(32, 16)
    favor = FeatureConfig("favor", w, x_scale=16**-0.25, ratio=32**-0.5, eps=1e-6)
    mask = torch.ones(1, 8, dtype=torch.bool)
    return [
        (TypeError, "q:", (q.double(), k.double(), v.double(), favor), {}),
        (TypeError, "cfg:", (q, k, v, "favor"), {}),
        (ValueError, "cfg.feature", (q, k, v, FeatureConfig("softmax", w)), {}),
        (ValueError, "cfg.projection", (q, k, v, FeatureConfig("elu", w)), {}),
        (ValueError, "cfg.projection", (q, k, v, FeatureConfig("relu")), {}),
        (ValueError, "cfg.projection", (q, k, v, FeatureConfig("favor", torch.randn(32, 12))), {}),
        (TypeError, "k:", (q, k.half(), v, favor), {}),
        (ValueError, "k:", (q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), favor), {}),
        (TypeError, "key_padding_mask", (q, k, v, favor), {"key_padding_mask": mask.float()}),
        (ValueError, "key_padding_mask", (q, k, v, favor), {"key_padding_mask": mask[:, :5]}),
        (ValueError, "causal", (q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), favor), {"causal": True}),
        (TypeError, "causal", (q, k, v, favor), {"causal": 1}),
    ]


@pytest.mark.parametrize("error,name,args,kwargs", _bad_feature_calls())
def test_feature_attention_rejects_bad_input(error, name, args, kwargs):
    """The public fused op names the argument and what it expected (checked before any kernel, so
    this runs without Triton); float64 is refused rather than computed in fp32."""
    with pytest.raises(error, match=name):
        feature_attention(*args, **kwargs)


@needs_triton
def test_state_buffers_sections_aligned_and_disjoint():
    """The state's one allocation: records, bf16 halves, column sums and the per-row tail each start
    128-byte aligned (the kernels' loads are specialised on it) and do not overlap."""
    from approxattn.kernels import linear_attn

    buffers = linear_attn.StateBuffers(3, 80, 16, 2, 16, halves=True, tail=2 * 77)
    records, halves, sums, tail = buffers.allocate("cpu")
    base = records.data_ptr()
    views = [(records, 4), (halves, 2), (sums, 4), (tail, 4)]
    starts = [v.data_ptr() - base for v, _ in views]
    ends = [s + v.numel() * size for s, (v, size) in zip(starts, views)]
    assert all(s % (4 * linear_attn.RECORD_ALIGN) == 0 for s in starts)
    assert all(e <= s for e, s in zip(ends, starts[1:]))
    assert records.numel() == 3 * linear_attn.record_size(80, 16) and halves.numel() == 2 * 3 * 80 * 16
    assert sums.numel() >= 3 * 2 * 17 and tail.numel() == 2 * 77
