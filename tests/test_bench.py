"""The bench harness without a GPU: the CLI wiring, the roofline floors and the report."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
import torch

from approxattn.bench import add_commands, presets, report, runner
from approxattn.bench.case import Case, graphed_label
from approxattn.bench.impls import build
from approxattn.bench.runner import floors

DEVICE = {"name": "test device", "multiprocessors": 1, "memory_gib": 1.0, "bandwidth_bytes_per_s": 3e12,
          "matmul_flops_per_s": {"bfloat16": 7e14, "float16": 7e14, "float32": 5e13}, "torch": "x", "cuda": "y",
          "triton": "z", "python": "3", "date": "today"}


def test_add_commands_builds_bench_parser():
    parser = argparse.ArgumentParser(prog="approxattn")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "run", "--preset", "quick", "--seq", "1024,4096"])
    assert args.func.__name__ == "run_command" and args.seq == (1024, 4096)
    args = parser.parse_args(["bench", "report", "results.json"])
    assert args.func.__name__ == "report_command"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_run_needs_cuda(capsys):
    from approxattn.bench.cli import main

    assert main(["run", "--preset", "quick"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_floors_from_registry_costs():
    case = next(c for c in presets.noncausal_family(65536) if c.label == "FAVOR+ m=256 (fused)")
    f = floors(case, DEVICE)
    io = 4 * 1 * 16 * 65536 * 64 * 2  # q, k, v, o in bf16
    assert f["io_bytes"] == io
    assert f["fwd"] == pytest.approx(max(f["flops"] / 7e14, io / 3e12) * 1e3)
    assert f["fwd+bwd"] == pytest.approx(3 * f["fwd"])
    assert presets.causal_family(1024)[0].impl == "sdpa"


def test_report_markdown_targets_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for i, case in enumerate(presets.headline((1024, 65536, 131072))):
        ms = 100.0 if case.impl == "sdpa" else 1.0 + i * 1e-3
        row = {"case": case.key(), "fwd": ms / 3, "fwd+bwd": ms, "floor": floors(case, DEVICE)}
        if case.impl == "fused":
            row.update(peak_bytes=1.1e9, qkvo_and_grads_bytes=1e9, peak_over_io=1.1)
        rows.append(row)
    data = {"device": DEVICE, "command": "test", "results": rows}
    report.save(data, tmp_path / "results.json")
    text = report.markdown(json.loads((tmp_path / "results.json").read_text()))
    assert "## Targets" in text and "N=131,072" in text
    targets = report.targets(report._headline_rows(rows))
    favor = next(t for t in targets if t["target"].startswith("FAVOR+ m=256 (fused) vs SDPA"))
    assert favor["met"] and favor["value"] > 65
    written = report.plots(data, tmp_path)
    assert {p.name for p in written} == {"time_vs_n.png", "speedup_vs_sdpa.png", "memory_vs_n.png",
                                          "fraction_of_floor.png"}


def test_flurka_preset_pairs_each_fusion_with_its_constituent():
    """Preset ``flurka``: every fused FLuRKA row is compared with FAVOR+ of its m (r < m) or Linformer of
    its r (m < r) at its own N, with the multiply-accumulate ceiling of that ratio beside it."""
    cases = presets.flurka((4096, 65536))
    fake_ms = {"FAVOR+ m=256 (fused)": 2.0, "FLuRKA r=32 m=256 (fused)": 1.0, "FLuRKA r=128 m=256 (fused)": 1.6,
               "Linformer r=128 (PyTorch)": 24.0, "FLuRKA r=128 m=32 (fused)": 1.5}
    fake_fwd = {"FAVOR+ m=256 (fused)": 0.9, "FLuRKA r=32 m=256 (fused)": 0.5}
    rows = [{"case": c.key(), "fwd": fake_fwd.get(c.label), "fwd+bwd": fake_ms.get(c.label, 3.0) * (c.seq / 65536),
             "floor": None} for c in cases]
    rows.append({"case": Case("reference", "FAVOR+ m=256 (PyTorch ref)", 65536, False, method="performer",
                              options={"num_features": 256}).key(), "fwd": None, "fwd+bwd": 50.0, "floor": None})
    claims = {t["target"]: t for t in report.flurka_claims(rows)}
    assert all(t in report.targets(report._headline_rows(rows)) for t in claims.values())
    flurka_rows = [c for c in cases if c.method == "flurka-performer"]
    assert len(claims) == len(flurka_rows) and all(c.options["rank"] != c.options["num_features"] for c in flurka_rows)
    fast = claims["FLuRKA r=32 m=256 vs Performer m=256 fused (r < m), N=65,536 fwd+bwd"]
    assert fast["value"] == pytest.approx(2.0) and fast["met"] and fast["goal"] == "≥ 1.7×"
    assert "MAC ceiling 1.78×" in fast["detail"]  # 2·256 / (32 + 256 + 32·256/65536)
    assert fast["detail"].endswith("forward alone 1.80×")  # 0.9 / 0.5; the goal is read on fwd+bwd
    assert "forward" not in claims["FLuRKA r=128 m=256 vs Performer m=256 fused (r < m), N=65,536 fwd+bwd"]["detail"]
    slow = claims["FLuRKA r=128 m=256 vs Performer m=256 fused (r < m), N=65,536 fwd+bwd"]
    assert slow["value"] == pytest.approx(1.25) and not slow["met"]  # against the fused FAVOR+, not the reference
    lowrank = claims["FLuRKA r=128 m=32 vs Linformer r=128 (m < r), N=65,536 fwd+bwd"]
    assert lowrank["value"] == pytest.approx(16.0) and lowrank["met"] and lowrank["goal"] == "≥ 3.3×"
    assert claims["FLuRKA r=128 m=32 vs Linformer r=128 (m < r), N=4,096 fwd+bwd"]["value"] == pytest.approx(16.0)


def test_every_preset_but_quick_takes_the_sequence_lengths():
    import inspect

    for name, builder in presets.PRESETS.items():
        takes = "seqs" in inspect.signature(builder).parameters
        assert takes == (name != "quick"), name
        if takes:
            assert {c.seq for c in builder((4096,))} == {4096}, name


def _sdpa_case(backend: str, causal: bool = False) -> Case:
    return Case("sdpa", f"SDPA {backend}", 64, causal, heads=2, head_dim=16, dtype="float32", method="softmax",
                options={"backend": backend})


def test_sdpa_backend_option_is_checked():
    with pytest.raises(ValueError, match=r"backend.*'flash'.*'cudnn'.*'efficient'.*'default'.*'cuda'"):
        build(_sdpa_case("cuda"), device="cpu")
    for backend in ("flash", "default"):  # both run on the CPU; cuDNN and efficient need CUDA
        run, make = build(_sdpa_case(backend), device="cpu")
        q, k, v, _ = make(False, 0)
        torch.testing.assert_close(run(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_unavailable_sdpa_backend_is_recorded_and_the_sweep_goes_on(monkeypatch):
    # the cuDNN backend has no kernel for CPU tensors: the same "no available kernel" RuntimeError a GPU without
    # it raises; do_bench (CUDA events) is replaced by one call of the step
    monkeypatch.setattr(runner, "build", lambda case: build(case, device="cpu"))
    fake_triton_testing = types.ModuleType("triton.testing")
    fake_triton_testing.do_bench = lambda fn, **_: fn() or 1.0
    monkeypatch.setitem(sys.modules, "triton.testing", fake_triton_testing)
    failed, timed = (runner.time_case(_sdpa_case(b), memory=False) for b in ("cudnn", "flash"))
    assert failed["fwd"] is None and failed["fwd+bwd"] is None
    assert [note.split(":")[:2] for note in failed["notes"]] == [["fwd", " RuntimeError"], ["fwd+bwd", " RuntimeError"]]
    assert timed == {"fwd": 1.0, "fwd+bwd": 1.0}
    assert runner.time_case(_sdpa_case("cuda"), memory=False)["error"].startswith("ValueError: sdpa option backend")


def test_headline_times_other_sdpa_backends_from_16k_only():
    extra = {"SDPA cuDNN", "SDPA cuDNN causal", "SDPA default", "SDPA default causal"}
    for seq in presets.HEADLINE_SEQ:
        found = {c.label: c.options["backend"] for c in presets.headline((seq,)) if c.label in extra}
        expected = ({"SDPA cuDNN": "cudnn", "SDPA cuDNN causal": "cudnn", "SDPA default": "default",
                     "SDPA default causal": "default"} if seq >= 16384 else {})
        assert found == expected, seq
    assert not extra & {c.label for c in presets.quick()}
    flash = [c for c in presets.headline() if c.label.startswith("SDPA flash")]
    assert len(flash) == 2 * len(presets.HEADLINE_SEQ) and all(c.options == {} for c in flash)


def _report_rows(sdpa_ms: dict[str, float | None]) -> list[dict]:
    """Headline rows at N=1K and 64K: each SDPA label at ``sdpa_ms`` (left out when absent), ours at 1 ms."""
    rows = []
    for case in presets.headline((1024, 65536)):
        base = case.label.removesuffix(" causal")
        if case.impl == "sdpa" and base not in sdpa_ms:
            continue
        ms = sdpa_ms[base] if case.impl == "sdpa" else 1.0
        rows.append({"case": case.key(), "fwd": ms and ms / 3, "fwd+bwd": ms, "floor": floors(case, DEVICE)})
    return rows


def test_report_names_the_fastest_sdpa_backend_only_when_another_was_timed():
    def text(sdpa_ms):
        return report.markdown({"device": DEVICE, "command": "test", "results": _report_rows(sdpa_ms)})

    lines = text({"SDPA flash": 200.0, "SDPA cuDNN": 130.0, "SDPA default": 135.0}).splitlines()
    extra = [line for line in lines if "fastest SDPA" in line]
    assert len(extra) == 2
    assert extra[0].startswith("| FAVOR+ m=256 (fused) vs fastest SDPA backend (SDPA cuDNN), N=65,536 non-causal")
    assert extra[1].startswith("| elu+1 linear causal (fused) vs fastest SDPA backend (SDPA cuDNN causal), "
                               "N=65,536 causal")
    assert "| 130.00 | informative | — | 1.00 ms vs SDPA cuDNN 130 ms |" in extra[0]
    # the target stays against the flash backend
    assert any(line.startswith("| FAVOR+ m=256 (fused) vs SDPA, N=65,536") and "| 200.00 |" in line for line in lines)
    # flash alone, or the other backends failed: nothing extra
    for sdpa_ms in ({"SDPA flash": 200.0}, {"SDPA flash": 200.0, "SDPA cuDNN": None, "SDPA default": None}):
        assert "fastest SDPA" not in text(sdpa_ms)


def test_floor_of_a_forced_sdpa_backend_is_the_softmax_floor():
    flash, cudnn = (next(c for c in presets.noncausal_family(65536) if c.label == label)
                    for label in ("SDPA flash", "SDPA cuDNN"))
    assert floors(cudnn, DEVICE) == floors(flash, DEVICE)


def test_crossover_preset_pairs_every_case_with_its_cuda_graph_twin():
    cases = presets.crossover((1024, 2048))
    inference = [c for c in cases if c.impl == "graphed"]
    eager = [c for c in cases if not c.graphed and c.impl != "graphed"]
    twins = {(c.label, c.seq): c for c in cases if c.graphed}
    assert {c.label for c in eager} == {"SDPA flash", "FAVOR+ m=256 (fused)", "elu+1 linear (fused)",
                                        "SDPA flash causal", "elu+1 linear causal (fused)"}
    assert len(twins) == len(eager) == (len(cases) - len(inference)) // 2
    # each fused path's inference through approxattn.graphed, forward only
    assert {(c.label, c.method, c.causal, c.modes) for c in inference if c.seq == 1024} == {
        ("FAVOR+ m=256 (approxattn.graphed inference)", "performer", False, ("fwd",)),
        ("elu+1 linear (approxattn.graphed inference)", "linear", False, ("fwd",)),
        ("elu+1 linear causal (approxattn.graphed inference)", "linear", True, ("fwd",))}
    for c in eager:
        twin = twins[(graphed_label(c.label), c.seq)]
        assert twin.key() == {**c.key(), "label": twin.label, "graphed": True}
    assert graphed_label("FAVOR+ m=256 (fused)") == "FAVOR+ m=256 (fused, CUDA graph)"
    assert graphed_label("SDPA flash causal") == "SDPA flash causal (CUDA graph)"


def test_report_crossover_under_cuda_graphs():
    """Eager: our path slower at 1K and 2K (launch-bound); graphed: faster from 2K. The report gives
    both cross-overs, each against SDPA timed the same way."""
    rows = []
    for case in presets.crossover((1024, 2048, 4096)):
        if case.impl == "sdpa" and case.graphed:
            ms = {1024: 0.05, 2048: 0.20, 4096: 0.60}[case.seq]
        elif case.impl == "sdpa":  # eager SDPA: slower at 1K, where a graphed row compared with it would win
            ms = {1024: 0.20, 2048: 0.25, 4096: 0.65}[case.seq]
        elif case.graphed:
            ms = {1024: 0.12, 2048: 0.10, 4096: 0.15}[case.seq]
        else:
            ms = {1024: 0.45, 2048: 0.45, 4096: 0.46}[case.seq]
        rows.append({"case": case.key(), "fwd": ms / 3, "fwd+bwd": ms, "floor": None})
    targets = {t["target"]: t for t in report.targets(report._headline_rows(rows))}
    eager = targets["cross-over of FAVOR+ m=256 (fused) with SDPA (fwd+bwd)"]
    assert eager["value"] == 4096 and not eager["met"]
    graphed = targets["cross-over of FAVOR+ m=256 (fused, CUDA graph) with SDPA flash (CUDA graph) (fwd+bwd)"]
    assert graphed["value"] == 2048 and graphed["met"]
    causal = targets["cross-over of elu+1 linear causal (fused, CUDA graph) with SDPA flash causal (CUDA graph) "
                     "(fwd+bwd)"]
    assert causal["value"] == 2048 and causal["met"]
    # speed-ups: a graphed row over graphed SDPA (0.05 / 0.12 at 1K), never over the eager one
    table = report.speedup_table(report._headline_rows(rows), causal=False)
    row = next(line for line in table.splitlines() if line.startswith("| FAVOR+ m=256 (fused, CUDA graph)"))
    assert row.split("|")[2].strip() == f"{0.05 / 0.12:.2f}×"
    assert "| SDPA flash (CUDA graph) |" not in table


def test_report_lists_only_the_targets_a_run_measured():
    """A run of some cases (the FLuRKA preset, no fla, no SDPA) gives no ratio target whose other side it did not
    time: a missing peer is not a miss. A cross-over whose both sides were timed and never crossed still is one."""
    favor = Case("fused", "FAVOR+ m=256 (fused)", 65536, False, method="performer", options={"num_features": 256})
    rows = [{"case": favor.key(), "fwd": 0.8, "fwd+bwd": 2.2, "floor": None}]
    names = [t["target"] for t in report.targets(report._headline_rows(rows))]
    assert not any("SDPA" in n or "performer-pytorch" in n or "fla" in n or "cross-over" in n for n in names), names
    rows = []
    for case in presets.crossover((2048, 4096)):
        if not case.graphed:
            rows.append({"case": case.key(), "fwd": None, "fwd+bwd": 1.0 if case.impl == "fused" else 0.5,
                         "floor": None})
    never = {t["target"]: t for t in report.targets(report._headline_rows(rows))}
    miss = never["cross-over of FAVOR+ m=256 (fused) with SDPA (fwd+bwd)"]
    assert miss["value"] is None and miss["met"] is False and "never faster" in miss["detail"]
    assert "| **no** |" in report.markdown({"device": DEVICE, "command": "test", "results": rows})


def test_plots_draw_a_panel_per_kind_timed_and_a_colour_per_series(tmp_path, monkeypatch):
    """A non-causal-only run (the FLuRKA preset) gets one panel, not an empty causal one, and its ~17 series
    get as many colours; a figure with nothing measured (memory under --no-memory) says so."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"case": c.key(), "fwd": 0.1, "fwd+bwd": 0.3 * i + 1, "floor": floors(c, DEVICE)}
            for i, c in enumerate(presets.flurka((16384, 65536)))]
    figures, close = [], plt.close
    with monkeypatch.context() as mp:
        mp.setattr(plt, "close", figures.append)   # keep the figures to inspect them
        report.plots({"device": DEVICE, "command": "test", "results": rows}, tmp_path)
    time_fig, memory_fig = figures[0], figures[2]
    assert len(time_fig.axes) == 1 and time_fig.axes[0].get_title().startswith("non-causal")
    lines = time_fig.axes[0].get_lines()
    assert len(lines) == len({c.label for c in presets.flurka((16384,))})
    assert len({line.get_color() for line in lines}) == len(lines)
    assert any("not measured" in t.get_text() for t in memory_fig.axes[0].texts)
    for fig in figures:
        close(fig)


