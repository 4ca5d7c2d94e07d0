"""``approxattn advise``: the fastest method and budget that meets an error target.

Evidence, in order of trust:

1. measured relative output errors (``approxattn compare`` rows) of each method and budget on
   inputs with the same causal flag, real inputs preferred to synthetic ones, at the measured
   sequence lengths nearest the requested one (log-linear interpolation between two lengths,
   the nearest one outside the range); the estimate is the worst input at those lengths;
2. measured times on the requested device type, scaled to the requested length, head size and
   head count by the registry's cost formula (FLOPs);
3. the cost formula alone (a device-wide FLOP rate from other methods' measurements), when a
   method was never timed on that device.

Sources: the rows every ``compare`` run appends to ``<cache>/measurements.jsonl``, and the
reference measurements shipped with approxattn (``lab/data/reference_measurements.jsonl.gz``,
2-core CPU), or the files/folders given with ``--measurements``.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import statistics
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import approxattn

from .budgets import budget_label
from .models import cache_dir
from .store import read_jsonl

REFERENCE_FILE = "reference_measurements.jsonl.gz"
KEEP_FIELDS = (
    "key", "kind", "input", "input_kind", "source", "seq_len", "head_dim", "heads", "kv_heads", "causal", "method",
    "family", "budget", "budget_label", "status", "out_rel_err", "time_ms", "cost_flops", "peak_mem_bytes",
    "device_type", "device_name", "threads", "measured_at",
)


def exact_reference() -> str:
    """The registered exact method most others approximate (the root of the most exact-limit chains)."""
    methods = approxattn.available_methods()
    roots = {}
    for name in methods:
        seen, current = set(), name
        while current in methods and current not in seen:
            seen.add(current)
            parent = methods[current].exact_limit.parent
            if parent == current:
                break
            current = parent
        roots[current] = roots.get(current, 0) + 1
    exact = [n for n in roots if n in methods and methods[n].family == "exact"]
    if not exact:
        raise ValueError("registry: no exact method is registered")
    return max(exact, key=lambda n: roots[n])


def _read_path(path: Path) -> Iterable[dict[str, Any]]:
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        raise ValueError(f"--measurements: {path} does not exist")
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    yield from read_jsonl(path)


def reference_rows() -> list[dict[str, Any]]:
    try:
        data = resources.files("approxattn.lab").joinpath("data").joinpath(REFERENCE_FILE).read_bytes()
    except (FileNotFoundError, OSError):
        return []
    with gzip.open(io.BytesIO(data), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_measurements(paths: list[str] | None = None, cache: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Usable rows (latest per key) and a description of where they came from."""
    rows: list[dict[str, Any]] = []
    origins = []
    if paths:
        for p in paths:
            got = list(_read_path(Path(p).expanduser()))
            rows += got
            origins.append(f"{p} ({len(got)} rows)")
    else:
        own = cache_dir(cache) / "measurements.jsonl"
        if own.exists():
            got = list(read_jsonl(own))
            rows += got
            origins.append(f"{own} ({len(got)} rows)")
        shipped = reference_rows()
        if shipped:
            rows += shipped
            origins.append(f"shipped reference measurements ({len(shipped)} rows)")
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") not in ("measure", "scaling") or r.get("status") != "ok":
            continue
        key = r.get("key") or json.dumps([r.get("input"), r.get("method"), r.get("budget")], sort_keys=True)
        if key not in latest or str(r.get("measured_at", "")) >= str(latest[key].get("measured_at", "")):
            latest[key] = r
    return list(latest.values()), origins


def _interp(points: dict[int, float], n: int) -> tuple[float, float]:
    """Value at n from {length: value}, log-linear between the bracketing lengths; and the
    extrapolation factor (1 inside the measured range, else the ratio to the nearest length)."""
    lengths = sorted(points)
    if n in points:
        return points[n], 1.0
    lower = [x for x in lengths if x < n]
    upper = [x for x in lengths if x > n]
    if lower and upper:
        a, b = lower[-1], upper[0]
        w = (math.log(n) - math.log(a)) / (math.log(b) - math.log(a))
        return points[a] * (1 - w) + points[b] * w, 1.0
    nearest = lower[-1] if lower else upper[0]
    return points[nearest], max(n / nearest, nearest / n)


def _flops(method: str, budget: dict[str, Any], n: int, d: int, heads: int, causal: bool) -> float | None:
    spec = approxattn.get_method(method)
    options = dict(budget)
    if spec.infer_options is not None:
        options = spec.infer_options(n, n) | options
    try:
        return spec.cost(1, heads, n, n, d, causal=causal, element_size=4, **options).flops
    except (ValueError, TypeError):
        return None


