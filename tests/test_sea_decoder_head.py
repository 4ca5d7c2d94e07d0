"""The fused head of SEA's non-causal decoder (output conv over rows ×2, width resize, log-histogram
residual, softmax) against its PyTorch twin, against the unfused decoder layers, in the module; errors.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` at small sizes, with ``torch.empty`` poisoned
(NaN) so that an output element the kernel fails to write fails the comparison.
"""

from __future__ import annotations


import pytest
import torch
from helpers import needs_triton, rel_err

from approxattn.blocks.sea_estimator import (
    NonCausalDecoder,
    conv2d,
    histogram_resampling,
    interpolation_matrix,
    probe_histogram_logits,
    resize_width,
)
from approxattn.kernels import sea_decoder_head
from approxattn.kernels.sea_decoder_head import (
    decoder_head,
    decoder_head_best_reference,
    decoder_head_reference,
    fast_decoder_head,
    fast_decoder_head_best,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _case(S, C, R, W, T, d, heads, dtype, gen, *, rows=None, histogram=True):
    """y as a permuted (S, R, C, W) view (SEA's channel split), a histogram as a column slice of a wider
    (S, N, 2d) map (SEA's context), per-batch resampling weights from random valid-key counts."""
    rows = 2 * R - 1 if rows is None else rows
    y = torch.randn(S, R, C, W, generator=gen).relu().to(dtype).permute(0, 2, 1, 3)
    weight, bias = torch.randn(1, C, 3, 3, generator=gen) * 0.4, torch.randn(1, generator=gen)
    interp = interpolation_matrix(W, T, dtype=torch.float32, device=torch.device("cpu"))
    hist = weights = None
    if histogram:
        hist = torch.rand(S, rows, 2 * d, generator=gen).to(dtype)[..., :d]
        hist[0, :3] = 0.0                                          # rows clamped to the floor
        n_valid = torch.randint(2, 3 * rows, (S // heads,), generator=gen)
        weights = histogram_resampling(n_valid, d, T, torch.float32)
    return y, weight, bias, interp, rows, hist, weights


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("S,C,R,W,T,d,heads,histogram", [
    (4, 4, 13, 16, 32, 16, 2, True),      # SEA's shape, small: W = T/2, two heads a batch element
    (3, 3, 9, 5, 10, 7, 3, True),         # odd sizes: every block padded
    (2, 4, 20, 16, 24, 16, 1, False),     # no residual (decoder_residual=False)
])
def test_kernel_matches_its_twin(forced_kernels, dtype, S, C, R, W, T, d, heads, histogram):
    gen = torch.Generator().manual_seed(S * 100 + T)
    y, weight, bias, interp, rows, hist, weights = _case(S, C, R, W, T, d, heads, dtype, gen, histogram=histogram)
    logits, probs, best = decoder_head(y, weight, bias, interp, rows=rows, histogram=hist, hist_weights=weights,
                                       heads=heads)
    ref_logits, ref_probs, _ = decoder_head_reference(y.double() if dtype == torch.float32 else y, weight, bias, interp,
                                                   rows=rows, histogram=hist, hist_weights=weights, heads=heads)
    assert logits.shape == probs.shape == (S, rows, T)
    assert logits.dtype == dtype and probs.dtype == torch.float32
    assert rel_err(logits, ref_logits) < TOL[dtype]
    assert rel_err(probs, ref_probs) < TOL[dtype]
    assert torch.allclose(probs.sum(-1), torch.ones(S, rows), atol=1e-5)
    assert best.dtype == torch.int64 and torch.equal(best, probs.argmax(-1))      # of the kernel's own probs


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("histogram", [True, False])
def test_best_and_column_sums_without_the_maps(forced_kernels, dtype, histogram):
    """The head's inference form (no logits or probabilities written): each row's argmax and the
    probabilities' column sums, against its twin and the full kernel's maps; 3 row blocks + a ragged one."""
    gen = torch.Generator().manual_seed(11)
    y, weight, bias, interp, rows, hist, weights = _case(4, 4, 29, 16, 32, 16, 2, dtype, gen, histogram=histogram)
    best, sums = fast_decoder_head_best(y, weight, bias, interp, rows=rows, histogram=hist, hist_weights=weights,
                                        heads=2)
    _, probs, full_best = decoder_head(y, weight, bias, interp, rows=rows, histogram=hist, hist_weights=weights,
                                       heads=2)
    assert best.shape == (4, rows) and sums.shape == (4, 32) and sums.dtype == torch.float32
    assert torch.equal(best, full_best)
    assert rel_err(sums, probs.sum(1)) < 1e-6
    ref_best, ref_sums = decoder_head_best_reference(y, weight, bias, interp, rows=rows, histogram=hist,
                                                     hist_weights=weights, heads=2)
    assert rel_err(sums, ref_sums) < TOL[dtype]
    assert (best == ref_best).float().mean() > 0.95              # near-ties may flip under rounding


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("histogram", [True, False])
def test_split_half_dots_match_the_twin(forced_kernels, monkeypatch, dtype, histogram):
    """SPLIT_DOTS (interp in y's half dtype, as the module passes it): the maps and the lean form against the
    fp64 twin, at least as close as the TF32 dots (on a GPU; the interpreter multiplies exactly)."""
    gen = torch.Generator().manual_seed(21)
    y, weight, bias, interp, rows, hist, weights = _case(4, 4, 29, 16, 32, 16, 2, dtype, gen, histogram=histogram)
    interp = interp.to(dtype)                      # 0.25 / 0.75 weights: exact in either half dtype
    kwargs = dict(rows=rows, histogram=hist, hist_weights=weights, heads=2)
    ref_logits, ref_probs, _ = decoder_head_reference(y.double(), weight.to(dtype), bias.to(dtype), interp.double(),
                                                      **{**kwargs, "histogram": None if hist is None else hist.double()})
    errors = {}
    for split in (0, 1):
        monkeypatch.setitem(sea_decoder_head.OVERRIDE, "SPLIT_DOTS", split)
        logits, probs, best = decoder_head(y, weight, bias, interp, **kwargs)
        lean_best, sums = fast_decoder_head_best(y, weight, bias, interp, **kwargs)
        assert torch.equal(best, probs.argmax(-1)) and torch.equal(lean_best, best)
        assert rel_err(sums, probs.sum(1)) < 1e-6
        errors[split] = rel_err(probs, ref_probs)
        assert rel_err(logits, ref_logits) < TOL[dtype]
    assert errors[1] < 1e-5 and errors[1] <= errors[0] * 1.01, errors


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R,rows,histogram", [
    (23, 45, True),         # odd rows: the last pair's odd row is past the end, its even row's third tap reads zeros
    (23, 46, True),         # every row of y used, even rows
    (40, 37, False),        # y has more rows than the head reads: taps past row 36 read zeros
    (3, 1, True),           # one row
])
def test_paired_kernel_matches_the_direct_one(forced_kernels, monkeypatch, dtype, R, rows, histogram):
    """PAIRED (two output rows from the same three y rows) against the direct kernel and the twin, maps and lean
    form; BR = 16 pairs under the interpreter, so 45 rows are 2 programs, one ragged."""
    gen = torch.Generator().manual_seed(R * 10 + rows)
    y, weight, bias, interp, rows, hist, weights = _case(3, 4, R, 16, 32, 16, 3, dtype, gen, rows=rows,
                                                         histogram=histogram)
    kwargs = dict(rows=rows, histogram=hist, hist_weights=weights, heads=3)
    found = {}
    for paired in (0, 1):
        monkeypatch.setitem(sea_decoder_head.OVERRIDE, "PAIRED", paired)
        found[paired] = (*decoder_head(y, weight, bias, interp, **kwargs),
                         *fast_decoder_head_best(y, weight, bias, interp, **kwargs))
    ref_logits, ref_probs, _ = decoder_head_reference(y.double() if dtype == torch.float32 else y, weight, bias,
                                                      interp, **kwargs)
    logits, probs, best, lean_best, sums = found[1]
    assert logits.shape == probs.shape == (3, rows, 32) and best.shape == lean_best.shape == (3, rows)
    assert rel_err(logits, ref_logits) < TOL[dtype] and rel_err(probs, ref_probs) < TOL[dtype]
    assert rel_err(probs, found[0][1]) < (1e-6 if dtype == torch.float32 else 2e-2)
    assert torch.equal(best, probs.argmax(-1)) and torch.equal(lean_best, best)
    assert rel_err(sums, probs.sum(1)) < 1e-6


@needs_triton
def test_decoder_best_and_column_sums_match_its_logits_and_probs(forced_kernels):
    torch.manual_seed(3)
    decoder = NonCausalDecoder(8, 12, None, zero_last=True).eval()
    with torch.no_grad():
        for parameter in decoder.out.parameters():
            parameter.normal_(std=0.3)
    e, hist, n_valid = torch.randn(2, 3, 21, 16), torch.rand(2, 3, 21, 16)[..., :8], torch.tensor([21, 21])
    with torch.no_grad():
        best, sums = decoder.best_and_column_sums(e, histogram=hist, n_valid=n_valid)
        _, probs, full_best = decoder.logits_and_probs(e, histogram=hist, n_valid=n_valid)
    assert torch.equal(best, full_best) and rel_err(sums, probs.sum(2)) < 1e-6


@needs_triton
def test_twin_equals_the_unfused_decoder_layers():
    """The twin (fp64) against the decoder's own layers: conv over upsampled rows, resize, the
    log-histogram of probe_histogram_logits, softmax."""
    gen = torch.Generator().manual_seed(5)
    S, heads, R, T, d = 4, 2, 11, 16, 8
    y, weight, bias, interp, rows, hist, _ = _case(S, 4, R, T // 2, T, d, heads, torch.float64, gen)
    layer = torch.nn.Conv2d(4, 1, 3).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    conv = conv2d(y, layer, pad=(1, 1, 1, 1), upsample_rows=2, rows=rows)[:, 0]
    n_valid = torch.tensor([7, 30])                   # one per batch element (S = 2 × heads)
    weights = histogram_resampling(n_valid, d, T, torch.float64)
    residual = probe_histogram_logits(hist.reshape(2, heads, rows, d), n_valid, T).reshape(S, rows, T)
    expected = resize_width(conv, T, plus=residual)
    logits, probs, best = decoder_head_reference(y, weight, bias, interp, rows=rows, histogram=hist,
                                                 hist_weights=weights, heads=heads)
    assert rel_err(logits, expected) < 1e-12
    assert rel_err(probs, torch.softmax(expected, -1)) < 1e-12
    assert torch.equal(best, expected.argmax(-1))


@needs_triton
@pytest.mark.parametrize("residual", [True, False])
def test_decoder_logits_and_probs_fused_and_unfused(forced_kernels, monkeypatch, residual):
    """NonCausalDecoder.logits_and_probs through the kernel (forced on CPU) and through its layers;
    the last conv randomised (it is zero-initialised with the residual)."""
    torch.manual_seed(2)
    decoder = NonCausalDecoder(8, 12, None, zero_last=residual).eval()
    with torch.no_grad():
        for parameter in decoder.out.parameters():
            parameter.normal_(std=0.3)
    e = torch.randn(2, 3, 21, 16)
    hist = torch.rand(2, 3, 21, 16)[..., :8] if residual else None
    n_valid = torch.tensor([21, 9])
    with torch.no_grad():
        logits, probs, best = decoder.logits_and_probs(e, histogram=hist, n_valid=n_valid)
        monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
        ref_logits, ref_probs, ref_best = decoder.logits_and_probs(e, histogram=hist, n_valid=n_valid)
    assert rel_err(logits, ref_logits) < 1e-5 and rel_err(probs, ref_probs) < 1e-5
    assert ref_best is None and torch.equal(best, probs.argmax(-1))
    plus = probe_histogram_logits(hist, n_valid, 12) if residual else None
    assert rel_err(decoder(e, plus=plus), ref_logits) < 1e-6


@needs_triton
def test_dispatch_and_errors(forced_kernels):
    gen = torch.Generator().manual_seed(9)
    y, weight, bias, interp, rows, hist, weights = _case(2, 4, 6, 8, 16, 8, 1, torch.float32, gen)
    with pytest.raises(ValueError, match="weight"):
        decoder_head(y, weight[:, :3], bias, interp, rows=rows)
    with pytest.raises(ValueError, match="interp"):
        decoder_head(y, weight, bias, interp[:5], rows=rows)
    with pytest.raises(ValueError, match="rows"):
        decoder_head(y, weight, bias, interp, rows=13)
    with pytest.raises(ValueError, match="both or neither"):
        decoder_head(y, weight, bias, interp, rows=rows, histogram=hist)
    with pytest.raises(ValueError, match="heads"):
        decoder_head(y, weight, bias, interp, rows=rows, heads=3)
    with pytest.raises(ValueError, match="hist_weights"):
        decoder_head(y, weight, bias, interp, rows=rows, histogram=hist, hist_weights=weights[:, :3])
    with pytest.raises(TypeError, match="y"):
        decoder_head(y.int(), weight, bias, interp, rows=rows)
    with pytest.raises(ValueError, match="floor"):
        decoder_head(y, weight, bias, interp, rows=rows, histogram=hist, hist_weights=weights, floor=0.0)
    # past the kernel's limits or needing a gradient: None (the caller runs the layers)
    wide = torch.randn(1, 9, 4, 8)
    assert fast_decoder_head(wide, torch.randn(1, 9, 3, 3), bias, interp, rows=7) is None
    assert fast_decoder_head(y.double(), weight, bias, interp, rows=rows) is None
    with torch.enable_grad():
        assert fast_decoder_head(y, weight.requires_grad_(), bias, interp, rows=rows) is None
