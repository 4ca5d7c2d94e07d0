"""The report folder of ``approxattn compare``: JSON/CSV of every measurement, tables and plots.

Files (all in the report folder):

* ``results.jsonl``  every row, appended while measuring (the resume log)
* ``measurements.csv``  one line per (input, method, budget) and per scaling point
* ``hybrid.csv``  hybrid (FLuRKA) errors against their constituents' errors
* ``analysis.json``  spectrum / effective rank / robust-PCA split of the real attention matrices
* ``summary.json``  configuration, environment, methods, the summary table, file list
* ``table.md``  the summary table in markdown (what the README embeds)
* ``pareto.png``  error vs time per input group (Pareto front)
* ``error_vs_budget.png``  error vs budget per method
* ``scaling.png``  time and peak memory vs sequence length (log-log)
* ``heatmaps.png``  exact attention of one head beside each method's approximation
* ``spectrum.png``  singular value spectra and the sparse + low-rank split
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import approxattn

from .budgets import budget_label
from .store import _clean

REPORT_FILES = (
    "results.jsonl", "measurements.csv", "hybrid.csv", "analysis.json", "summary.json", "table.md",
    "pareto.png", "error_vs_budget.png", "scaling.png", "heatmaps.png", "spectrum.png",
)
PLOT_FILES = ("pareto.png", "error_vs_budget.png", "scaling.png", "heatmaps.png", "spectrum.png")

SOURCE_TITLES = {"minilm": "MiniLM", "smollm2": "SmolLM2 (causal)", "gaussian": "Gaussian", "peaked": "peaked"}

CSV_COLUMNS = (
    "kind", "input", "source", "seq_len", "heads", "kv_heads", "head_dim", "causal", "text", "layer", "method",
    "family", "budget_label", "status", "reason", "out_rel_err", "mat_fro_err", "mat_spec_err", "row_kl",
    "topk_recall", "topk", "mass_kept", "time_ms", "time_ms_min", "time_reps", "peak_mem_bytes", "cost_flops",
    "cost_exps", "cost_bytes_moved", "cost_peak_memory", "matrix_reason", "note", "device_type", "device_name",
    "threads",
)
HYBRID_COLUMNS = (
    "input", "seq_len", "method", "budget_label", "status", "reason", "low_rank_method", "kernel_method",
    "err_hybrid", "err_low_rank", "err_kernel", "err_kernel_on_reduced", "triangle_bound", "sum_of_constituents",
    "within_sum", "better_than_both",
)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(values) if values else None


def fmt_err(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1e-4:
        return "<1e-4"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def summary_table(plan: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and budget: median error per source, matrix metrics on real inputs, and time,
    memory and FLOPs at the reference input."""
    measures = [r for r in rows if r and r.get("kind") == "measure"]
    sources = []
    for inp in plan.inputs:
        if inp.source not in sources:
            sources.append(inp.source)
    ref = plan.reference_input
    from .advise import exact_reference

    exact = exact_reference()  # the method most others approximate (softmax), read from the registry
    softmax_time = None
    for r in measures:
        if r["input"] == ref.id and r.get("method") == exact and r["status"] == "ok":
            softmax_time = r.get("time_ms")
    table = []
    reasons: dict[str, str] = {}
    for method in plan.methods:
        spec = approxattn.get_method(method)
        for budget in plan.budgets[method]:
            mine = [r for r in measures if r["method"] == method and r["budget"] == budget]
            entry: dict[str, Any] = {"method": method, "family": spec.family, "budget": budget,
                                     "budget_label": budget_label(budget)}
            for source in sources:
                got = [r for r in mine if r["source"] == source]
                ok = [r["out_rel_err"] for r in got if r["status"] == "ok"]
                entry[f"err_{source}"] = _median(ok)
                if not ok and got:
                    reason = next((r.get("reason") for r in got if r.get("reason")), "n/a")
                    entry[f"err_{source}_reason"] = reason
                    reasons.setdefault(reason, f"[{len(reasons) + 1}]")
            real = [r for r in mine if r.get("kind") == "measure" and r["status"] == "ok" and r.get("source") in
                    {i.source for i in plan.inputs if i.kind == "real"}]
            entry["mat_spec_err"] = _median([r.get("mat_spec_err") for r in real])
            entry["row_kl"] = _median([r.get("row_kl") for r in real])
            entry["topk_recall"] = _median([r.get("topk_recall") for r in real])
            at_ref = next((r for r in mine if r["input"] == ref.id), None)
            if at_ref and at_ref["status"] == "ok":
                entry["time_ms"] = at_ref.get("time_ms")
                entry["speedup"] = softmax_time / at_ref["time_ms"] if softmax_time and at_ref.get("time_ms") else None
                entry["peak_mb"] = at_ref["peak_mem_bytes"] / 2**20 if at_ref.get("peak_mem_bytes") is not None else None
                entry["gflop"] = at_ref["cost_flops"] / 1e9 if at_ref.get("cost_flops") is not None else None
            elif at_ref:
                entry["time_reason"] = at_ref.get("reason")
            table.append(entry)
    baselines = [r for r in rows if r and r.get("kind") == "baseline" and r["status"] == "ok"]
    if baselines:
        entry = {"method": "(mean of v)", "family": "baseline", "budget": {}, "budget_label": "-"}
        for source in sources:
            entry[f"err_{source}"] = _median([r["out_rel_err"] for r in baselines if r["source"] == source])
        table.append(entry)
    return {
        "reference_input": ref.id,
        "reference_seq_len": ref.seq_len,
        "sources": sources,
        "topk": plan.config.topk,
        "rows": table,
        "reasons": {v: k for k, v in reasons.items()},
        "reason_marks": reasons,
    }


