"""FAVOR+ (Performer): unbiasedness, convergence, stabilisers, causal scan, redraw policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import approxattn
import naive
from approxattn.blocks.exact import softmax_attention_matrix
from approxattn.blocks.feature_maps import favor_log_features, favor_ratio
from approxattn.blocks.kernel_attention import causal_kernel_attention, quadratic_kernel_attention
from approxattn.blocks.random_matrices import gaussian_iid_matrix, gaussian_orthogonal_matrix
from helpers import qkv, rel_err


@pytest.mark.parametrize("hyperbolic", [False, True])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_positive_features_are_unbiased(hyperbolic, orthogonal):
    gen = torch.Generator().manual_seed(7 + 2 * hyperbolic + orthogonal)
    d, m = 8, 1_000_000
    x, y = torch.randn(2, d, generator=gen, dtype=torch.float64)
    x, y = 0.5 * x / x.norm(), 0.5 * y / y.norm()
    draw = gaussian_orthogonal_matrix if orthogonal else gaussian_iid_matrix
    w = draw(m, d, gen).double()
    ratio = favor_ratio(m, hyperbolic=hyperbolic)
    fx = ratio * favor_log_features(x[None], w, hyperbolic=hyperbolic).exp()
    fy = ratio * favor_log_features(y[None], w, hyperbolic=hyperbolic).exp()
    estimate = float((fx * fy).sum())
    assert estimate == pytest.approx(float(torch.exp(x @ y)), rel=0.01)
    assert (fx > 0).all() and (fy > 0).all()


def attention_matrix_error(m, seed, orthogonal=True, n=512, d=64):
    gen = torch.Generator().manual_seed(1000 + seed)
    q = torch.randn(1, 1, n, d, generator=gen) * 0.5
    k = torch.randn(1, 1, n, d, generator=gen) * 0.5
    exact = softmax_attention_matrix(q, k, scale=d**-0.5)
    module = approxattn.build("performer", head_dim=d, num_features=m, seed=seed, orthogonal=orthogonal).eval()
    approx = module(q, k, torch.eye(n)[None, None])  # v = I returns the attention matrix
    return rel_err(approx, exact)


def test_error_falls_like_inverse_sqrt_m_and_matches_reference_values():
    ms = [64, 256, 1024, 4096]
    errors = [np.mean([attention_matrix_error(m, seed) for seed in range(3)]) for m in ms]
    slope = np.polyfit(np.log(ms), np.log(errors), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, errors)
    # reference digest (q, k ~ N(0, 0.25 I), d = 64, N = 512, ORF): 0.71 / 0.43 / 0.23 / 0.13
    for got, published in zip(errors, [0.71, 0.43, 0.23, 0.13]):
        assert got == pytest.approx(published, rel=0.3)


def test_orthogonal_features_beat_iid_on_average():
    orthogonal = np.mean([attention_matrix_error(64, s, True, n=128) for s in range(12)])
    iid = np.mean([attention_matrix_error(64, s, False, n=128) for s in range(12)])
    assert orthogonal < iid


@pytest.mark.parametrize("kernel", ["softmax", "softmax-hyperbolic"])
@pytest.mark.parametrize("causal", [False, True])
def test_stabilised_equals_unstabilised_in_float64(kernel, causal):
    q, k, v = qkv(seq_q=40, std=1.0)
    opts = dict(num_features=32, kernel=kernel, eps=0.0, chunk_size=7)
    stable = approxattn.attention(q, k, v, "performer", causal=causal, **opts)
    plain = approxattn.attention(q, k, v, "performer", causal=causal, stabilize=False, **opts)
    assert rel_err(stable, plain) < 1e-12


def test_per_key_stabiliser_is_biased_negative_control():
    """A per-key max does not cancel; the check above must be able to catch it."""
    q, k, v = qkv(batch=1, heads=1, kv_heads=1, seq_q=40, std=1.0)
    module = approxattn.build("performer", head_dim=8, num_features=32, eps=0.0).double().eval()
    w, scale = module.projection.double(), 8**-0.5
    ratio = favor_ratio(32, hyperbolic=False)
    qf = ratio * favor_log_features(q * scale**0.5, w, hyperbolic=False).exp()
    logk = favor_log_features(k * scale**0.5, w, hyperbolic=False)
    per_key = ratio * (logk - logk.amax(-1, keepdim=True)).exp()
    wrong = quadratic_kernel_attention(qf[:, :, None], per_key, v, causal=False)[:, :, 0]
    assert rel_err(wrong, module(q, k, v)) > 1e-2


@pytest.mark.parametrize("kernel", ["softmax", "softmax-hyperbolic", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive_explicit_formula(kernel, causal):
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=24)
    module = approxattn.build("performer", head_dim=8, num_features=16, kernel=kernel, eps=0.0 if kernel != "relu"
                              else 1e-3, chunk_size=5).double().eval()
    out = module(q, k, v, causal=causal)
    w = module.projection.double()
    if kernel == "relu":
        ref = naive.relu_kernel(q, k, v, w, 8**-0.5, 1e-3, causal)
    else:
        ref = naive.favor_plus(q, k, v, w, 8**-0.5, causal=causal, hyperbolic=kernel == "softmax-hyperbolic")
    assert rel_err(out, ref) < 1e-10


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 30),
    chunk=st.integers(1, 12),
    eps=st.sampled_from([0.0, 1e-3]),
    std=st.sampled_from([0.3, 1.5]),
    pad_from=st.integers(0, 29),
)
def test_chunked_prefix_sums_equal_masked_quadratic_form(length, chunk, eps, std, pad_from):
    """Causal FAVOR+ with the no-look-ahead stabiliser, against its masked quadratic form:
    row i weights key j ≤ i by q'ᵢ·ratio·(exp(log φ(kⱼ) − Mᵢ) + ε) with Mᵢ the prefix max."""
    gen = torch.Generator().manual_seed(length * 100 + chunk)
    m, ratio = 6, favor_ratio(6, hyperbolic=False)
    qf = torch.rand(1, 1, 1, length, m, generator=gen, dtype=torch.float64)
    logk = torch.randn(1, 1, length, m, generator=gen, dtype=torch.float64) * std * 4
    v = torch.randn(1, 1, length, 3, generator=gen, dtype=torch.float64)
    valid = torch.ones(1, 1, length, dtype=torch.bool)
    valid[..., min(pad_from, length - 1)] = False
    valid[..., 0] = True
    per_key = logk.amax(-1).masked_fill(~valid, -1e30)
    offsets = torch.cummax(per_key, -1).values
    out = causal_kernel_attention(
        qf, ratio * (logk - offsets[..., None]).clamp(max=0).exp(), v, chunk_size=chunk,
        key_offsets=offsets, eps_feature=ratio * eps, key_valid=valid,
    )
    row_features = ratio * ((logk[:, :, None, :, :] - offsets[:, :, :, None, None]).exp() + eps)  # (1,1,i,j,m)
    row_features = row_features * valid[:, :, None, :, None]
    ref = quadratic_kernel_attention(qf, row_features[:, :, None], v, causal=True)
    assert rel_err(out, ref) < 1e-10