def advise(*, seq_len: int, head_dim: int, causal: bool = False, max_error: float = 0.1, device: str = "cpu",
           heads: int = 1, measurements: list[str] | None = None, cache: str | None = None,
           methods: list[str] | None = None) -> dict[str, Any]:
    """The recommendation as a JSON-friendly dict (see :func:`render`)."""
    for name, value in (("seq_len", seq_len), ("head_dim", head_dim), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not isinstance(max_error, (int, float)) or not max_error > 0:
        raise ValueError(f"max_error: expected a number > 0, got {max_error!r}")
    device_type = str(device).split(":")[0]
    registered = approxattn.available_methods()
    if methods:
        for m in methods:
            approxattn.get_method(m)
    allowed = [m for m in (methods or registered) if m in registered]
    rows, origins = load_measurements(measurements, cache)
    if not rows:
        raise ValueError("no measurements found: run `approxattn compare` first (or pass --measurements)")
    exact = exact_reference()

    # device-wide FLOP rate, for methods never timed on this device
    rates = [r["cost_flops"] / (r["time_ms"] / 1e3) for r in rows
             if r.get("device_type") == device_type and r.get("cost_flops") and r.get("time_ms")]
    device_rate = statistics.median(rates) if rates else None

    candidates = []
    combos: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r.get("method") in allowed:
            combos.setdefault((r["method"], json.dumps(r.get("budget") or {}, sort_keys=True)), r.get("budget") or {})
    for (method, _), budget in combos.items():
        spec = registered[method]
        notes: list[str] = []
        if causal and not spec.supports_causal:
            continue
        mine = [r for r in rows if r["method"] == method and (r.get("budget") or {}) == budget]
        # --- error
        same_mask = [r for r in mine if bool(r.get("causal")) == causal and r.get("out_rel_err") is not None]
        real = [r for r in same_mask if r.get("input_kind") == "real"]
        basis = real or same_mask
        if not basis:
            continue
        if not real:
            notes.append("error measured on synthetic inputs only")
        per_len: dict[int, float] = {}
        per_len_median: dict[int, float] = {}
        for n in {r["seq_len"] for r in basis}:
            errs = [r["out_rel_err"] for r in basis if r["seq_len"] == n]
            per_len[n], per_len_median[n] = max(errs), statistics.median(errs)
        err, err_extrap = _interp(per_len, seq_len)
        err_median, _ = _interp(per_len_median, seq_len)
        if err_extrap > 1:
            notes.append(f"error extrapolated ×{err_extrap:.1f} in length from n={min(per_len, key=lambda x: abs(math.log(x / seq_len)))}")
        dims = {r["head_dim"] for r in basis}
        if head_dim not in dims:
            notes.append(f"error measured at head_dim {sorted(dims)}, not {head_dim}")
        # --- time
        flops_here = _flops(method, budget, seq_len, head_dim, heads, causal)
        timed = [r for r in mine if r.get("device_type") == device_type and r.get("time_ms") and r.get("cost_flops")]
        time_ms, time_source, time_extrap = None, None, None
        if timed and flops_here:
            best = min(timed, key=lambda r: (abs(math.log(r["seq_len"] / seq_len)), r["head_dim"] != head_dim))
            time_ms = best["time_ms"] * flops_here / best["cost_flops"]
            time_extrap = max(best["seq_len"] / seq_len, seq_len / best["seq_len"])
            time_source = f"measured at n={best['seq_len']}, scaled by the cost model"
            if time_extrap > 2:
                notes.append(f"time scaled ×{time_extrap:.1f} in length by the cost model")
        elif flops_here and device_rate:
            time_ms = flops_here / device_rate * 1e3
            time_source = f"cost model at the device's median rate ({device_rate / 1e9:.2f} GFLOP/s)"
            notes.append(f"never timed on {device_type}: time from FLOPs")
        elif flops_here:
            time_source = "FLOPs only (no measurement on this device)"
        meets = err <= max_error
        score = 3
        score -= bool(not real)
        score -= bool(err_extrap > 1.25) + bool(err_extrap > 4)
        score -= bool(head_dim not in dims)
        score -= bool(time_source is None or not timed) + bool(time_extrap and time_extrap > 4)
        score -= bool(meets and err > 0.8 * max_error)
        if meets and err > 0.8 * max_error:
            notes.append("estimated error within 20% of the target")
        confidence = "high" if score >= 3 else "medium" if score >= 1 else "low"
        candidates.append({
            "method": method, "family": spec.family, "budget": budget, "budget_label": budget_label(budget),
            "error_estimate": err, "error_median": err_median, "meets_target": meets,
            "measured_lengths": sorted(per_len), "inputs": len({r["input"] for r in basis}),
            "time_ms": time_ms, "time_source": time_source, "flops": flops_here,
            "confidence": confidence, "notes": notes,
        })
    if not candidates:
        raise ValueError(
            f"no measurement of a {'causal' if causal else 'non-causal'} method: run `approxattn compare` with "
            f"{'a causal input (smollm2)' if causal else 'non-causal inputs'} first"
        )

    def speed_key(c):
        return (c["time_ms"] if c["time_ms"] is not None else math.inf, c["flops"] or math.inf)

    meeting = sorted((c for c in candidates if c["meets_target"]), key=speed_key)
    missing = sorted((c for c in candidates if not c["meets_target"]), key=speed_key)
    choice = meeting[0] if meeting else None
    summary_notes = []
    if choice is None:
        summary_notes.append(f"no measured method meets max error {max_error:g}: use exact attention ({exact})")
    elif choice["method"] == exact or approxattn.get_method(choice["method"]).family == "exact" and choice["error_estimate"] < 1e-4:
        summary_notes.append("exact attention is the fastest method that meets the target here")
    if choice is not None:
        faster = [c for c in missing if speed_key(c) < speed_key(choice)]
        if faster:
            summary_notes.append(f"{len(faster)} faster configurations miss the target (fastest: {faster[0]['method']} "
                                 f"{faster[0]['budget_label']}, est. error {faster[0]['error_estimate']:.3f})")
    return {
        "query": {"seq_len": seq_len, "head_dim": head_dim, "causal": causal, "max_error": max_error,
                  "device": device_type, "heads": heads},
        "recommendation": choice,
        "fallback": exact,
        "alternatives": meeting[1:6],
        "faster_but_too_inaccurate": [c for c in missing if choice is None or speed_key(c) < speed_key(choice)][:5],
        "notes": summary_notes,
        "sources": origins,
    }


def render(advice: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    q = advice["query"]
    head = (f"n={q['seq_len']}, d={q['head_dim']}, {'causal' if q['causal'] else 'non-causal'}, max error "
            f"{q['max_error']:g}, {q['heads']} head(s) on {q['device']}")
    choice = advice["recommendation"]
    if choice is None:
        console.print(f"[bold]{head}[/]\nNo measured approximation meets the target: use exact attention "
                      f"([bold]{advice['fallback']}[/]).", highlight=False)
    else:
        t = f"{choice['time_ms']:.3g} ms" if choice["time_ms"] is not None else "time unknown"
        console.print(f"[bold]{head}[/]\nRecommended: [bold green]{choice['method']}{'' if choice['budget_label'] == '-' else ' ' + choice['budget_label']}[/] — "
                      f"estimated error {choice['error_estimate']:.3g} (worst measured input; median "
                      f"{choice['error_median']:.3g}), {t} ({choice['time_source']}). "
                      f"Confidence: [bold]{choice['confidence']}[/]"
                      + (f" ({'; '.join(choice['notes'])})" if choice["notes"] else "") + ".", highlight=False)
    table = Table(title="candidates (fastest first)", header_style="bold")
    for col in ("method", "budget", "est. error", "meets", "est. ms", "confidence", "measured n"):
        table.add_column(col, justify="left" if col in ("method", "budget") else "right")
    shown = ([choice] if choice else []) + advice["alternatives"] + advice["faster_but_too_inaccurate"]
    shown.sort(key=lambda c: c["time_ms"] if c["time_ms"] is not None else math.inf)
    for c in shown:
        table.add_row(c["method"], c["budget_label"], f"{c['error_estimate']:.3g}", "yes" if c["meets_target"] else "no",
                      f"{c['time_ms']:.3g}" if c["time_ms"] is not None else "n/a", c["confidence"],
                      ",".join(str(n) for n in c["measured_lengths"]))
    console.print(table)
    for note in advice["notes"]:
        console.print(f"note: {note}", highlight=False)
    console.print("evidence: " + "; ".join(advice["sources"]), highlight=False)


def export_reference(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Write the compact reference file shipped with the package (used by scripts/make_lab_docs.py)."""
    kept = [{k: r.get(k) for k in KEEP_FIELDS} for r in rows
            if r and r.get("kind") in ("measure", "scaling") and r.get("status") == "ok"]
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        for r in kept:
            f.write((json.dumps(r, sort_keys=True) + "\n").encode())
    return len(kept)
