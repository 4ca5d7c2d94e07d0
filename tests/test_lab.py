"""The approximation lab without the pretrained models: metrics on hand-computed cases, robust PCA,
spectra, budgets, input specs, timing, and `compare` / `advise` end to end on synthetic inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import approxattn
from approxattn.lab import metrics
from approxattn.lab.budgets import BUDGET_OPTIONS, method_budgets, parse_budget_overrides
from approxattn.lab.cli import main as lab_main
from approxattn.lab.inputs import expand_spec, parse_spec, synthetic_qkv
from approxattn.lab.report import REPORT_FILES
from approxattn.lab.rpca import robust_pca
from approxattn.lab.runner import CompareConfig, exact_output, hybrid_parts, run_compare, uniform_output
from approxattn.lab.spectrum import randomized_svd, rank_profile
from approxattn.lab.text import load_text, text_window
from approxattn.lab.timing import median_time, peak_memory

# ----------------------------------------------------------------------------- metrics, by hand


def test_relative_error_by_hand():
    assert metrics.relative_error(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert metrics.relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.relative_error(torch.zeros(2), torch.zeros(3))


def test_relative_error_per_head_by_hand():
    exact = torch.ones(1, 2, 2, 1)
    approx = torch.ones(1, 2, 2, 1)
    approx[0, 1] = 0.0
    assert metrics.relative_error_per_head(approx, exact) == pytest.approx([0.0, 1.0])


def test_spectral_norm_and_matrix_errors_by_hand():
    m = torch.diag(torch.tensor([3.0, 1.0]))
    assert float(metrics.spectral_norm(m)) == pytest.approx(3.0, rel=1e-9)
    exact = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    approx = exact + torch.tensor([[0.1, -0.1], [0.0, 0.0]])
    errors = metrics.matrix_errors(approx, exact)
    # ‖Δ‖_F = ‖Δ‖_2 = 0.1·√2 (rank one); ‖exact‖_F = √(0.25+0.25+0.0625+0.5625)
    assert errors["mat_fro_err"] == pytest.approx(0.1 * math.sqrt(2) / math.sqrt(1.125))
    sigma_max = float(torch.linalg.matrix_norm(exact.double(), ord=2))
    assert errors["mat_spec_err"] == pytest.approx(0.1 * math.sqrt(2) / sigma_max, rel=1e-6)


def test_row_kl_by_hand():
    exact = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    approx = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert metrics.row_kl(exact, approx) == pytest.approx(expected)
    # negative / zero approximate entries are clipped and renormalised, never NaN
    assert math.isfinite(metrics.row_kl(exact, torch.tensor([[-1.0, 1.0], [0.0, 1.0]])))


def test_topk_recall_and_mass_by_hand():
    exact = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert metrics.topk_recall(exact, torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 2) == 0.0
    assert metrics.topk_recall(exact, torch.tensor([[0.5, 0.0, 0.5, 0.0]]), 2) == 0.5
    assert metrics.topk_recall(exact, exact, 2) == 1.0
    # a sparse method keeping one key: its support is all it keeps
    assert metrics.topk_recall(exact, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 2) == 0.5
    # a causal first row has one non-zero exact entry: recall counts that one only
    causal = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert metrics.topk_recall(causal, causal, 2) == 1.0
    assert metrics.mass_kept(torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[1.0, 0.0, 0.0]])) == pytest.approx(0.5)
    assert metrics.mass_kept(exact, torch.full((1, 4), 0.25)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k"):
        metrics.topk_recall(exact, exact, 0)


def test_attention_matrix_through_identity_values():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=gen)
    k = torch.randn(1, 2, 12, 8, generator=gen)  # grouped-query: 2 query heads per key head
    v = torch.randn(1, 2, 12, 8, generator=gen)
    for causal in (False, True):
        exact = metrics.exact_matrix(q, k, causal=causal)
        formed = metrics.attention_matrix("softmax", q, k, v, causal=causal)
        assert formed.shape == (1, 4, 12, 12)
        torch.testing.assert_close(formed.double(), exact, atol=1e-6, rtol=0)
        out = exact_output(q, k, v, causal=causal, scale=8 ** -0.5, block=5)
        torch.testing.assert_close(out, exact @ v.double().repeat_interleave(2, dim=1), atol=1e-12, rtol=0)
        if causal:
            assert float(exact[0, 0, 0, 1:].abs().max()) == 0.0


def test_uniform_baseline_by_hand():
    v = torch.tensor([[[[1.0], [3.0], [5.0]]]])
    assert uniform_output(v, 1, causal=False).flatten().tolist() == [3.0, 3.0, 3.0]
    assert uniform_output(v, 1, causal=True).flatten().tolist() == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------- analysis


def test_rpca_recovers_planted_sparse_plus_low_rank():
    gen = torch.Generator().manual_seed(0)
    n, r = 120, 4
    low = torch.randn(n, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen, dtype=torch.float64) / r
    sparse = torch.zeros(n, n, dtype=torch.float64)
    mask = torch.rand(n, n, generator=gen) < 0.05
    sparse[mask] = torch.randn(int(mask.sum()), generator=gen, dtype=torch.float64).sign() * 3
    result = robust_pca(low + sparse)
    assert result.converged
    assert result.rank == r
    assert float((result.low_rank - low).norm() / low.norm()) < 1e-4
    assert float((result.sparse - sparse).norm() / sparse.norm()) < 1e-4
    summary = result.summary(low + sparse)
    assert summary["sparse_density"] == pytest.approx(float(mask.double().mean()), abs=0.01)


def test_rpca_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        robust_pca(torch.zeros(3))
    with pytest.raises(ValueError, match="rho"):
        robust_pca(torch.eye(3), rho=1.0)
    with pytest.raises(ValueError, match="finite"):
        robust_pca(torch.full((2, 2), float("nan")))
    zero = robust_pca(torch.zeros(4, 4))
    assert zero.rank == 0 and zero.converged


def test_randomized_svd_and_rank_profile():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(60, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 50, generator=gen, dtype=torch.float64)
    _, s, _ = randomized_svd(a, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s[:3], torch.linalg.svdvals(a)[:3])
    profile = rank_profile(a, rank=10)
    assert profile["energy_rank_99"] <= 3
    sv = torch.linalg.svdvals(a)
    assert profile["stable_rank"] == pytest.approx(float((sv ** 2).sum() / sv[0] ** 2), rel=1e-6)
    assert profile["energy_top"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- budgets and specs


def test_budgets_read_from_the_registry():
    for name, spec in approxattn.available_methods().items():
        for quick in (False, True):
            budgets = method_budgets(spec, quick=quick)
            assert budgets
            names = {o.name for o in spec.options}
            for budget in budgets:
                assert set(budget) <= names and set(budget) <= set(BUDGET_OPTIONS)
                spec.resolve_options(budget)  # every swept value is valid for the method
            if not any(o.name in BUDGET_OPTIONS for o in spec.options):
                assert budgets == [{}]


def test_budget_overrides_and_clear_errors():
    methods = list(approxattn.available_methods())
    over = parse_budget_overrides(["performer.num_features=8,32"], methods)
    assert method_budgets(approxattn.get_method("performer"), overrides=over) == [{"num_features": 8},
                                                                                  {"num_features": 32}]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_budget_overrides(["nope.rank=3"], methods)
    with pytest.raises(ValueError, match="has no option 'nope'"):
        parse_budget_overrides(["performer.nope=3"], methods)
    with pytest.raises(ValueError, match="impossible budget"):
        parse_budget_overrides(["performer.num_features=0"], methods)
    with pytest.raises(ValueError, match="none of the selected methods"):
        parse_budget_overrides(["nope=3"], methods)
    with pytest.raises(ValueError, match="METHOD.OPTION"):
        parse_budget_overrides(["rank"], methods)


def test_hybrid_constituents_come_from_the_registry():
    for name, spec in approxattn.available_methods().items():
        low_rank, kernel, _, reason = hybrid_parts(name)
        if spec.family != "hybrid":
            assert reason is not None
            continue
        assert reason is None
        assert approxattn.get_method(low_rank).family == "low-rank"
        assert approxattn.get_method(kernel).family == "kernel"


def test_input_specs_and_clear_errors():
    assert parse_spec("minilm:n=128,256:layers=1") == ("minilm", {"n": [128, 256], "layers": [1]})
    with pytest.raises(ValueError, match="unknown source"):
        parse_spec("gpt2:n=10")
    with pytest.raises(ValueError, match="unknown key"):
        parse_spec("gaussian:layers=1")
    with pytest.raises(ValueError, match="at most 512 tokens"):
        expand_spec("minilm:n=1024")
    with pytest.raises(ValueError, match="at most 8192 tokens"):
        expand_spec("smollm2:n=9000")
    with pytest.raises(ValueError, match="layers 0..5"):
        expand_spec("minilm:n=64:layers=6")
    with pytest.raises(ValueError, match="unknown text"):
        expand_spec("minilm:text=bible")
    # GQA: asking for query head 4 of SmolLM2 takes its whole key/value group (heads 3, 4, 5)
    inp = expand_spec("smollm2:n=64,128:layers=2:heads=4")
    assert [i.seq_len for i in inp] == [64, 128]
    assert inp[0].meta["head_ids"] == [3, 4, 5] and inp[0].kv_heads == 1 and inp[0].causal


def test_synthetic_inputs():
    g = expand_spec("gaussian:n=64:spread=1,4:heads=2:d=16")
    assert [i.id for i in g] == ["gaussian/s1/h2d16/n64", "gaussian/s4/h2d16/n64"]
    logits = (g[1].q @ g[1].k.transpose(-1, -2)) * g[1].scale
    assert float(logits.std()) == pytest.approx(4.0, rel=0.15)
    peaked = synthetic_qkv("peaked", n=128, heads=2, head_dim=32, sharpness=10.0)
    a = metrics.exact_matrix(peaked["q"], peaked["k"], scale=peaked["scale"])
    assert float(a.max(dim=-1).values.median()) > 0.9  # low-entropy rows


def test_shipped_text():
    assert load_text("kjv").startswith("In the beginning God created the heaven and the earth.")
    assert "%" not in load_text("fortunes")[:2000]
    long = text_window("fortunes", 3 * len(load_text("fortunes")))  # concatenates the text
    assert len(long) == 3 * len(load_text("fortunes"))
    with pytest.raises(ValueError, match="unknown text"):
        load_text("wiki")


def test_timing_and_peak_memory():
    timing = median_time(lambda: torch.ones(10).sum(), min_reps=3, budget_s=0.0)
    assert timing["reps"] == 3 and timing["median_s"] > 0

    def twice():
        x = torch.ones(1000)  # 4000 bytes
        y = x * 2  # 4000 more, both alive
        return y.sum()

    assert peak_memory(twice) == 8000
    assert peak_memory(lambda: torch.ones(250)) == 0  # only the output


# ----------------------------------------------------------------------------- compare / advise


SYNTHETIC = ["--input", "gaussian:n=64:heads=2:d=16", "--input", "peaked:n=64:heads=2:d=16:causal=1"]


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cache = tmp_path_factory.mktemp("cache")
    config = CompareConfig(inputs=[SYNTHETIC[1], SYNTHETIC[3]], scaling=[64, 128], quick=True, out=str(out),
                           cache=str(cache), threads=1, time_budget_s=0.0)
    result = run_compare(config, progress=False)
    return result, out, cache


def test_compare_report_has_every_promised_file(synthetic_report):
    result, out, _ = synthetic_report
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(REPORT_FILES) <= set(summary["files"])
    assert all(status == "ok" or status.startswith("no data") for status in summary["plots"].values())
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| method |" in (out / "table.md").read_text()


def test_compare_runs_every_method_and_says_why_not(synthetic_report):
    result, _, _ = synthetic_report
    rows = [r for r in result.rows if r["kind"] == "measure"]
    methods = approxattn.available_methods()
    assert {r["method"] for r in rows} == set(methods)
    for r in rows:
        assert r["status"] in ("ok", "n/a")
        if r["status"] == "n/a":
            assert r["reason"]
        if r["causal"] and not methods[r["method"]].supports_causal:
            assert r["status"] == "n/a" and "causal" in r["reason"]
    exact = [r for r in rows if r["method"] == "softmax"]
    assert all(r["out_rel_err"] < 1e-5 for r in exact)
    # quick budgets above the sequence length (rank 128 > n=64) are n/a with the method's own reason
    too_big = [r for r in rows if r["method"] == "linformer" and r["budget"].get("rank") == 128 and not r["causal"]]
    assert too_big and all(r["status"] == "n/a" and "128" in r["reason"] for r in too_big)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["time_ms"] > 0 and r["cost_flops"] > 0 and "peak_mem_bytes" in r for r in ok)
    assert all("mat_spec_err" in r and 0 <= r["topk_recall"] <= 1 for r in ok)
    assert {r["seq_len"] for r in result.rows if r["kind"] == "scaling"} == {64, 128}
    hybrid = [r for r in result.rows if r["kind"] == "hybrid" and r["status"] == "ok"]
    assert hybrid and all(r["err_hybrid"] <= r["triangle_bound"] + 1e-9 for r in hybrid)


def test_compare_resumes(synthetic_report):
    result, out, cache = synthetic_report
    config = CompareConfig(inputs=[SYNTHETIC[1], SYNTHETIC[3]], scaling=[64, 128], quick=True, out=str(out),
                           cache=str(cache), threads=1, plots=False)
    again = run_compare(config, progress=False)
    assert again.computed == 0 and again.reused == result.computed + result.reused


def test_advise_from_measurements(synthetic_report, capsys):
    _, out, cache = synthetic_report
    from approxattn.lab.advise import advise

    advice = advise(seq_len=64, head_dim=16, max_error=0.5, measurements=[str(out)])
    assert advice["recommendation"]["meets_target"]
    assert advice["recommendation"]["error_estimate"] <= 0.5
    causal = advise(seq_len=64, head_dim=16, causal=True, max_error=1e-3, cache=str(cache))
    assert approxattn.get_method(causal["recommendation"]["method"]).supports_causal
    assert lab_main(["advise", "--seq-len", "100", "--head-dim", "16", "--measurements", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Recommended" in text and "Confidence" in text


def test_cli_bad_arguments(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert lab_main(["compare", "--methods", "softmax,nope", "--out", out]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert lab_main(["compare", *SYNTHETIC, "--budget", "linformer.rank=100", "--out", out]) == 2
    assert "impossible budget" in capsys.readouterr().err
    assert lab_main(["compare", "--input", "minilm:n=600", "--out", out]) == 2
    assert "at most 512 tokens" in capsys.readouterr().err
    assert lab_main(["compare", "--input", "smollm2", "--seq-len", "10000", "--out", out]) == 2
    assert "at most 8192 tokens" in capsys.readouterr().err
    assert lab_main(["advise", "--seq-len", "64", "--head-dim", "16", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert lab_main(["advise", "--seq-len", "64", "--head-dim", "16", "--measurements", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lab_main(["advise", "--seq-len", "0", "--head-dim", "16"])
