"""Checks every registered method must pass (new methods are picked up automatically)."""

from __future__ import annotations

import io

import pytest
import torch

import approxattn
from helpers import CAUSAL_METHODS, METHODS, NONCAUSAL_ONLY, example, qkv, rel_err

N = 16


def shared_options(child: dict, parent: str) -> dict:
    parent_names = approxattn.get_method(parent).defaults
    return {k: v for k, v in child.items() if k in parent_names}


def with_causal(methods):
    """(method, causal) pairs: every method non-causally, causal-capable ones causally too."""
    return [(m, False) for m in methods] + [(m, True) for m in methods if m in CAUSAL_METHODS]


EXACT = [n for n, s in approxattn.available_methods().items() if s.exact_limit.options is not None]


@pytest.mark.parametrize("method, causal", with_causal(EXACT))
def test_exact_limit_equals_parent(method, causal):
    spec = approxattn.get_method(method)
    limit = spec.exact_limit
    child_options = example(method, N) | limit.options(N)
    parent_options = shared_options(child_options, limit.parent) | limit.parent_options
    q, k, v = qkv(seq_q=N)
    child = approxattn.build(method, head_dim=8, **child_options).double().eval()
    parent_module = approxattn.build(limit.parent, head_dim=8, **parent_options).double().eval()
    out = child(q, k, v, causal=causal)
    ref = parent_module(q, k, v, causal=causal)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_grouped_query_equals_repeated_kv(method):
    q, k, v = qkv(heads=6, kv_heads=2, seq_q=N)
    opts = example(method, N)
    grouped = approxattn.attention(q, k, v, method, **opts)
    repeated = approxattn.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), method, **opts)
    assert grouped.shape == (2, 6, N, 8)
    assert rel_err(grouped, repeated) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_cross_attention_shapes(method):
    q, k, v = qkv(seq_q=5, seq_k=N, value_dim=3)
    out = approxattn.attention(q, k, v, method, **example(method, N))
    assert out.shape == (2, 4, 5, 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", CAUSAL_METHODS)
@pytest.mark.parametrize("position", [0, 5, 11])
def test_causal_future_tokens_never_change_past_outputs(method, position):
    q, k, v = qkv(seq_q=N)
    opts = example(method, N)
    out = approxattn.attention(q, k, v, method, causal=True, **opts)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, position + 1:] = torch.randn_like(q2[:, :, position + 1:]) * 3
    k2[:, :, position + 1:] = torch.randn_like(k2[:, :, position + 1:]) * 3
    v2[:, :, position + 1:] = torch.randn_like(v2[:, :, position + 1:]) * 3
    out2 = approxattn.attention(q2, k2, v2, method, causal=True, **opts)
    assert rel_err(out2[:, :, : position + 1], out[:, :, : position + 1]) < 1e-12
    assert rel_err(out2, out) > 1e-3  # the perturbation did reach later outputs


@pytest.mark.parametrize("method", NONCAUSAL_ONLY)
def test_causal_unsupported_names_alternatives(method):
    q, k, v = qkv(seq_q=N)
    with pytest.raises(NotImplementedError, match=r"causal=True.*performer"):
        approxattn.attention(q, k, v, method, causal=True, **example(method, N))