def table_columns(summary: dict[str, Any], *, short: bool = False) -> list[tuple[str, str]]:
    cols = [("method", "method"), ("budget_label", "budget")]
    for source in summary["sources"]:
        title = SOURCE_TITLES.get(source, source)
        cols.append((f"err_{source}", title if short else f"err {title}"))
    cols += [
        ("mat_spec_err", "‖ΔA‖₂" if short else "matrix err (spectral)"),
        ("row_kl", "KL" if short else "row KL"),
        ("topk_recall", f"top-{summary['topk']}" if short else f"top-{summary['topk']} recall"),
        ("time_ms", "ms"),
        ("speedup", "×exact" if short else "× softmax"),
        ("peak_mb", "MB" if short else "peak MB"),
        ("gflop", "GFLOP"),
    ]
    return cols


def table_cells(summary: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    marks = summary["reason_marks"]
    cells = []
    for key, _ in table_columns(summary):
        value = entry.get(key)
        if key in ("method", "budget_label"):
            cells.append(str(value))
        elif key.startswith("err_") or key in ("mat_spec_err",):
            reason = entry.get(f"{key}_reason")
            cells.append(f"n/a{marks.get(reason, '')}" if value is None and reason else fmt_err(value))
        elif key == "row_kl":
            cells.append(fmt_num(value, 3) if value is not None else ("" if entry.get("family") == "baseline" else "n/a"))
        elif key == "topk_recall":
            cells.append(f"{value:.2f}" if value is not None else "n/a")
        elif key == "speedup":
            cells.append(f"{value:.2f}×" if value is not None else "n/a")
        elif key == "gflop":
            cells.append(f"{value:.3f}" if value is not None else "n/a")
        else:
            cells.append(fmt_num(value))
    if entry.get("family") == "baseline":
        cells = [c if c != "n/a" else "" for c in cells]
    return cells


def markdown_table(summary: dict[str, Any], env: dict[str, Any]) -> str:
    cols = table_columns(summary)
    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    for entry in summary["rows"]:
        lines.append("| " + " | ".join(table_cells(summary, entry)) + " |")
    notes = [
        "",
        f"Errors: relative output error ‖o − o*‖_F/‖o*‖_F against exact softmax attention (float64), median over "
        f"the inputs of each source; matrix error, row KL and top-{summary['topk']} recall: median over real inputs "
        f"with n ≤ the matrix limit. Time (median), peak memory (measured, beyond the output) and GFLOP "
        f"(registry cost formula) at `{summary['reference_input']}`; {env['device_type']} "
        f"({env['device_name']}, {env['threads']} threads), torch {env['torch']}.",
    ]
    for mark, reason in summary["reasons"].items():
        notes.append(f"{mark} n/a: {reason}")
    return "\n".join(lines + notes) + "\n"


def rich_table(summary: dict[str, Any], title: str | None = None):
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold", caption=(
        "relative output error ‖o−o*‖/‖o*‖ per input source (median); ‖ΔA‖₂, KL, top-k: attention-matrix metrics "
        "on real inputs; ms, ×exact, MB (measured peak), GFLOP (cost model) at the reference input"))
    for key, name in table_columns(summary, short=True):
        table.add_column(name, justify="left" if key in ("method", "budget_label") else "right", no_wrap=key == "method")
    previous = None
    for entry in summary["rows"]:
        cells = table_cells(summary, entry)
        if entry["method"] == previous:
            cells[0] = ""
        previous = entry["method"]
        table.add_row(*cells)
    return table


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _clean(row.get(k)) for k in columns})


def write_report(plan: Any, rows: list[dict[str, Any]], env: dict[str, Any], *, config: dict[str, Any],
                 environment: dict[str, Any], wall_s: float, computed: int, reused: int,
                 extra: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Write the report files of a finished run into ``plan.out_dir``; returns (file names, summary).
    ``config`` and ``environment``: the run's options and machine, as the runner records them."""
    out = plan.out_dir
    rows = [r for r in rows if r]
    measures = [r for r in rows if r["kind"] in ("measure", "scaling")]
    _write_csv(out / "measurements.csv", measures, CSV_COLUMNS)
    _write_csv(out / "hybrid.csv", [r for r in rows if r["kind"] == "hybrid"], HYBRID_COLUMNS)
    analysis = {
        "spectrum": [r for r in rows if r["kind"] == "spectrum"],
        "rpca": [r for r in rows if r["kind"] == "rpca"],
    }
    (out / "analysis.json").write_text(json.dumps(_clean(analysis), indent=1))
    summary = summary_table(plan, rows)
    (out / "table.md").write_text(markdown_table(summary, env))
    plot_status: dict[str, str] = {}
    if plan.config.plots:
        from .plots import write_plots

        plot_status = write_plots(plan, rows, out)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    document = {
        "config": config,
        "environment": environment,
        "wall_s": wall_s,
        "rows_computed": computed,
        "rows_reused": reused,
        "methods": {m: approxattn.get_method(m).describe() for m in plan.methods},
        "budgets": plan.budgets,
        "inputs": [i.describe() for i in plan.inputs],
        "table": summary,
        "hybrid": [r for r in rows if r["kind"] == "hybrid"],
        "plots": plot_status,
        "files": sorted(set(files) | {"summary.json"}),
        **(extra or {}),
    }
    (out / "summary.json").write_text(json.dumps(_clean(document), indent=1, default=str))
    return document["files"], document
