"""Bad input raises the documented error, naming the argument, the expectation and the value."""

from __future__ import annotations

import math

import pytest
import torch

import approxattn
from helpers import METHODS, example, qkv


def call(method="softmax", q=None, k=None, v=None, options=None, **kwargs):
    # method options travel apart from the tensors: an option may be named like one (SEA's k)
    base_q, base_k, base_v = qkv(seq_q=8, dtype=torch.float32)
    return approxattn.attention(
        base_q if q is None else q, base_k if k is None else k, base_v if v is None else v, method,
        **(options or {}), **kwargs
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(q=torch.randn(4, 8, 8)), ValueError, r"q: expected a 4-D tensor.*\(4, 8, 8\)"),
        (dict(k=torch.randn(2, 2, 8)), ValueError, r"k: expected a 4-D"),
        (dict(q=[[1.0]]), TypeError, r"q: expected a torch.Tensor, got list"),
        (dict(q=torch.ones(2, 4, 8, 8, dtype=torch.int64)), TypeError, r"q: expected dtype float16.*int64"),
        (dict(k=torch.randn(2, 2, 8, 8, dtype=torch.float64)), TypeError, r"k: expected the same dtype as q"),
        (dict(k=torch.randn(2, 2, 8, 8, device="meta")), ValueError, r"k: expected the same device as q"),
        (dict(k=torch.randn(3, 2, 8, 8)), ValueError, r"k, v: expected batch size 2"),
        (dict(k=torch.randn(2, 3, 8, 8), v=torch.randn(2, 3, 8, 8)), ValueError, r"k: expected a number of heads dividing q's 4.*got 3"),
        (dict(v=torch.randn(2, 1, 8, 8)), ValueError, r"v: expected 2 heads like k, got 1"),
        (dict(k=torch.randn(2, 2, 8, 5)), ValueError, r"k: expected head_dim 8 like q, got 5"),
        (dict(v=torch.randn(2, 2, 7, 8)), ValueError, r"v: expected sequence length 8 like k, got 7"),
        (dict(causal="yes"), TypeError, r"causal: expected a bool, got str"),
        (dict(key_padding_mask=torch.ones(2, 8)), TypeError, r"key_padding_mask: expected dtype torch.bool"),
        (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, r"key_padding_mask: expected shape \(2, 8\)"),
        (dict(key_padding_mask=torch.zeros(2, 8, dtype=torch.bool)), ValueError, r"key_padding_mask: every batch element"),
        (dict(key_padding_mask="all"), TypeError, r"key_padding_mask: expected a bool tensor or None"),
    ],
)
def test_bad_tensors(method, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        call(method, **kwargs, options=example(method, 8))


@pytest.mark.parametrize("method", [m for m in METHODS if approxattn.get_method(m).uses_scale])
@pytest.mark.parametrize("scale, error", [(math.nan, ValueError), (math.inf, ValueError), (-1.0, ValueError),
                                          (0.0, ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_scale(method, scale, error):
    with pytest.raises(error, match=r"scale: expected a positive finite float or None"):
        call(method, scale=scale, options=example(method, 8))


def test_causal_needs_equal_lengths():
    q, k, v = qkv(seq_q=4, seq_k=8)
    with pytest.raises(ValueError, match=r"causal: .*seq_q=4 and seq_k=8"):
        approxattn.attention(q, k, v, causal=True)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"method: unknown method 'flash'; available: softmax, performer"):
        call("flash")
    with pytest.raises(TypeError, match=r"method: expected a method name"):
        call(3)


@pytest.mark.parametrize(
    "method, options, error, pattern",
    [
        ("performer", {"num_feature": 8}, ValueError, r"unknown option 'num_feature' for method 'performer'; valid options: .*num_features"),
        ("performer", {"num_features": 0}, ValueError, r"option 'num_features' of method 'performer': expected an int >= 1, got 0"),
        ("performer", {"num_features": 8.5}, TypeError, r"option 'num_features'.*expected an int >= 1, got float"),
        ("performer", {"kernel": "cos"}, ValueError, r"option 'kernel'.*one of 'softmax', 'softmax-hyperbolic', 'relu'"),
        ("performer", {"redraw": "sometimes"}, ValueError, r"option 'redraw'"),
        ("performer", {"redraw": 0}, ValueError, r"option 'redraw'"),
        ("performer", {"eps": math.nan}, ValueError, r"option 'eps'.*finite"),
        ("performer", {"orthogonal": 1}, TypeError, r"option 'orthogonal'.*a bool"),
        ("linformer", {"rank": 16}, ValueError, r"option 'rank': expected at most max_len=8"),
        ("linformer", {"sharing": "layer"}, ValueError, r"option 'sharing'"),
        ("softmax", {"num_features": 8}, ValueError, r"unknown option 'num_features' for method 'softmax'; valid options: none"),
    ],
)
def test_bad_options(method, options, error, pattern):
    with pytest.raises(error, match=pattern):
        call(method, **options)


def test_build_rejects_bad_head_dim_and_mismatched_inputs():
    with pytest.raises(ValueError, match=r"head_dim: expected a positive int, got 0"):
        approxattn.build("performer", head_dim=0)
    with pytest.raises(TypeError, match=r"head_dim: expected a positive int, got float"):
        approxattn.build("performer", head_dim=8.0)
    module = approxattn.build("performer", head_dim=16)
    with pytest.raises(ValueError, match=r"q: expected head_dim 16 .*got 8"):
        module(*qkv(seq_q=8, dtype=torch.float32))


def test_cost_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"seq_q: expected a positive int, got 0"):
        approxattn.get_method("softmax").cost(1, 1, 0, 4, 8)