@pytest.mark.parametrize("method, causal", with_causal(METHODS))
def test_padded_keys_never_change_valid_outputs(method, causal):
    q, k, v = qkv(seq_q=N)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 11:] = False
    mask[1, :3] = False
    mask[1, 8] = False
    opts = example(method, N)
    out = approxattn.attention(q, k, v, method, causal=causal, key_padding_mask=mask, **opts)
    k2, v2 = k.clone(), v.clone()
    pad = ~mask[:, None, :, None]
    k2 = torch.where(pad, torch.randn_like(k2) * 5, k2)
    v2 = torch.where(pad, torch.randn_like(v2) * 5, v2)
    out2 = approxattn.attention(q, k2, v2, method, causal=causal, key_padding_mask=mask, **opts)
    assert torch.isfinite(out).all()
    assert rel_err(out2, out) < 1e-10
    # and the mask is actually used: without it, the same perturbation changes outputs
    assert rel_err(approxattn.attention(q, k2, v2, method, causal=causal, **opts),
                   approxattn.attention(q, k, v, method, causal=causal, **opts)) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_float64(method):
    q, k, v = qkv(batch=1, heads=2, kv_heads=1, seq_q=8, head_dim=4, requires_grad=True)
    opts = example(method, 8)
    module = approxattn.build(method, head_dim=4, **opts).double().eval()
    mask = torch.tensor([[True] * 7 + [False]])
    assert torch.autograd.gradcheck(lambda a, b, c: module(a, b, c, key_padding_mask=mask), (q, k, v))
    if method in CAUSAL_METHODS:
        assert torch.autograd.gradcheck(lambda a, b, c: module(a, b, c, causal=True), (q, k, v))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_output_and_state_dict_round_trip(method):
    q, k, v = qkv(seq_q=N)
    opts = example(method, N, max_len=N) if "max_len" in approxattn.get_method(method).defaults else example(method, N)
    first = approxattn.build(method, head_dim=8, seed=3, **opts) if "seed" in approxattn.get_method(method).defaults \
        else approxattn.build(method, head_dim=8, **opts)
    second = approxattn.build(method, head_dim=8, **first.options)
    first.double().eval()
    second.double().eval()
    assert torch.equal(first(q, k, v), second(q, k, v))
    # change the state (training redraws, perturbed parameters), then round-trip it
    first.train()
    for _ in range(3):
        first(q, k, v)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    first.eval()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    other_seed = dict(first.options) | ({"seed": 11} if "seed" in first.options else {})
    restored = approxattn.build(method, head_dim=8, **other_seed).double().eval()
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored(q, k, v), first(q, k, v))


@pytest.mark.parametrize("method, causal", with_causal(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_large_logits_stay_finite(method, dtype, causal):
    # entries N(0, 8): q·k/√d has standard deviation 8
    q, k, v = qkv(seq_q=64, head_dim=16, dtype=dtype, std=8**0.5)
    out = approxattn.attention(q, k, v, method, causal=causal, **example(method, 64))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # and it still tracks the float64 computation
    ref = approxattn.attention(q.double(), k.double(), v.double(), method, causal=causal, **example(method, 64))
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("method", METHODS)
def test_registry_metadata_is_complete(method):
    spec = approxattn.get_method(method)
    assert spec.family in ("exact", "low-rank", "kernel", "hybrid", "nystrom", "sparse")
    assert spec.summary and spec.reference and spec.cost_doc and spec.exact_limit.description
    approxattn.get_method(spec.exact_limit.parent)
    cost = spec.cost(2, 8, 4096, 4096, 64, **example(method, 4096))
    bigger = spec.cost(2, 8, 8192, 8192, 64, **example(method, 4096))
    for field in ("flops", "bytes_moved", "peak_memory"):
        assert getattr(cost, field) > 0
        assert getattr(bigger, field) > getattr(cost, field)
    assert spec.describe()["name"] == method


@pytest.mark.parametrize("method, causal", with_causal(METHODS))
def test_attention_matrices_reproduce_the_output(method, causal):
    """approxattn.attention_matrices(...)["attention"] is the matrix the call applies: A @ v equals
    attention(...) for the same inputs (GQA, padding), rows of padded keys are zero, and on a causal
    call the future is zero."""
    q, k, v = qkv(seq_q=N)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, :3] = False
    opts = example(method, N)
    maps = approxattn.attention_matrices(q, k, v, method, causal=causal, key_padding_mask=mask, **opts)
    matrix = maps["attention"]
    assert matrix.shape == (2, q.shape[1], N, N)
    out = approxattn.attention(q, k, v, method, causal=causal, key_padding_mask=mask, **opts)
    groups = q.shape[1] // k.shape[1]
    assert rel_err(matrix @ v.repeat_interleave(groups, dim=1), out) < 1e-10
    assert float(matrix[1, :, :, :3].abs().max()) < 1e-12
    if causal:
        assert float(matrix.triu(1).abs().max()) < 1e-12
