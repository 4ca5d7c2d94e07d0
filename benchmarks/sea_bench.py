"""One device call for SEA's sparse step: GPU tests, a launch-config sweep, then the ``sea`` preset.

    PYTHONPATH=src python3 benchmarks/sea_bench.py --out $OUT [--seq 4096,...] [--skip-tests] [--no-tune]

Writes ``results.json`` (the bench format, plus ``tuning`` and ``tests``), ``table.md`` and
``sea_time_vs_n.png`` into --out. Forward only, B=1, H=16, d=64, bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from approxattn.bench import presets
from approxattn.bench.case import Case
from approxattn.bench.runner import floors, measure_device, time_case
from approxattn.kernels import sparse_attention as ks

TUNE = [
    {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 2},
    {"BM": 32, "BN": 64, "num_warps": 4, "num_stages": 2},
]


def profile_sea(seq: int, out: Path) -> dict:
    """CUDA time by op of one ``sea`` forward (B=1, H=16, d=64, bf16), non-causal and causal."""
    import approxattn
    from torch.profiler import ProfilerActivity, profile

    result = {}
    for causal in (False, True):
        try:
            module = approxattn.build("sea", head_dim=64).cuda().eval()
            q, k, v = (torch.randn(1, 16, seq, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            with torch.no_grad():
                for _ in range(2):
                    module(q, k, v, causal=causal)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    module(q, k, v, causal=causal)
                    torch.cuda.synchronize()
            text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            result["causal" if causal else "noncausal"] = text
            print(f"--- sea forward profile N={seq} causal={causal}\n{text}", flush=True)
        except Exception as error:  # noqa: BLE001
            result["causal" if causal else "noncausal"] = f"{type(error).__name__}: {error}"
            print(f"sea profile failed: {error}", flush=True)
    (out / "sea_profile.txt").write_text("\n\n".join(f"{k}\n{v}" for k, v in result.items()))
    return result


def run_tests(out: Path, expression: str = "") -> dict:
    started = time.time()
    select = ["-k", expression] if expression else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x", "-p", "no:cacheprovider",
                           *select, "tests/test_sparse_attention_gpu.py"], capture_output=True, text=True,
                          timeout=240)
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    print(f"gpu tests: rc={proc.returncode} {tail} ({time.time() - started:.0f} s)", flush=True)
    return {"returncode": proc.returncode, "summary": tail}


def tune(seq: int) -> list[dict]:
    rows = []
    for causal in (False, True):
        case = Case("sparse-kernel", "tune", seq, causal, options={"columns": 256, "keys_per_row": 64}, modes=("fwd",))
        for cfg in TUNE:
            ks.OVERRIDE.clear()
            ks.OVERRIDE.update(cfg)
            r = time_case(case, modes=("fwd",), warmup=10, rep=40, memory=False)
            rows.append({"seq": seq, "causal": causal, "config": dict(cfg), "fwd": r.get("fwd"),
                         "notes": r.get("notes") or r.get("error")})
            print(f"tune N={seq} causal={causal} {cfg}: {r.get('fwd')} {r.get('notes', '')}", flush=True)
    ks.OVERRIDE.clear()
    return rows


def best_config(rows: list[dict]) -> dict:
    """The config with the least summed time over the tuned cases (every case must have run)."""
    totals: dict[str, float] = {}
    for r in rows:
        key = json.dumps(r["config"], sort_keys=True)
        totals[key] = totals.get(key, 0.0) + (r["fwd"] if r["fwd"] is not None else float("inf"))
    return json.loads(min(totals, key=totals.get))


def table(results: list[dict]) -> str:
    seqs = sorted({r["case"]["seq"] for r in results})
    lines = []
    for causal in (False, True):
        rows = [r for r in results if r["case"]["causal"] == causal]
        sdpa = {r["case"]["seq"]: r.get("fwd") for r in rows if r["case"]["impl"] == "sdpa"}
        lines += [f"\n### {'causal' if causal else 'non-causal'} (forward ms; × = SDPA fwd / this)\n",
                  "| | " + " | ".join(f"N={s:,}" for s in seqs) + " |", "|---" * (len(seqs) + 1) + "|"]
        for label in dict.fromkeys(r["case"]["label"] for r in rows):
            cells = []
            for s in seqs:
                r = next((x for x in rows if x["case"]["label"] == label and x["case"]["seq"] == s), None)
                ms = None if r is None else r.get("fwd")
                if ms is None:
                    cells.append("" if r is None else "—")
                else:
                    x = sdpa.get(s)
                    cells.append(f"{ms:.3f}" + (f" ({x / ms:.1f}×)" if x and r["case"]["impl"] != "sdpa" else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    names = list(dict.fromkeys(r["case"]["label"].replace(" causal", "") for r in results))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}     # one colour per method in both panels
    for ax, causal in zip(axes, (False, True)):
        rows = [r for r in results if r["case"]["causal"] == causal and r.get("fwd")]
        for label in dict.fromkeys(r["case"]["label"] for r in rows):
            name = label.replace(" causal", "")
            pts = sorted((r["case"]["seq"], r["fwd"]) for r in rows if r["case"]["label"] == label)
            ax.plot(*zip(*pts), marker="o", label=name, color=colors[name])
        ax.set(xscale="log", yscale="log", xlabel="N", title=("causal" if causal else "non-causal") + ", forward")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ms (H100, B=1, H=16, d=64, bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", default="4096,8192,16384,32768,65536")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--flex-seq", default="16384,65536", help="FlexAttention only here (each N compiles)")
    parser.add_argument("--time-budget", type=float, default=300)
    parser.add_argument("--skip", default="", help="implementations not to time, e.g. sparse-flex,sparse-reference")
    parser.add_argument("--tests", default="", help="pytest -k expression for the GPU tests (default: all)")
    parser.add_argument("--profile-sea", type=int, default=0, help="profile one sea forward at this N (both modes)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = {"command": "PYTHONPATH=src python3 benchmarks/sea_bench.py " + " ".join(sys.argv[1:])}
    if not args.skip_tests:
        data["tests"] = run_tests(out, args.tests)
    if args.profile_sea:
        data["sea_profile"] = profile_sea(args.profile_sea, out)
    data["device"] = measure_device()
    if not args.no_tune:
        data["tuning"] = tune(65536)
        data["config"] = best_config(data["tuning"])
        ks.OVERRIDE.update(data["config"])
        print(f"using {data['config']}", flush=True)
    seqs = tuple(int(s) for s in args.seq.split(","))
    flex_seq = {int(s) for s in args.flex_seq.split(",") if s}
    skip = set(filter(None, args.skip.split(",")))
    cases = [c for c in presets.sea(seqs) if (c.impl != "sparse-flex" or c.seq in flex_seq) and c.impl not in skip]
    cases.sort(key=lambda c: -c.seq)   # the longest first: they matter most if the time budget runs out
    data["results"] = []
    for i, case in enumerate(cases):
        if time.time() - started > args.time_budget:
            data["skipped"] = [c.key() for c in cases[i:]]
            print(f"time budget reached: {len(cases) - i} cases not run", flush=True)
            break
        try:
            result = time_case(case, modes=case.modes, warmup=10, rep=50, memory=False)
        except Exception as error:  # noqa: BLE001  (a case that fails to build must not stop the run)
            result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        result["case"] = case.key()
        try:
            result["floor"] = floors(case, data["device"])
        except Exception as error:  # noqa: BLE001  (a method's cost formula must not stop the run)
            result["floor"] = None
            result.setdefault("notes", []).append(f"floor: {error}")
        data["results"].append(result)
        print(f"[{i + 1}/{len(cases)}] {case.label:<62} N={case.seq:>6} fwd={result.get('fwd')} "
              f"{result.get('error', '')}{' '.join(result.get('notes', []))}", flush=True)
        (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "table.md").write_text(table(data["results"]))
    print(table(data["results"]), flush=True)
    try:
        plot(data["results"], out / "sea_time_vs_n.png")
    except Exception as error:  # noqa: BLE001
        print(f"plot failed: {error}", flush=True)
    return 0


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    sys.exit(main())
