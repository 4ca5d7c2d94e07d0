"""The bench harness without a GPU: the CLI wiring, the roofline floors and the report."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from approxattn.bench import add_commands, presets, report
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