@pytest.mark.gpu
def test_graphed_step_replays_the_eager_result():
    """A graphed fused fwd+bwd writes the same gradients as the eager call on the same inputs."""
    case = Case("fused", "FAVOR+ m=64 (fused)", 2048, False, heads=2, method="performer",
                options={"num_features": 64})
    run, make = build(case)
    q, k, v, do = make(True, 0)
    want = torch.autograd.grad(run(q, k, v), (q, k, v), do)
    got = []

    def body(inputs):
        q, k, v, do = inputs
        got[:] = torch.autograd.grad(run(q, k, v), (q, k, v), do)

    step = runner.graphed_step(body, [(q, k, v, do)])
    for g in got:
        g.zero_()
    step()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-6


def test_select_cases_times_a_case_shared_by_two_presets_once():
    from approxattn.bench.cli import select_cases

    cases = select_cases(["flurka", "headline"], seq=(65536,), match=["FAVOR+ m=256 (fused)", "SDPA flash"],
                         exclude=["causal"])
    assert [c.label for c in cases] == ["FAVOR+ m=256 (fused)", "SDPA flash"]
    assert [c.label for c in select_cases(["quick"], seq=(65536,), impls=["sdpa"])] == ["SDPA flash",
                                                                                         "SDPA flash causal"]