def test_causal_memory_is_chunked_not_n_m_d():
    """The scan keeps an m×dv state per chunk: autograd saves O(N·m + N·C + (N/C)·m·dv)
    elements, far below the N·m·dv of a naive cumulative sum."""
    n, m, dv = 1024, 64, 64
    q, k, v = qkv(batch=1, heads=1, kv_heads=1, seq_q=n, head_dim=dv, dtype=torch.float32, requires_grad=True)
    module = approxattn.build("performer", head_dim=dv, num_features=m, chunk_size=64)
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        module(q, k, v, causal=True).sum().backward()
    assert max(saved.values()) <= n * max(m, dv)
    assert sum(saved.values()) < n * m * dv / 3  # about 17·N·m here (features, chunk states)


def test_redraw_policy():
    q, k, v = qkv(seq_q=8, dtype=torch.float32)

    def draws(policy, calls, training=True):
        module = approxattn.build("performer", head_dim=8, num_features=8, redraw=policy)
        module.train(training)
        seen = []
        for _ in range(calls):
            module(q, k, v)
            seen.append(module.projection.clone())
        return [i for i in range(1, calls) if not torch.equal(seen[i], seen[i - 1])]

    assert draws("never", 5) == []
    assert draws("every_call", 5) == [1, 2, 3, 4]
    assert draws(3, 7) == [2, 5]  # calls 3 and 6 (1-based) redraw before running
    assert draws("every_call", 5, training=False) == []


def test_redraw_schedule_survives_a_state_dict_round_trip():
    """The call count is kept on the host (no GPU read per training call) and stored in the
    ``training_calls`` buffer: a module loaded after 4 calls with redraw=3 redraws on its 2nd call
    (the 6th), as the original does; loading an earlier state rewinds the count."""
    q, k, v = qkv(seq_q=8, dtype=torch.float32)
    a = approxattn.build("performer", head_dim=8, num_features=8, redraw=3, seed=2)
    for _ in range(4):
        a(q, k, v)
    assert int(a.training_calls) == 4
    b = approxattn.build("performer", head_dim=8, num_features=8, redraw=3, seed=2)
    b(q, k, v)  # its own count (1) is replaced by the loaded one
    b.load_state_dict(a.state_dict())
    before = b.projection.clone()
    b(q, k, v)
    assert torch.equal(b.projection, before) and int(b.training_calls) == 5
    b(q, k, v)
    assert not torch.equal(b.projection, before) and int(b.training_calls) == 6
    a(q, k, v)
    a(q, k, v)
    assert torch.equal(a.projection, b.projection)


def test_redraws_are_reproducible_from_seed():
    q, k, v = qkv(seq_q=8, dtype=torch.float32)
    a = approxattn.build("performer", head_dim=8, redraw="every_call", seed=5)
    b = approxattn.build("performer", head_dim=8, redraw="every_call", seed=5)
    c = approxattn.build("performer", head_dim=8, redraw="every_call", seed=6)
    for module in (a, b, c):
        module(q, k, v)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)


def test_padding_equals_dropping_the_padded_keys():
    q, k, v = qkv(batch=1, seq_q=20)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[:, 13:] = False
    opts = dict(num_features=32)
    padded = approxattn.attention(q, k, v, "performer", key_padding_mask=mask, **opts)
    trimmed = approxattn.attention(q, k[:, :, :13], v[:, :, :13], "performer", **opts)
    assert rel_err(padded, trimmed) < 1e-12
