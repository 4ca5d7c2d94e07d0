"""Row-window GEMMs (convolutions over rows as tap matrices) against their PyTorch twins, the tap
matrices against ``F.conv2d``, and SEA's non-causal decoder through them against its unfused layers.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` at small sizes, with ``torch.empty`` poisoned
(NaN, the ``forced_kernels`` fixture) so that an output element the kernel fails to write fails.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from helpers import needs_triton, rel_err

from approxattn.blocks.sea_estimator import NonCausalDecoder, conv_row_matrices, histogram_resampling
from approxattn.kernels.row_window_gemm import (
    window_gemm,
    window_gemm_reference,
    window_gemm_softmax,
    window_gemm_softmax_reference,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _strided(S, R, K, dtype, gen):
    """x as a column slice of a wider map (SEA's maps are views)."""
    return torch.randn(S, R, K + 5, generator=gen).to(dtype)[..., 2:K + 2]


@pytest.mark.parametrize("ci,co,width,kh", [(4, 4, 8, 3), (3, 1, 5, 3), (2, 3, 1, 1)])
def test_conv_row_matrices_are_the_convolution(ci, co, width, kh):
    gen = torch.Generator().manual_seed(ci * 10 + co)
    weight = torch.randn(co, ci, kh, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, ci, 7, width, generator=gen, dtype=torch.float64)
    ref = F.conv2d(x, weight, padding=(kh // 2, 1))                                   # (2, co, 7, W)
    taps = conv_row_matrices(weight, width)
    rows = x.permute(0, 2, 1, 3).reshape(2, 7, ci * width)                            # channel-major rows
    padded = F.pad(rows, (0, 0, kh // 2, kh // 2))
    out = sum(padded[:, kr:kr + 7] @ taps[kr] for kr in range(kh))
    assert rel_err(out, ref.permute(0, 2, 1, 3).reshape(2, 7, co * width)) < 1e-12


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("step,up,virtual_rows,tap_bias,relu", [
    (1, 1, 13, False, True),     # a stride-1 conv
    (2, 1, 13, True, True),      # strided, a bias before the conv (the row linear's)
    (1, 2, 25, False, False),    # over rows repeated ×2, cropped to an odd count
])
def test_window_gemm_matches_its_twin(forced_kernels, dtype, step, up, virtual_rows, tap_bias, relu):
    gen = torch.Generator().manual_seed(step * 7 + up)
    x = _strided(3, 13, 70, dtype, gen)                      # K = 70: two K blocks, the second partial
    weights, bias = torch.randn(3, 70, 40, generator=gen) * 0.2, torch.randn(40, generator=gen)
    taps = torch.randn(3, 40, generator=gen) if tap_bias else None
    kwargs = {"step": step, "up": up, "virtual_rows": virtual_rows, "tap_bias": taps, "relu": relu}
    out = window_gemm(x, weights, bias, **kwargs)
    # the twin in fp32 from the operands the kernel dots (weights rounded to x's half dtype)
    ref = window_gemm_reference(x.float(), weights.to(dtype).float(), bias, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("histogram", [True, False])
def test_window_gemm_softmax_matches_its_twin(forced_kernels, dtype, histogram):
    gen = torch.Generator().manual_seed(5)
    S, heads, R, K, T, d = 4, 2, 9, 24, 20, 6
    x = _strided(S, R, K, dtype, gen)
    weights, bias = torch.randn(3, K, T, generator=gen) * 0.3, torch.randn(T, generator=gen)
    rows = 2 * R - 1
    hist = hist_weights = None
    if histogram:
        hist = torch.rand(S, rows, 2 * d, generator=gen).to(dtype)[..., :d]
        hist[0, :2] = 0.0                                         # rows clamped to the floor
        hist_weights = histogram_resampling(torch.tensor([rows, 5]), d, T, torch.float32)
    kwargs = {"up": 2, "virtual_rows": rows, "out_rows": rows, "histogram": hist, "hist_weights": hist_weights,
              "heads": heads}
    logits, probs, best = window_gemm_softmax(x, weights, bias, **kwargs)
    ref_logits, ref_probs, _ = window_gemm_softmax_reference(x.double(), weights.double(), bias,
                                                             **{**kwargs, "histogram": None if hist is None
                                                                else hist.double()})
    tol = 1e-5 if dtype == torch.float32 else 5e-3               # TF32 dots for half maps
    assert logits.dtype == dtype and probs.dtype == torch.float32 and best.dtype == torch.int64
    assert rel_err(logits.double(), ref_logits) < max(tol, TOL[dtype] if dtype != torch.float32 else 0)
    assert rel_err(probs.double(), ref_probs) < 10 * tol
    assert torch.equal(best, probs.argmax(-1))


@pytest.fixture
def gemm_calls(monkeypatch):
    """The row-window GEMM ("gemm") and band-conv ("band") launches the decoder makes, in order (the old layers
    give the same answers)."""
    from approxattn.kernels import band_conv, row_window_gemm

    calls = []
    for module, name, label in ((row_window_gemm, "window_gemm", "gemm"), (band_conv, "band_conv", "band")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _l=label, **k: calls.append(_l) or _f(*a, **k))
    return calls


def _decoder(columns, gen):
    decoder = NonCausalDecoder(8, columns, None, zero_last=True).eval()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.3)
    return decoder


@needs_triton
@pytest.mark.parametrize("head,middle", [("kernel", "band"), ("gemm", "band"), ("kernel", "gemm"), ("gemm", "gemm")])
@pytest.mark.parametrize("columns,n", [(12, 21), (12, 20), (40, 9), (9, 16)])
def test_decoder_through_row_gemms_matches_its_layers(forced_kernels, gemm_calls, monkeypatch, columns, n, head,
                                                      middle):
    """Half maps: the GEMMs (the middle conv as the band kernel or a GEMM) against the layers in fp32, within
    1e-2 (logits) / 2e-2 (probabilities) or 1.5× the unfused bf16 layers' own error, whichever is larger;
    rows whose two best cells are not near-tied select the same column."""
    monkeypatch.setenv("APPROXATTN_SEA_HEAD", head)
    monkeypatch.setenv("APPROXATTN_SEA_MIDDLE", middle)
    gen = torch.Generator().manual_seed(columns + n)
    decoder = _decoder(columns, gen)
    e = torch.randn(2, 3, n, 16, generator=gen).bfloat16()
    hist = torch.rand(2, 3, n, 16, generator=gen).bfloat16()[..., :8]
    n_valid = torch.tensor([n, max(2, n // 3)])
    with torch.no_grad():
        logits, probs, best = decoder.logits_and_probs(e, histogram=hist, n_valid=n_valid)
        with monkeypatch.context() as mp:
            mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
            half_logits, half_probs, _ = decoder.logits_and_probs(e, histogram=hist, n_valid=n_valid)
            exact_logits, exact_probs, _ = decoder.logits_and_probs(e.float(), histogram=hist.float(), n_valid=n_valid)
    assert gemm_calls == ["gemm", middle]             # the GEMM path ran (the layers give the same answers)
    assert logits.shape == (2, 3, n, columns) and logits.dtype == torch.bfloat16
    assert torch.isfinite(probs).all() and torch.equal(best, probs.argmax(-1))
    assert rel_err(logits.float(), exact_logits) < max(1e-2, 1.5 * rel_err(half_logits.float(), exact_logits))
    assert rel_err(probs, exact_probs) < max(2e-2, 1.5 * rel_err(half_probs, exact_probs))
    top2 = exact_probs.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05 * top2[..., 0]
    assert torch.equal(best[clear], exact_probs.argmax(-1)[clear])


@needs_triton
@pytest.mark.parametrize("update", ["in place", "load_state_dict", ".data ="])
def test_decoder_gemm_weights_follow_parameter_updates(forced_kernels, gemm_calls, monkeypatch, update):
    gen = torch.Generator().manual_seed(3)
    decoder = _decoder(12, gen)
    e = torch.randn(1, 2, 15, 16, generator=gen).bfloat16()
    with torch.no_grad():
        before = decoder.logits_and_probs(e)[0]
        flipped = -decoder.middle.weight
        if update == "in place":
            decoder.middle.weight.mul_(-1.0)                       # a new version
        elif update == "load_state_dict":
            decoder.load_state_dict({**decoder.state_dict(), "middle.weight": flipped})
        else:
            decoder.middle.weight.data = flipped.clone()           # same version, another address
        after = decoder.logits_and_probs(e)[0]
        with monkeypatch.context() as mp:
            mp.setenv("APPROXATTN_DISABLE_KERNELS", "1")
            layers = decoder.logits_and_probs(e.float())[0]
    assert gemm_calls == ["gemm", "band"] * 2         # the band tile too was rebuilt from the new weight
    assert rel_err(after.float(), layers) < 1e-2 and rel_err(before.float(), layers) > 1e-1


@needs_triton
def test_decoder_past_the_heads_limits_runs_its_layers(forced_kernels, gemm_calls, monkeypatch):
    """T > 256 (past both heads) or a histogram that wants a gradient: the layers, not an error."""
    gen = torch.Generator().manual_seed(8)
    decoder = _decoder(320, gen)
    e = torch.randn(1, 2, 9, 16, generator=gen).bfloat16()
    with torch.no_grad():
        logits = decoder.logits_and_probs(e)[0]
        monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
        layers = decoder.logits_and_probs(e)[0]
    assert not gemm_calls and rel_err(logits.float(), layers.float()) < 1e-2
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS")
    small = _decoder(12, gen).requires_grad_(False)
    hist = torch.rand(1, 2, 9, 8, generator=gen).bfloat16().requires_grad_()
    logits = small.logits_and_probs(e, histogram=hist, n_valid=torch.tensor([9]))[0]
    assert not gemm_calls and logits.requires_grad


@needs_triton
@pytest.mark.parametrize("variable", ["APPROXATTN_SEA_HEAD", "APPROXATTN_SEA_MIDDLE"])
def test_bad_choice_names_the_variable(forced_kernels, monkeypatch, variable):
    monkeypatch.setenv(variable, "fast")
    decoder = _decoder(12, torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.raises(ValueError, match=variable):
        decoder.logits_and_probs(torch.randn(1, 1, 5, 16).bfloat16())


@needs_triton
def test_decoder_keeps_its_layers_under_autograd(forced_kernels):
    """Training: gradients flow through the layers (the GEMM kernels are inference only)."""
    gen = torch.Generator().manual_seed(4)
    decoder = _decoder(12, gen).train()
    e = torch.randn(1, 2, 15, 16, generator=gen).bfloat16().requires_grad_()
    logits, probs, best = decoder.logits_and_probs(e)
    assert best is None
    probs.square().sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all()
    assert all(p.grad is not None for p in decoder.parameters())


@needs_triton
@pytest.mark.parametrize("fits", [True, False])
def test_half_gemm_falls_back_to_the_narrower_config_when_shared_memory_runs_out(forced_kernels, monkeypatch, fits):
    """The GPU config of half-operand GEMMs (128 rows, 3 stages) was tuned on an H100; where a launch of it
    runs out of shared memory the GEMM launches the 64-row / 2-stage one instead. A fake kernel stands in (the interpreter never runs out), with the GPU configs."""
    from approxattn.kernels import row_window_gemm as rwg
    from approxattn.kernels._launch import OutOfResources

    tried = []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                tried.append((meta["BM"], meta["BN"], meta["num_stages"]))
                if meta["BM"] == 128 and not fits:
                    raise OutOfResources(196608, 101376, "shared memory")
            return launch

    original = rwg.launch_config

    def gpu_config(*args, **kwargs):   # the configs a GPU gets, not the interpreter's
        with monkeypatch.context() as patch:
            patch.setattr(rwg, "interpreting", lambda: False)
            return original(*args, **kwargs)

    monkeypatch.setattr(rwg, "_window_gemm_fwd", FakeKernel())
    monkeypatch.setattr(rwg, "launch_config", gpu_config)
    x = torch.randn(2, 16, 24).to(torch.bfloat16)
    weights, bias = torch.randn(3, 24, 256), torch.randn(256)
    window_gemm(x, weights, bias, step=2, pad=1, virtual_rows=16, out_rows=8)
    assert tried[0] == (128, 128, 3)
    assert tried[1:] == ([] if fits else [(64, 128, 2)])
    monkeypatch.setattr(rwg, "OVERRIDE", {"gemm": {"num_warps": 8}})   # a tuning run sees its config fail
    if not fits:
        with pytest.raises(OutOfResources):
            window_gemm(x, weights, bias, step=2, pad=1, virtual_rows=16, out_rows=8)


@needs_triton
def test_errors_name_the_argument(forced_kernels):
    gen = torch.Generator().manual_seed(6)
    x = _strided(2, 5, 8, torch.float32, gen)
    weights, bias = torch.randn(3, 8, 6, generator=gen), torch.randn(6, generator=gen)
    with pytest.raises(ValueError, match="weights"):
        window_gemm(x, weights[:, :5], bias)
    with pytest.raises(ValueError, match="weights"):
        window_gemm(x, torch.randn(4, 8, 6), bias)
    with pytest.raises(ValueError, match="bias"):
        window_gemm(x, weights, bias[:5])
    with pytest.raises(ValueError, match="tap_bias"):
        window_gemm(x, weights, bias, tap_bias=torch.randn(2, 6))
    with pytest.raises(ValueError, match="virtual_rows"):
        window_gemm(x, weights, bias, up=2, virtual_rows=11)
    with pytest.raises(ValueError, match="step"):
        window_gemm(x, weights, bias, step=0)
    with pytest.raises(TypeError, match="out_rows"):
        window_gemm(x, weights, bias, out_rows=2.0)
    with pytest.raises(TypeError, match="x"):
        window_gemm(x.int(), weights, bias)
    with pytest.raises(ValueError, match="x"):
        window_gemm(x[0], weights, bias)
    with pytest.raises(TypeError, match="x"):
        window_gemm(x.double(), weights, bias)
    with pytest.raises(ValueError, match="heads"):
        window_gemm_softmax(x, weights, bias, heads=3)
    with pytest.raises(ValueError, match="both or neither"):
        window_gemm_softmax(x, weights, bias, histogram=torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="columns"):
        window_gemm_softmax(x, torch.randn(3, 8, 300), torch.randn(300))
    with pytest.raises(ValueError, match="taps"):
        window_gemm(x[:, :1], weights, bias, pad=0)              # one row, three taps, no padding
    with pytest.raises(ValueError, match="histogram"):
        window_gemm_softmax(x, weights, bias, out_rows=5, histogram=torch.rand(2, 5, 4, device="meta"),
                            hist_weights=torch.rand(2, 4, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("head,middle", [("kernel", "band"), ("gemm", "band"), ("kernel", "gemm")])
@pytest.mark.parametrize("columns,n", [(128, 8192), (256, 4097)])
def test_decoder_at_real_size_on_gpu(monkeypatch, gemm_calls, columns, n, head, middle):
    """SEA's decoder shapes (16 heads, d = 64, T = 128 and the paper's 256, an odd row count) on CUDA
    through the compiled kernels: the GEMMs against the layers in fp32, as on CPU."""
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS", raising=False)
    monkeypatch.setenv("APPROXATTN_SEA_HEAD", head)
    monkeypatch.setenv("APPROXATTN_SEA_MIDDLE", middle)
    gen = torch.Generator(device="cuda").manual_seed(columns)
    decoder = NonCausalDecoder(64, columns, None, zero_last=True).cuda().eval()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen, device="cuda") * 0.1)
    e = torch.randn(1, 16, n, 128, generator=gen, device="cuda").bfloat16()
    hist = torch.rand(1, 16, n, 128, generator=gen, device="cuda").bfloat16()[..., :64]
    n_valid = torch.tensor([n], device="cuda")
    with torch.no_grad():
        logits, probs, best = decoder.logits_and_probs(e, histogram=hist, n_valid=n_valid)
        monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
        exact_logits, exact_probs, _ = decoder.logits_and_probs(e.float(), histogram=hist.float(), n_valid=n_valid)
    assert gemm_calls == ["gemm", middle]
    assert torch.isfinite(probs).all() and torch.equal(best, probs.argmax(-1))
    assert rel_err(logits.float(), exact_logits) < 1e-2
    assert rel_err(probs, exact_probs) < 2e-2
