"""The lab's command-line commands: ``compare`` and ``advise``.

``approxattn.cli`` wires them in with :func:`add_commands`; ``python -m approxattn.lab`` runs them
standalone (same arguments).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .budgets import BUDGET_OPTIONS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one int")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _error_target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


COMPARE_EPILOG = """\
inputs (--input, repeatable; default: a set of real and synthetic inputs):
  SOURCE[:key=value...] with comma lists, e.g.
    minilm:text=kjv:n=512:layers=1,4:heads=0,3     (MiniLM-L6 encoder, 12 heads, <= 512 tokens)
    smollm2:text=fortunes:n=1024,2048:layers=3:heads=0   (SmolLM2-135M, causal, GQA 9/3, <= 8192)
    gaussian:n=512:spread=1,4:heads=4:d=64        (logit standard deviation `spread`)
    peaked:n=512:sharpness=8:heads=4               (low-entropy rows)
budgets (--budget, repeatable): METHOD.OPTION=V1,V2,... or OPTION=V1,V2,... (every method that has it);
  swept by default: """ + ", ".join(BUDGET_OPTIONS) + """
report folder: results.jsonl (resumable), measurements.csv, hybrid.csv, analysis.json, summary.json,
  table.md, pareto.png, error_vs_budget.png, scaling.png, heatmaps.png, spectrum.png
"""


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=_str_list, default=None,
                        help="comma-separated methods (default: every registered method)")
    parser.add_argument("--input", dest="inputs", action="append", default=None, metavar="SPEC",
                        help="an input spec (repeatable; see below)")
    parser.add_argument("--seq-len", type=_int_list, default=None, metavar="N[,N...]",
                        help="override the sequence length(s) of every input")
    parser.add_argument("--layers", type=_int_list, default=None, help="override the layers of the real inputs")
    parser.add_argument("--heads", type=_int_list, default=None,
                        help="override the (query) heads of the real inputs; with GQA, whole key/value groups")
    parser.add_argument("--text", type=_str_list, default=None, help="override the text of the real inputs (kjv, fortunes)")
    parser.add_argument("--budget", dest="budgets", action="append", default=[], metavar="[METHOD.]OPTION=V,...",
                        help="budget values to sweep (repeatable)")
    parser.add_argument("--scaling", type=_int_list, default=None, metavar="N,N,...",
                        help="sequence lengths of the time/memory sweep (default 256..4096; --no-scaling to skip)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the time/memory sweep")
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute on 2 CPU cores)")
    parser.add_argument("--out", default="approxattn-report", help="report folder (default: ./approxattn-report)")
    parser.add_argument("--cache-dir", default=None,
                        help="captured Q/K/V and measurements (default $APPROXATTN_CACHE or ~/.cache/approxattn)")
    parser.add_argument("--device", default="cpu", help="torch device to measure on (default cpu)")
    parser.add_argument("--matrix-limit", type=int, default=1024,
                        help="form N×N attention matrices (matrix metrics, spectrum) only up to this N (default 1024)")
    parser.add_argument("--topk", type=_positive_int, default=8, help="k of the top-k recall (default 8)")
    parser.add_argument("--no-analysis", action="store_true", help="skip the spectrum / robust PCA analysis")
    parser.add_argument("--rpca-n", type=_positive_int, default=256, help="tokens of the robust PCA block (default 256)")
    parser.add_argument("--heatmap-input", default=None, help="input id (or prefix) for the heat maps")
    parser.add_argument("--heatmap-head", type=int, default=0, help="head index (within the input) for the heat maps")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads while measuring (default 1: stable timings on shared machines)")
    parser.add_argument("--fresh", action="store_true", help="discard the report folder's earlier rows (no resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from .runner import CompareConfig

    return CompareConfig(
        methods=args.methods,
        inputs=args.inputs,
        budgets=args.budgets,
        seq_len=args.seq_len,
        layers=args.layers,
        heads=args.heads,
        text=args.text,
        scaling=[] if args.no_scaling else args.scaling,
        out=args.out,
        cache=args.cache_dir,
        device=args.device,
        quick=args.quick,
        matrix_limit=args.matrix_limit,
        topk=args.topk,
        analysis=not args.no_analysis,
        rpca_n=args.rpca_n,
        heatmap_input=args.heatmap_input,
        heatmap_head=args.heatmap_head,
        plots=not args.no_plots,
        resume=not args.fresh,
        threads=args.threads,
    )


def run_compare_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .report import rich_table
    from .runner import run_compare

    err = Console(stderr=True)
    try:
        config = config_from_args(args)
        result = run_compare(config, console=err, progress=not args.no_progress)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. a model wheel that is not installed
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    summary = result.summary["table"]
    out.print(rich_table(summary, title=f"approxattn compare — time, memory, GFLOP at {summary['reference_input']}"))
    for mark, reason in summary["reasons"].items():
        out.print(f"{mark} n/a: {reason}", highlight=False)
    for line in analysis_lines(result.rows):
        out.print(line, highlight=False)
    hybrids = [r for r in result.rows if r and r.get("kind") == "hybrid" and r.get("status") == "ok"]
    if hybrids:
        within = sum(bool(r["within_sum"]) for r in hybrids)
        better = sum(bool(r["better_than_both"]) for r in hybrids)
        out.print(f"hybrid error vs constituents: within e_low-rank + e_kernel in {within}/{len(hybrids)} cases, "
                  f"better than both in {better}/{len(hybrids)} (hybrid.csv)", highlight=False)
    out.print(f"report: {result.plan.out_dir}/ ({len(result.files)} files; {result.computed} rows measured, "
              f"{result.reused} reused) in {result.wall_s:.1f} s", highlight=False)
    return 0


def analysis_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per real source: spectrum and robust-PCA split of its exact attention matrices."""
    import statistics

    lines = []
    sources = []
    for r in rows:
        if r and r.get("kind") in ("spectrum", "rpca") and r.get("status") == "ok" and r["source"] not in sources:
            sources.append(r["source"])
    for source in sources:
        heads = [h for r in rows if r and r.get("kind") == "spectrum" and r.get("status") == "ok"
                 and r["source"] == source for h in r["heads_analysis"]]
        parts = []
        if heads:
            stable = statistics.median(h["stable_rank"] for h in heads)
            r90 = [h["energy_rank_90"] for h in heads]
            known = [x for x in r90 if x is not None]
            r90_text = (f"{statistics.median(known):.0f}" if len(known) == len(r90)
                        else f">{heads[0]['svd_rank']} in {len(r90) - len(known)}/{len(r90)} heads")
            n = sorted({r["seq_len"] for r in rows if r and r.get("kind") == "spectrum" and r["source"] == source})
            parts.append(f"{len(heads)} heads (n={','.join(map(str, n))}): median stable rank {stable:.1f}, "
                         f"rank for 90% of ‖A‖²_F {r90_text}")
        split = [h for r in rows if r and r.get("kind") == "rpca" and r.get("status") == "ok"
                 and r["source"] == source for h in r["heads_analysis"]]
        if split:
            parts.append(f"robust PCA: low-rank part holds {statistics.median(h['low_rank_energy'] for h in split):.0%} "
                         f"of the energy (rank {statistics.median(h['rank'] for h in split):.0f}), sparse part "
                         f"{statistics.median(h['sparse_density'] for h in split):.0%} dense")
        lines.append(f"attention of {source}: " + "; ".join(parts))
    return lines


