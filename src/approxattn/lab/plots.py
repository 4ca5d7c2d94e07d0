"""PNG plots of a comparison (matplotlib, Agg backend). Every plot file is always written: a plot
without data says so in the figure instead of being left out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

import approxattn

from . import metrics
from .budgets import budget_label

ERR_FLOOR = 1e-2  # errors below it (exact softmax, ~1e-7) are drawn at it


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(methods: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    return {m: cmap(i % 20) for i, m in enumerate(methods)}


def _markers(methods: list[str]) -> dict[str, str]:
    shapes = "osD^v<>PX*hp"
    return {m: shapes[i % len(shapes)] for i, m in enumerate(methods)}


def _empty(path: Path, title: str, message: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"no data: {message}"


def _footer(fig, env_text: str) -> None:
    fig.text(0.5, -0.01, env_text, ha="center", va="top", fontsize=7, color="0.35")


def _env_text(rows: list[dict[str, Any]]) -> str:
    for r in rows:
        if r.get("device_name"):
            return f"{r['device_type']}: {r['device_name']}, {r['threads']} threads"
    return ""


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both time and error, sorted by time."""
    front, best = [], math.inf
    for t, e in sorted(points):
        if e < best:
            front.append((t, e))
            best = e
    return front


def plot_pareto(plan, rows, path: Path) -> str:
    plt = _plt()
    measures = [r for r in rows if r.get("kind") == "measure" and r["status"] == "ok" and r.get("time_ms")]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in measures:
        groups.setdefault((r["source"], r["seq_len"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["method"] for r in v}) >= 2}
    if not groups:
        return _empty(path, "error vs time", "fewer than two methods measured on any input")
    keys = sorted(groups, key=lambda k: ([i.source for i in plan.inputs].index(k[0]), k[1]))[:6]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    colors, marks = _colors(plan.methods), _markers(plan.methods)
    for ax, key in zip(axes.flat, keys):
        group = groups[key]
        # one point per (method, budget): median time and median error over the group's inputs
        agg: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in group:
            agg.setdefault((r["method"], r["budget_label"]), []).append(r)
        points = []
        for (method, label), rs in agg.items():
            t = sorted(r["time_ms"] for r in rs)[len(rs) // 2]
            e = max(sorted(r["out_rel_err"] for r in rs)[len(rs) // 2], ERR_FLOOR)
            points.append((t, e))
            ax.scatter(t, e, color=colors[method], marker=marks[method], s=36, zorder=3,
                       label=method if label == next(lab for (m, lab) in agg if m == method) else None)
        base = sorted(r["out_rel_err"] for r in rows if r.get("kind") == "baseline" and r.get("status") == "ok"
                      and r["source"] == key[0] and r["seq_len"] == key[1])
        if base:
            ax.axhline(max(base[len(base) // 2], ERR_FLOOR), color="0.5", ls=":", lw=1, label="mean of v (baseline)")
        front = pareto_front(points)
        for (method, label), rs in agg.items():
            t = sorted(r["time_ms"] for r in rs)[len(rs) // 2]
            e = max(sorted(r["out_rel_err"] for r in rs)[len(rs) // 2], ERR_FLOOR)
            if (t, e) in front:  # label the front only: the rest would be unreadable
                ax.annotate(f"{method} {label}".replace(" -", ""), (t, e), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color="0.2")
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.2", lw=1, ls="--",
                zorder=2, label="Pareto front")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(bottom=ERR_FLOOR / 1.5)
        source, n = key
        causal = any(r["causal"] for r in group)
        ax.set_title(f"{source}, n={n}" + (" (causal)" if causal else "") + f", {len({r['input'] for r in group})} input(s)",
                     fontsize=10)
        ax.set_xlabel("median time (ms)")
        ax.set_ylabel("relative output error")
        ax.grid(True, which="both", alpha=0.25)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(7, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, 1.0 + 0.04 * math.ceil(len(handles) / 7) / nrows))
    fig.suptitle("Error vs time: every method and budget against exact softmax attention (median over a group's "
                 f"inputs; errors below {ERR_FLOOR:g} drawn at {ERR_FLOOR:g})", y=1.0 + 0.09 * math.ceil(len(handles) / 7) / nrows, fontsize=11)
    _footer(fig, _env_text(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "ok"


def plot_error_vs_budget(plan, rows, path: Path) -> str:
    plt = _plt()
    swept = [m for m in plan.methods if len(plan.budgets[m]) > 1]
    measures = [r for r in rows if r.get("kind") == "measure" and r["status"] == "ok"]
    swept = [m for m in swept if any(r["method"] == m for r in measures)]
    if not swept:
        return _empty(path, "error vs budget", "no method with more than one budget was measured")
    cols = min(4, len(swept))
    nrows = math.ceil(len(swept) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    sources = []
    for i in plan.inputs:
        if i.source not in sources:
            sources.append(i.source)
    src_colors = {s: plt.get_cmap("Dark2")(i % 8) for i, s in enumerate(sources)}
    for ax, method in zip(axes.flat, swept):
        budgets = plan.budgets[method]
        xs = list(range(len(budgets)))
        for source in sources:
            ys = []
            for budget in budgets:
                errs = sorted(r["out_rel_err"] for r in measures
                              if r["method"] == method and r["budget"] == budget and r["source"] == source)
                ys.append(max(errs[len(errs) // 2], ERR_FLOOR) if errs else math.nan)
            if not all(math.isnan(y) for y in ys):
                ax.plot(xs, ys, marker="o", color=src_colors[source], label=source)
        ax.set_xticks(xs, [budget_label(b) for b in budgets], fontsize=7, rotation=20)
        ax.set_yscale("log")
        ax.set_title(f"{method} ({approxattn.get_method(method).family})", fontsize=10)
        ax.set_ylabel("relative output error", fontsize=8)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(swept):]:
        ax.axis("off")
    fig.suptitle("Error vs budget (median over each source's inputs)", fontsize=11)
    _footer(fig, _env_text(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "ok"


def plot_scaling(plan, rows, path: Path) -> str:
    plt = _plt()
    scaling = [r for r in rows if r.get("kind") == "scaling" and r["status"] == "ok"]
    if not scaling:
        return _empty(path, "time and memory vs sequence length", "no scaling sweep in this run (--scaling)")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors, marks = _colors(plan.methods), _markers(plan.methods)
    for method in plan.methods:
        mine = sorted((r for r in scaling if r["method"] == method), key=lambda r: r["seq_len"])
        if not mine:
            continue
        n = [r["seq_len"] for r in mine]
        label = f"{method} {mine[0]['budget_label']}" if mine[0]["budget_label"] != "-" else method
        ax_t.plot(n, [r["time_ms"] for r in mine], marker=marks[method], color=colors[method], label=label)
        mem = [(r["seq_len"], r["peak_mem_bytes"] / 2**20) for r in mine if r.get("peak_mem_bytes")]
        if mem:
            ax_m.plot(*zip(*mem), marker=marks[method], color=colors[method], label=label)
    for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory beyond the output (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    ax_t.legend(fontsize=7, ncol=2)
    inp = plan.scaling_inputs[0]
    fig.suptitle(f"Time and memory vs sequence length ({inp.source}, {inp.heads} heads, d={inp.head_dim}, "
                 "middle budget)", fontsize=11)
    _footer(fig, _env_text(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "ok"


def _heatmap_input(plan):
    wanted = plan.config.heatmap_input
    if wanted:
        for inp in plan.inputs:
            if inp.id == wanted or inp.id.startswith(wanted):
                return inp
        return None
    candidates = [i for i in plan.inputs if i.seq_len <= plan.config.matrix_limit]
    ref = plan.reference_input
    return ref if ref in candidates else (candidates[0] if candidates else None)


def plot_heatmaps(plan, rows, path: Path) -> str:
    plt = _plt()
    inp = _heatmap_input(plan)
    if inp is None:
        return _empty(path, "attention heat maps", f"no input matches --heatmap-input {plan.config.heatmap_input!r} "
                      f"with n ≤ the matrix limit {plan.config.matrix_limit}")
    if inp.seq_len > plan.config.matrix_limit:
        return _empty(path, "attention heat maps", f"{inp.id}: n={inp.seq_len} > matrix limit")
    head = plan.config.heatmap_head
    if not 0 <= head < inp.heads:
        return _empty(path, "attention heat maps", f"--heatmap-head {head}: {inp.id} has {inp.heads} heads")
    tokens = min(plan.config.heatmap_tokens, inp.seq_len)
    exact = metrics.exact_matrix(inp.q, inp.k, causal=inp.causal, scale=inp.scale)[0, head]
    panels = [("exact softmax", exact, None)]
    for method in plan.methods:
        spec = approxattn.get_method(method)
        budgets = plan.budgets[method]
        budget = budgets[len(budgets) // 2]
        title = f"{method} {budget_label(budget)}".strip(" -")
        if inp.causal and not spec.supports_causal:
            panels.append((title, None, "no causal support"))
            continue
        try:
            with torch.no_grad():
                scale = None if math.isclose(inp.scale, inp.head_dim ** -0.5) else (inp.scale if spec.uses_scale else None)
                maps = metrics.attention_maps(method, inp.q, inp.k, inp.v, causal=inp.causal, scale=scale, **budget)
            # the effective matrix first, then whatever other views the method offers (SEA: its
            # sparse probabilities and the estimator's attention)
            for view, matrix in maps.items():
                panels.append((title if view == "attention" else f"{title}\n({view})", matrix[0, head].double(), None))
        except Exception as err:
            panels.append((title, None, f"{type(err).__name__}"))
    cols = min(5, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.9 * cols, 3.0 * nrows), squeeze=False)
    vmax = float(exact[:tokens, :tokens].quantile(0.995)) or 1.0
    image = None
    for ax, (title, matrix, reason) in zip(axes.flat, panels):
        ax.set_xticks([])
        ax.set_yticks([])
        if matrix is None:
            ax.set_title(title, fontsize=8)
            ax.text(0.5, 0.5, f"n/a\n{reason}", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            continue
        err = metrics.relative_error(matrix, exact) if matrix is not exact else 0.0
        image = ax.imshow(matrix[:tokens, :tokens].numpy(), cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(title + (f"\nmatrix err {err:.2f}" if matrix is not exact else "\n"), fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight (clipped at the 99.5th pct)")
    head_id = inp.meta.get("head_ids", list(range(inp.heads)))[head]
    fig.suptitle(f"{inp.id}, head {head_id}: the first {tokens} queries × keys (matrix error over all n={inp.seq_len})",
                 fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "ok"


def plot_spectrum(plan, rows, path: Path) -> str:
    plt = _plt()
    spectra = [r for r in rows if r.get("kind") == "spectrum" and r["status"] == "ok"]
    rpca = [r for r in rows if r.get("kind") == "rpca" and r["status"] == "ok"]
    if not spectra and not rpca:
        return _empty(path, "spectrum of real attention", "no analysis in this run (real inputs with n ≤ the matrix "
                      "limit, and no --no-analysis)")
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(12, 4.4))
    sources = sorted({r["source"] for r in spectra})
    src_colors = {s: plt.get_cmap("Dark2")(i % 8) for i, s in enumerate(sources)}
    seen = set()
    for r in spectra:
        for head in r["heads_analysis"]:
            s = torch.tensor(head["singular_values"])
            if not len(s) or float(s[0]) == 0:
                continue
            label = r["source"] if r["source"] not in seen else None
            seen.add(r["source"])
            ax_s.plot(range(1, len(s) + 1), (s / s[0]).numpy(), color=src_colors[r["source"]], alpha=0.45, lw=1, label=label)
    ax_s.set_yscale("log")
    ax_s.set_xscale("log")
    ax_s.set_xlabel("index i")
    ax_s.set_ylabel("σ_i / σ_1")
    ax_s.set_title("singular values of exact attention matrices (randomized SVD)", fontsize=10)
    ax_s.grid(True, which="both", alpha=0.25)
    ax_s.legend(fontsize=8)
    labels, low, dens = [], [], []
    for r in rpca:
        for head in r["heads_analysis"]:
            labels.append(f"{r['source']} L{r.get('layer')} h{head['head']}\nrank {head['rank']}/{r['rpca_n']}")
            low.append(head["low_rank_energy"])
            dens.append(head["sparse_density"])
    if labels:
        x = range(len(labels))
        ax_r.bar([i - 0.2 for i in x], low, width=0.4, label="low-rank share of ‖A‖²_F", color="tab:blue")
        ax_r.bar([i + 0.2 for i in x], dens, width=0.4, label="density of the sparse part", color="tab:orange")
        ax_r.set_xticks(list(x), labels, fontsize=6)
        ax_r.set_ylim(0, 1.05)
        ax_r.legend(fontsize=8)
        ax_r.set_title("robust PCA (principal component pursuit): A = L + S", fontsize=10)
    else:
        ax_r.axis("off")
    _footer(fig, _env_text(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "ok"


PLOTTERS = {
    "pareto.png": plot_pareto,
    "error_vs_budget.png": plot_error_vs_budget,
    "scaling.png": plot_scaling,
    "heatmaps.png": plot_heatmaps,
    "spectrum.png": plot_spectrum,
}


def write_plots(plan, rows: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """Write every plot; a plot that fails is replaced by a figure naming the error."""
    status = {}
    for name, plotter in PLOTTERS.items():
        try:
            status[name] = plotter(plan, rows, out / name)
        except Exception as err:  # a plotting bug must not lose the measurements
            status[name] = _empty(out / name, name, f"plot failed: {type(err).__name__}: {err}")
    return status
