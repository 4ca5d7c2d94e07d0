"""The ``bench`` subcommand: ``approxattn bench run …`` and ``approxattn bench report results.json``."""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import time
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x.replace("_", "").replace("K", "000")) for x in text.split(",") if x)


def select_cases(preset_names, *, seq=None, impls=None, match=None, exclude=None) -> list:
    """The cases of the named presets, each once (presets share cases: FAVOR+ m=256 is in headline and
    flurka), in order, filtered: ``impls`` exactly, ``match`` / ``exclude`` by label substrings (any case)."""
    from . import presets

    unique: dict[str, object] = {}
    for name in preset_names:
        builder = presets.PRESETS[name]
        # every preset but ``quick`` takes its sequence lengths
        for case in builder(seq) if seq and "seqs" in inspect.signature(builder).parameters else builder():
            unique.setdefault(json.dumps(case.key(), sort_keys=True), case)
    cases = list(unique.values())
    if impls:
        cases = [c for c in cases if c.impl in impls]
    if match:
        cases = [c for c in cases if any(m.lower() in c.label.lower() for m in match)]
    if exclude:
        cases = [c for c in cases if not any(m.lower() in c.label.lower() for m in exclude)]
    return cases


def run_command(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("approxattn bench run: needs a CUDA device (the report subcommand works anywhere)", file=sys.stderr)
        return 2
    from . import report
    from .runner import floors, measure_device, time_case

    cases = select_cases(args.preset, seq=args.seq, impls=args.impls, match=args.match, exclude=args.exclude)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = measure_device()
    print(f"{device['name']}: {device['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s copy, "
          f"{device['matmul_flops_per_s']['bfloat16'] / 1e12:.0f} TFLOP/s bf16 matmul", flush=True)
    data = {"device": device, "command": "approxattn bench " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
            "results": []}
    started = time.time()
    for i, case in enumerate(cases):
        if args.time_budget and time.time() - started > args.time_budget:
            print(f"time budget reached: {len(cases) - i} cases not run", flush=True)
            data["skipped"] = [c.key() for c in cases[i:]]
            break
        # the case's name goes out before it runs, so a run cut off mid-case shows which one it was
        print(f"[{i + 1}/{len(cases)}] {case.label:<50} N={case.seq:>7} causal={case.causal!s:<5} ", end="",
              flush=True)
        case_started = time.time()
        result = time_case(case, modes=case.modes, warmup=args.warmup, rep=args.rep, memory=not args.no_memory)
        result["case"] = case.key()
        result["floor"] = floors(case, device)
        result["wall_s"] = time.time() - case_started  # compilation, input sets and timing together
        data["results"].append(result)
        print(f"fwd={result.get('fwd')} fwd+bwd={result.get('fwd+bwd')} ({result['wall_s']:.1f} s) "
              f"{result.get('error', '')}{' '.join(result.get('notes', []))}", flush=True)
        report.save(data, out / "results.json")
    report.save(data, out / "results.json")
    (out / "README.md").write_text(report.markdown(data))
    if not args.no_plots:
        try:
            report.plots(data, out)
        except ImportError as error:
            print(f"plots skipped: {error}", file=sys.stderr)
    print(f"wrote {out}/results.json, README.md and plots", flush=True)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from . import report

    data = report.load(args.results)
    out = Path(args.out or Path(args.results).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(report.markdown(data))
    if not args.no_plots:
        report.plots(data, out)
    print(f"wrote {out}/README.md" + ("" if args.no_plots else " and plots"))
    return 0


def add_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``run`` and ``report``) to the ``approxattn`` command's subparsers."""
    from .presets import PRESETS

    bench = subparsers.add_parser("bench", help="time the methods and their peers on a GPU; write JSON, "
                                                "markdown and plots")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    run = sub.add_parser("run", help="run a sweep on the CUDA device")
    run.add_argument("--preset", nargs="+", default=["headline"], choices=sorted(PRESETS))
    run.add_argument("--seq", type=_ints, default=None, help="sequence lengths, e.g. 1024,4096,65536")
    run.add_argument("--impls", nargs="+", default=None,
                     help="only these implementations (fused, reference, sdpa, flex, fla, performer-pytorch)")
    run.add_argument("--match", nargs="+", default=None, help="only cases whose label contains one of these")
    run.add_argument("--exclude", nargs="+", default=None, help="skip cases whose label contains one of these")
    run.add_argument("--out", default="benchmarks/results")
    run.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    run.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    run.add_argument("--time-budget", type=float, default=None, help="stop starting new cases after this many s")
    run.add_argument("--no-memory", action="store_true")
    run.add_argument("--no-plots", action="store_true")
    run.set_defaults(func=run_command)
    rep = sub.add_parser("report", help="redraw the markdown and plots from a results.json")
    rep.add_argument("results")
    rep.add_argument("--out", default=None)
    rep.add_argument("--no-plots", action="store_true")
    rep.set_defaults(func=report_command)
    return bench


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="approxattn")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    args.argv = list(argv)
    return args.func(args)