def add_advise_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=_positive_int, required=True, help="sequence length N")
    parser.add_argument("--head-dim", type=_positive_int, required=True, help="head dimension d")
    parser.add_argument("--causal", action="store_true", help="causal (autoregressive) attention")
    parser.add_argument("--max-error", type=_error_target, default=0.1,
                        help="largest acceptable relative output error (default 0.1)")
    parser.add_argument("--device", default="cpu", help="device type the time estimate is for (cpu, cuda)")
    parser.add_argument("--heads", type=_positive_int, default=1, help="heads × batch the time is for (default 1)")
    parser.add_argument("--measurements", action="append", default=None, metavar="PATH",
                        help="results.jsonl / report folder / measurements.jsonl to use (repeatable; default: the "
                             "cache's measurements plus the reference measurements shipped with approxattn)")
    parser.add_argument("--cache-dir", default=None, help="as for compare")
    parser.add_argument("--methods", type=_str_list, default=None, help="only consider these methods")
    parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")


def run_advise_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .advise import advise, render

    try:
        advice = advise(seq_len=args.seq_len, head_dim=args.head_dim, causal=args.causal, max_error=args.max_error,
                        device=args.device, heads=args.heads, measurements=args.measurements, cache=args.cache_dir,
                        methods=args.methods)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(advice, indent=1, default=str))
    else:
        render(advice, Console())
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``compare`` and ``advise`` to an argparse subparsers object."""
    compare = subparsers.add_parser(
        "compare",
        help="every method against exact attention on real and synthetic inputs: error, time, memory",
        description="Run every registered method (or --methods) on the same attention inputs — Q, K, V captured "
                    "from real pretrained models (MiniLM-L6, SmolLM2-135M) on real text, and synthetic inputs — and "
                    "report error against exact softmax attention, time, memory, their dependence on sequence "
                    "length and budget, the spectrum of the attention itself and FLuRKA against its constituents.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare_command)
    advise = subparsers.add_parser(
        "advise",
        help="the fastest method and budget that meets an error target",
        description="Recommend the fastest method and budget whose measured error meets --max-error at the given "
                    "sequence length, from stored measurements (approxattn compare) and the registry's cost model, "
                    "and say how confident the recommendation is.",
    )
    add_advise_arguments(advise)
    advise.set_defaults(func=run_advise_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m approxattn.lab", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
