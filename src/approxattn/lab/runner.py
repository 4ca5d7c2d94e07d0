"""``approxattn compare``: every method on the same attention inputs, side by side.

For each input (real Q, K, V captured from a pretrained model, or synthetic), each method and
each budget, one row: relative output error against exact softmax attention (computed in
float64 here, independently of the library), attention-matrix errors (Frobenius, spectral),
mean row KL, top-k recall and kept mass when the method's matrix can be formed, FLOPs / bytes /
peak memory from the registry's cost formula, and the measured median time and peak memory on
the current device. A method that cannot run an input (no causal support, a budget larger than
the sequence, ...) gets an "n/a" row with the reason, never a crash.

Besides: a time/memory sweep over sequence length, the spectrum and sparse + low-rank split of
the real attention matrices, and hybrid (FLuRKA) errors against their constituents' errors.
Rows are appended to ``results.jsonl`` in the report folder as they are measured; a rerun into
the same folder skips rows already there.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

import approxattn

from . import metrics
from .budgets import budget_label, budget_option_names, method_budgets, parse_budget_overrides
from .inputs import AttentionInput, expand_spec
from .models import cache_dir
from .report import write_report
from .spectrum import rank_profile, sparse_low_rank_split
from .store import ResultStore, dumps, make_key
from .timing import device_description, median_time, peak_memory

DEFAULT_INPUTS = (
    "minilm:text=kjv:n=512:layers=1,4:heads=0,3,6,9",
    "minilm:text=fortunes:n=256:layers=2:heads=0,3,6,9",
    "smollm2:text=kjv:n=512,1024,2048:layers=3,15:heads=0",
    "gaussian:n=512:spread=1,4:heads=4",
    "peaked:n=512:heads=4",
)
QUICK_INPUTS = (
    "minilm:text=kjv:n=256:layers=1:heads=0,3,6,9",
    "smollm2:text=kjv:n=256:layers=3:heads=0",
    "gaussian:n=256:spread=2:heads=2",
)
DEFAULT_SCALING = (256, 512, 1024, 2048, 4096)
QUICK_SCALING = (256, 512, 1024)
SCALING_INPUT = "gaussian:spread=2:heads=2:d=64"


@dataclass
class CompareConfig:
    """Everything one ``compare`` run depends on (stored in the report's summary.json)."""

    methods: list[str] | None = None  # None: every registered method
    inputs: list[str] | None = None  # None: DEFAULT_INPUTS (QUICK_INPUTS with quick)
    budgets: list[str] = field(default_factory=list)  # "method.option=v1,v2" / "option=v1,v2"
    seq_len: list[int] | None = None  # overrides n= of every input spec
    layers: list[int] | None = None
    heads: list[int] | None = None
    text: list[str] | None = None
    scaling: list[int] | None = None  # None: DEFAULT_SCALING (QUICK_SCALING with quick); [] disables
    scaling_input: str = SCALING_INPUT
    out: str = "approxattn-report"
    cache: str | None = None
    device: str = "cpu"
    quick: bool = False
    matrix_limit: int = 1024
    topk: int = 8
    analysis: bool = True
    spectrum_rank: int = 64
    rpca_n: int = 256
    rpca_heads: int = 2
    heatmap_input: str | None = None  # input id (or prefix); None: the reference input
    heatmap_head: int = 0
    heatmap_tokens: int = 96
    plots: bool = True
    resume: bool = True
    time_budget_s: float = 0.1
    # torch CPU threads while measuring (None: torch's default, one per core). One by default: on a
    # shared or busy machine, multi-threaded small kernels stall on descheduled threads (10-1000x
    # slower and erratic); one thread gives stable, comparable timings. Ignored on CUDA.
    threads: int | None = 1

    def resolved_inputs(self) -> list[str]:
        if self.inputs:
            return list(self.inputs)
        return list(QUICK_INPUTS if self.quick else DEFAULT_INPUTS)

    def resolved_scaling(self) -> list[int]:
        if self.scaling is not None:
            return list(self.scaling)
        return list(QUICK_SCALING if self.quick else DEFAULT_SCALING)


@dataclass
class Plan:
    config: CompareConfig
    methods: list[str]
    budgets: dict[str, list[dict[str, Any]]]
    inputs: list[AttentionInput]
    scaling_inputs: list[AttentionInput]
    device: torch.device
    out_dir: Path

    @property
    def reference_input(self) -> AttentionInput:
        """The input whose time, memory and FLOPs the summary table shows: the first real
        non-causal input (every method can run it), else the first input."""
        for inp in self.inputs:
            if inp.kind == "real" and not inp.causal:
                return inp
        for inp in self.inputs:
            if not inp.causal:
                return inp
        return self.inputs[0]


# ----------------------------------------------------------------------------- planning


def resolve_methods(names: list[str] | None) -> list[str]:
    """Registered method names, in registration order; clear error for unknown ones."""
    registered = approxattn.available_methods()
    if not names:
        return list(registered)
    out = []
    for name in names:
        approxattn.get_method(name)  # ValueError: unknown method ..., available: ...
        if name not in out:
            out.append(name)
    return out


def make_plan(config: CompareConfig, *, on_load: Callable[[str], None] | None = None) -> Plan:
    """Check every argument and expand the run (nothing is loaded yet). Raises ``ValueError``."""
    if not isinstance(config.matrix_limit, int) or config.matrix_limit < 0:
        raise ValueError(f"matrix_limit: expected an int >= 0, got {config.matrix_limit!r}")
    if config.threads is not None and (not isinstance(config.threads, int) or config.threads < 1):
        raise ValueError(f"threads: expected a positive int, got {config.threads!r}")
    if not isinstance(config.topk, int) or config.topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {config.topk!r}")
    try:
        device = torch.device(config.device)
    except RuntimeError as err:
        raise ValueError(f"device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
    methods = resolve_methods(config.methods)
    overrides = parse_budget_overrides(config.budgets, methods)
    budgets = {m: method_budgets(approxattn.get_method(m), quick=config.quick, overrides=overrides) for m in methods}
    spec_overrides = {"n": config.seq_len, "layers": config.layers, "heads": config.heads, "text": config.text}
    inputs: list[AttentionInput] = []
    for spec in config.resolved_inputs():
        inputs.extend(expand_spec(spec, cache=config.cache, on_load=on_load, overrides=spec_overrides))
    if not inputs:
        raise ValueError("inputs: nothing to compare on")
    seen = set()
    inputs = [i for i in inputs if not (i.id in seen or seen.add(i.id))]
    scaling_inputs = []
    lengths = config.resolved_scaling()
    if lengths:
        for n in lengths:
            if not isinstance(n, int) or n < 2:
                raise ValueError(f"scaling: expected sequence lengths >= 2, got {n!r}")
        scaling_inputs = expand_spec(config.scaling_input, overrides={"n": lengths})
    _check_user_budgets(methods, budgets, overrides, inputs)
    return Plan(config, methods, budgets, inputs, scaling_inputs, device, Path(config.out))


def _check_user_budgets(methods, budgets, overrides, inputs) -> None:
    """A budget the user asked for must run at the shortest sequence of the plan: a dry run on
    random inputs of that length gives a clear error now rather than n/a rows later."""
    if not overrides:
        return
    n = min(i.seq_len for i in inputs)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, n, 32, generator=gen)
    for method in methods:
        spec = approxattn.get_method(method)
        touched = {opt for (m, opt) in overrides if m in (None, method) and opt in spec.defaults}
        if not touched:
            continue
        for budget in budgets[method]:
            try:
                approxattn.attention(q, q, q, method, **budget)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"--budget: impossible budget {budget_label(budget)} for {method!r} at the shortest sequence "
                    f"of this run (n={n}): {err}"
                ) from None


# ----------------------------------------------------------------------------- exact references


def exact_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                 block: int = 512) -> torch.Tensor:
    """softmax(q kᵀ·scale) v in float64, in blocks of query rows (the reference output)."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    v = v.double().repeat_interleave(groups, dim=1)
    n_q, n_k = q.shape[2], k.shape[2]
    outs = []
    for start in range(0, n_q, block):
        qb = q[:, :, start:start + block].double()
        logits = (qb @ k.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(start, start + qb.shape[2])[:, None] + (n_k - n_q)
            logits = logits.masked_fill(torch.arange(n_k)[None, :] > rows, float("-inf"))
        outs.append(torch.softmax(logits, dim=-1) @ v)
    return torch.cat(outs, dim=2)


class InputContext:
    """An input on the measuring device, with its exact references (computed once)."""

    def __init__(self, inp: AttentionInput, device: torch.device, matrix_limit: int) -> None:
        self.input = inp
        self.q = inp.q.to(device)
        self.k = inp.k.to(device)
        self.v = inp.v.to(device)
        self.scale = inp.scale
        self.ref_out = exact_output(inp.q, inp.k, inp.v, causal=inp.causal, scale=self.scale)
        self.matrix_ok = inp.seq_len <= matrix_limit
        self.matrix_reason = None if self.matrix_ok else f"n={inp.seq_len} > matrix limit {matrix_limit}"
        self.ref_matrix = (
            metrics.exact_matrix(inp.q, inp.k, causal=inp.causal, scale=self.scale) if self.matrix_ok else None
        )


def uniform_output(v: torch.Tensor, heads: int, *, causal: bool) -> torch.Tensor:
    """The trivial answer: every query averages the values it may see (mean of v, or its running
    mean when causal). A method worth its cost beats it."""
    v = v.double().repeat_interleave(heads // v.shape[1], dim=1)
    if not causal:
        return v.mean(dim=2, keepdim=True).expand_as(v)
    counts = torch.arange(1, v.shape[2] + 1, dtype=v.dtype)[:, None]
    return v.cumsum(dim=2) / counts


def baseline_row(ctx: "InputContext", env: dict[str, Any]) -> dict[str, Any]:
    inp = ctx.input
    row = base_row("baseline", inp, None, None, env)
    uniform = uniform_output(inp.v, inp.heads, causal=inp.causal)
    return row | {"status": "ok", "method": "(mean of v)", "out_rel_err": metrics.relative_error(uniform, ctx.ref_out)}


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _scale_for(spec: approxattn.MethodSpec, inp_scale: float, head_dim: int) -> float | None:
    """None (the method's default 1/√d) when the input uses the standard scale; the input's scale
    for methods that take one; None for scale-free methods."""
    if math.isclose(inp_scale, head_dim ** -0.5, rel_tol=1e-9):
        return None
    return inp_scale if spec.uses_scale else None


def _cost(spec, inp: AttentionInput, budget: dict[str, Any]) -> dict[str, float]:
    options = dict(budget)
    if spec.infer_options is not None:
        options = spec.infer_options(inp.seq_len, inp.seq_len) | options
    cost = spec.cost(1, inp.heads, inp.seq_len, inp.seq_len, inp.head_dim, kv_heads=inp.kv_heads,
                     value_dim=inp.head_dim, causal=inp.causal, element_size=4, **options)
    return {f"cost_{k}": v for k, v in cost.as_dict().items()}


# ----------------------------------------------------------------------------- rows


def base_row(kind: str, inp: AttentionInput, method: str | None, budget: dict[str, Any] | None,
             env: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": kind, **inp.describe()}
    row.pop("model", None)
    if method is not None:
        spec = approxattn.get_method(method)
        row |= {"method": method, "family": spec.family, "budget": budget or {}, "budget_label": budget_label(budget or {})}
    row |= {"device_type": env["device_type"], "device_name": env["device_name"], "threads": env["threads"]}
    return row


def measure_row(ctx: InputContext, method: str, budget: dict[str, Any], plan: Plan, env: dict[str, Any],
                *, with_matrix: bool = True) -> dict[str, Any]:
    inp = ctx.input
    spec = approxattn.get_method(method)
    row = base_row("measure" if with_matrix else "scaling", inp, method, budget, env)
    row["status"] = "ok"
    if inp.causal and not spec.supports_causal:
        return row | {"status": "n/a", "reason": "no causal support (the input is causal)"}
    scale = _scale_for(spec, ctx.scale, inp.head_dim)
    if not spec.uses_scale and not math.isclose(ctx.scale, inp.head_dim ** -0.5, rel_tol=1e-9):
        row["note"] = "scale-free method: the input's softmax scale is ignored"

    def call(v: torch.Tensor = ctx.v) -> torch.Tensor:
        return approxattn.attention(ctx.q, ctx.k, v, method, causal=inp.causal, scale=scale, **budget)

    try:
        with torch.no_grad():
            out = call()
    except Exception as err:  # any method failure becomes an n/a row, never a crash
        return row | {"status": "n/a", "reason": f"{type(err).__name__}: {_short_reason(err)}"}
    out_cpu = out.detach().cpu()
    row["out_rel_err"] = metrics.relative_error(out_cpu, ctx.ref_out)
    row["out_rel_err_heads"] = metrics.relative_error_per_head(out_cpu, ctx.ref_out)
    if not torch.isfinite(out_cpu).all():
        row["note"] = "non-finite entries in the output"
    if with_matrix:
        if not ctx.matrix_ok:
            row["matrix_reason"] = ctx.matrix_reason
        else:
            try:
                with torch.no_grad():
                    approx = metrics.attention_matrix(method, ctx.q, ctx.k, ctx.v, causal=inp.causal, scale=scale,
                                                      **budget)
                approx = approx.detach().cpu()
                row |= metrics.matrix_errors(approx, ctx.ref_matrix)
                row["row_kl"] = metrics.row_kl(ctx.ref_matrix, approx)
                row["topk_recall"] = metrics.topk_recall(ctx.ref_matrix, approx, plan.config.topk)
                row["topk"] = plan.config.topk
                row["mass_kept"] = metrics.mass_kept(ctx.ref_matrix, approx)
                del approx
            except Exception as err:
                row["matrix_reason"] = f"{type(err).__name__}: {_short_reason(err)}"
    try:
        row |= _cost(spec, inp, budget)
    except Exception as err:
        row["cost_reason"] = f"{type(err).__name__}: {_short_reason(err)}"
    with torch.no_grad():
        timing = median_time(call, device=plan.device, budget_s=plan.config.time_budget_s)
    row["time_ms"] = timing["median_s"] * 1e3
    row["time_ms_min"] = timing["min_s"] * 1e3
    row["time_reps"] = timing["reps"]
    try:
        row["peak_mem_bytes"] = peak_memory(call, device=plan.device)
    except Exception as err:
        row["peak_mem_reason"] = f"{type(err).__name__}: {_short_reason(err)}"
    return row


def hybrid_parts(method: str) -> tuple[str | None, str | None, dict[str, Any], str | None]:
    """(low-rank constituent, kernel constituent, kernel's fixed options, reason if not a hybrid).

    Read from the registry: the kernel constituent is the hybrid's exact-limit parent (a kernel
    method, with the limit's parent options); the low-rank constituent is the registered low-rank
    method whose options are all options of the hybrid (sharing them means sharing E, F).
    """
    spec = approxattn.get_method(method)
    if spec.family != "hybrid":
        return None, None, {}, f"{method} is not a hybrid method"
    registered = approxattn.available_methods()
    parent = registered.get(spec.exact_limit.parent)
    kernel = parent.name if parent is not None and parent.family == "kernel" else None
    names = set(spec.defaults)
    low_rank = [s for s in registered.values() if s.family == "low-rank" and set(s.defaults) <= names]
    low_rank.sort(key=lambda s: -len(s.defaults))
    lr = low_rank[0].name if low_rank else None
    reason = None if kernel and lr else "constituents not found in the registry"
    return lr, kernel, dict(spec.exact_limit.parent_options), reason


def hybrid_row(ctx: InputContext, method: str, budget: dict[str, Any], plan: Plan, env: dict[str, Any]) -> dict[str, Any]:
    """A hybrid's output error against its two constituents' at the same budget, same input."""
    inp = ctx.input
    row = base_row("hybrid", inp, method, budget, env)
    lr, kernel, kernel_fixed, reason = hybrid_parts(method)
    if reason:
        return row | {"status": "n/a", "reason": reason}
    if inp.causal:
        return row | {"status": "n/a", "reason": "no causal support (the input is causal)"}
    hybrid_spec = approxattn.get_method(method)
    full = {**hybrid_spec.defaults, **budget}
    budget_names = set(budget) | set(budget_option_names(hybrid_spec))
    outputs = {}
    for role, name, extra in (("hybrid", method, {}), ("low_rank", lr, {}), ("kernel", kernel, kernel_fixed)):
        spec = approxattn.get_method(name)
        if role == "hybrid":
            options = dict(budget)
        else:  # the hybrid's budget values (r, m) for the options the constituent shares
            options = {k: full[k] for k in budget_names if k in spec.defaults} | extra
        # options both share beyond the budget (seed, init, ...) keep their defaults, which agree
        try:
            with torch.no_grad():
                outputs[role] = approxattn.attention(
                    ctx.q, ctx.k, ctx.v, name, causal=False, scale=_scale_for(spec, ctx.scale, inp.head_dim), **options
                ).detach().cpu()
        except Exception as err:
            return row | {"status": "n/a", "reason": f"{name}: {type(err).__name__}: {_short_reason(err)}"}
        row[f"{role}_method"] = name
        row[f"{role}_options"] = options
    ref_norm = float(ctx.ref_out.norm())
    e = {role: metrics.relative_error(out, ctx.ref_out) for role, out in outputs.items()}
    reduced = float((outputs["hybrid"].double() - outputs["low_rank"].double()).norm()) / ref_norm
    row |= {
        "status": "ok",
        "err_hybrid": e["hybrid"],
        "err_low_rank": e["low_rank"],
        "err_kernel": e["kernel"],
        "err_kernel_on_reduced": reduced,
        "triangle_bound": e["low_rank"] + reduced,
        "sum_of_constituents": e["low_rank"] + e["kernel"],
        "within_sum": e["hybrid"] <= e["low_rank"] + e["kernel"],
        "better_than_both": e["hybrid"] < min(e["low_rank"], e["kernel"]),
    }
    return row


def spectrum_row(ctx: InputContext, plan: Plan, env: dict[str, Any]) -> dict[str, Any]:
    inp = ctx.input
    row = base_row("spectrum", inp, None, None, env)
    if not ctx.matrix_ok:
        return row | {"status": "n/a", "reason": ctx.matrix_reason}
    heads = []
    for h in range(inp.heads):
        a = ctx.ref_matrix[0, h]
        p = a.clamp_min(1e-300)
        entropy = float(-(a * p.log()).sum(-1).mean())
        profile = rank_profile(a, rank=plan.config.spectrum_rank, seed=h)
        heads.append({"head": inp.meta.get("head_ids", list(range(inp.heads)))[h], "row_entropy": entropy,
                      "row_entropy_max": math.log(inp.seq_len), **profile})
    return row | {"status": "ok", "heads_analysis": heads}


def rpca_row(ctx: InputContext, plan: Plan, env: dict[str, Any]) -> dict[str, Any]:
    inp = ctx.input
    row = base_row("rpca", inp, None, None, env)
    n = min(plan.config.rpca_n, inp.seq_len)
    if n > plan.config.matrix_limit:
        return row | {"status": "n/a", "reason": f"rpca block {n} > matrix limit {plan.config.matrix_limit}"}
    q = inp.q[:, :, :n]
    k = inp.k[:, :, :n]
    matrix = metrics.exact_matrix(q, k, causal=inp.causal, scale=ctx.scale)
    heads = []
    for h in range(min(plan.config.rpca_heads, inp.heads)):
        summary = sparse_low_rank_split(matrix[0, h], tol=1e-5, max_iter=200)
        heads.append({"head": inp.meta.get("head_ids", list(range(inp.heads)))[h], **summary})
    block = "the attention of the first n tokens (exact for a causal model)" if inp.causal else (
        "the leading n×n block of the attention on the first n tokens")
    return row | {"status": "ok", "rpca_n": n, "block": block, "heads_analysis": heads}


# ----------------------------------------------------------------------------- the run


@dataclass
class CompareResult:
    plan: Plan
    rows: list[dict[str, Any]]
    wall_s: float
    computed: int
    reused: int
    files: list[str]
    summary: dict[str, Any]


def run_compare(config: CompareConfig, *, console: Any = None, progress: bool = True) -> CompareResult:
    """Run the comparison described by ``config`` and write its report folder."""
    from rich.console import Console

    start = time.perf_counter()
    console = console or Console(stderr=True)
    status: dict[str, Any] = {"progress": None, "task": None}

    def on_load(message: str) -> None:
        if status["progress"] is not None:
            status["progress"].update(status["task"], description=message)
        else:
            console.print(message)

    plan = make_plan(config, on_load=on_load)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(plan, config, console, progress, status, start)
    finally:
        torch.set_num_threads(threads_before)


def _run(plan: Plan, config: CompareConfig, console: Any, progress: bool, status: dict[str, Any], start: float):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(plan.out_dir / "results.jsonl", resume=config.resume)
    env = device_description(plan.device)
    cfg = config

    # every unit of work, in order: (key, input, description, function producing a row)
    work: list[tuple[str, AttentionInput, str, Callable[[InputContext], dict[str, Any]]]] = []
    for inp in plan.inputs:
        work.append((make_key("baseline", inp.id), inp, f"baseline on {inp.id}", lambda ctx: baseline_row(ctx, env)))
        for method in plan.methods:
            for budget in plan.budgets[method]:
                key = make_key("measure", inp.id, method, budget, env["device_type"], cfg.topk, cfg.matrix_limit)
                work.append((key, inp, f"{method} {budget_label(budget)} on {inp.id}",
                             lambda ctx, m=method, b=budget: measure_row(ctx, m, b, plan, env)))
                if approxattn.get_method(method).family == "hybrid" and not inp.causal:
                    key = make_key("hybrid", inp.id, method, budget)
                    work.append((key, inp, f"{method} constituents on {inp.id}",
                                 lambda ctx, m=method, b=budget: hybrid_row(ctx, m, b, plan, env)))
        if cfg.analysis and inp.kind == "real":
            key = make_key("spectrum", inp.id, cfg.spectrum_rank, cfg.matrix_limit)
            work.append((key, inp, f"spectrum of {inp.id}", lambda ctx: spectrum_row(ctx, plan, env)))
    if cfg.analysis:
        firsts: dict[str, AttentionInput] = {}
        for inp in plan.inputs:
            if inp.kind == "real":
                firsts.setdefault(inp.source, inp)
        for inp in firsts.values():
            key = make_key("rpca", inp.id, cfg.rpca_n, cfg.rpca_heads)
            work.append((key, inp, f"robust PCA of {inp.id}", lambda ctx: rpca_row(ctx, plan, env)))
    for inp in plan.scaling_inputs:
        for method in plan.methods:
            budgets = plan.budgets[method]
            budget = budgets[len(budgets) // 2]
            key = make_key("scaling", inp.id, method, budget, env["device_type"])
            work.append((key, inp, f"{method} {budget_label(budget)} at n={inp.seq_len}",
                         lambda ctx, m=method, b=budget: measure_row(ctx, m, b, plan, env, with_matrix=False)))

    computed = reused = 0
    load_s: dict[str, float] = {}
    new_rows: list[dict[str, Any]] = []
    contexts: dict[str, InputContext] = {}
    pending = {}
    for key, inp, _, _ in work:
        if key not in store:
            pending[inp.id] = pending.get(inp.id, 0) + 1
    columns = (SpinnerColumn(), TextColumn("[progress.description]{task.description}", table_column=None),
               BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not progress) as bar:
        task = bar.add_task("compare", total=len(work))
        status["progress"], status["task"] = bar, task
        for key, inp, description, fn in work:
            if key in store:
                reused += 1
                bar.advance(task)
                continue
            bar.update(task, description=description)
            ctx = contexts.get(inp.id)
            if ctx is None:
                contexts.clear()  # one input's tensors and references alive at a time
                t0 = time.perf_counter()
                ctx = contexts[inp.id] = InputContext(inp, plan.device, cfg.matrix_limit)
                load_s[inp.id] = round(load_s.get(inp.id, 0.0) + time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            row = fn(ctx)
            row["row_s"] = round(time.perf_counter() - t0, 4)
            row["key"] = key
            row["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            store.add(row)
            new_rows.append(row)
            computed += 1
            pending[inp.id] -= 1
            if pending[inp.id] == 0:
                contexts.pop(inp.id, None)
                inp._data = None
            bar.advance(task)
        bar.update(task, description="writing the report")
        status["progress"] = None

    rows = [store.get(key) for key, *_ in work]
    _append_measurements(cfg.cache, new_rows)
    files, summary = write_report(plan, rows, env, config=config_dict(plan.config), environment=environment(plan, env),
                                  wall_s=time.perf_counter() - start, computed=computed, reused=reused,
                                  extra={"input_load_s": load_s})
    return CompareResult(plan, rows, time.perf_counter() - start, computed, reused, files, summary)


def _append_measurements(cache: str | None, rows: list[dict[str, Any]]) -> None:
    """Keep every new measure/scaling row in the cache too: ``approxattn advise`` reads them."""
    keep = [r for r in rows if r.get("kind") in ("measure", "scaling")]
    if not keep:
        return
    path = cache_dir(cache) / "measurements.jsonl"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for row in keep:
                f.write(dumps(row) + "\n")
    except OSError:  # a read-only cache must not fail the run
        pass


def environment(plan: Plan, env: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {
        **env,
        "python": platform.python_version(),
        "approxattn": approxattn.__version__,
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": _load_average(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def config_dict(config: CompareConfig) -> dict[str, Any]:
    data = asdict(config)
    data["inputs"] = config.resolved_inputs()
    data["scaling"] = config.resolved_scaling()
    return json.loads(json.dumps(data, default=str))
