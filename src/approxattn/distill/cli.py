"""``approxattn distill run|report``: distil a pretrained model into approxattn methods.

Example (GPU)::

    approxattn distill run --teacher smollm2 --methods sea,performer,linear \\
        --option performer.num_features=256 --steps 300 --seq-len 1024 --out runs/distill
    approxattn distill report runs/distill
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .data import TRAIN_SPLITS

EPILOG = """\
options: --option METHOD.NAME=VALUE (repeatable), e.g. --option performer.num_features=256
  --option performer.kernel=relu --option sea.k=64; values are Python literals or plain strings.
loss weights: --weight TERM=VALUE (repeatable) over the recipe (causal LM: task 0.1, hidden 5,
  logits 0.2; encoder: task 0.1, hidden 10, logits 0.1; both: estimate_kl 0.1, estimate_mse 1,
  dense_kl 0.1, dense_mse 1, context 1).
output folder: results.json, table.md, and per method checkpoint.pt + log.jsonl; running the
  same command again resumes (finished methods are skipped).
"""


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method_options(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["performer.num_features=256", ...]`` → ``{"performer": {"num_features": 256}}``."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--option: expected METHOD.NAME=VALUE, got {item!r}")
        if method not in out:
            raise ValueError(f"--option: method {method!r} is not in --methods ({', '.join(methods)})")
        out[method][name] = _literal(value)
    return out


def parse_weights(items: list[str]) -> dict[str, float]:
    changes: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--weight: expected TERM=VALUE, got {item!r}")
        try:
            changes[name] = float(value)
        except ValueError:
            raise ValueError(f"--weight: expected a number for {name!r}, got {value!r}") from None
    return changes


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (``timeout``, a batch scheduler, a machine being reclaimed) raises KeyboardInterrupt inside
    the block, as Ctrl-C does (after the training step in flight), so that the training loop's ``finally``
    writes its checkpoint: without it a terminated run loses every step since the last periodic checkpoint. The previous handler
    comes back on the way out; outside the main thread (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    from .trainer import request_interrupt

    def interrupt(signum, frame):
        request_interrupt(f"signal {signum}")   # at the end of a step in flight

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(args: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from .losses import recipe_for
    from .trainer import DistillConfig

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise SystemExit("--methods: expected at least one method")
    try:
        options = parse_method_options(args.option or [], methods)
        changes = parse_weights(args.weight or [])
        weights = None
        if changes:
            # the recipe depends on the teacher: encoders get BERT's weights, causal LMs OPT's
            weights = recipe_for(args.teacher != "minilm").replace(**changes)
        config = DistillConfig(
            steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
            new_lr_scale=args.new_lr_scale, pretrained_lr_scale=args.pretrained_lr_scale,
            weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, precision=args.precision, seed=args.seed,
            checkpoint_every=args.checkpoint_every, weights=weights, hidden_loss=args.hidden_loss,
            cuda_graph=not args.no_cuda_graph,
        )
        started = time.perf_counter()
        # every step has the same shapes, so cuDNN's per-shape algorithm search pays: SEA's causal decoder
        # convolutions' weight gradients (bf16 under autocast) otherwise take a slow implicit-GEMM kernel
        # (H100 2026-11-25, SmolLM2-shaped SEA step: 0.712 → 0.664 s median; benchmarks/distill_step_profile.py)
        import torch

        torch.backends.cudnn.benchmark = True

        def log(message: str) -> None:  # seconds since the run began (after the imports): where a call's time went
            print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

        with sigterm_as_interrupt():
            results = run_experiment(
                teacher=args.teacher, methods=[(m, options[m]) for m in methods], config=config, out_dir=args.out,
                eval_max_windows=args.eval_windows, num_layers=args.layers, time_budget=args.time_budget,
                device=args.device, progress=not args.no_progress,
                command="approxattn " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
                train_split=args.train_split, finetune_teacher_steps=args.finetune_teacher,
                finetune_batch_size=args.finetune_batch_size, log=log,
            )
    except (ValueError, TypeError, NotImplementedError) as error:
        print(f"approxattn distill: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"approxattn distill: interrupted; the checkpoints in {args.out} hold every step done: run the "
              "same command to resume", file=sys.stderr)
        return 130
    from .experiment import markdown_table

    print(markdown_table(results))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from .experiment import RESULTS, markdown_table, merge_results

    loaded = []
    for folder in args.folders:
        path = Path(folder)
        path = path / RESULTS if path.is_dir() else path
        if not path.exists():
            print(f"approxattn distill report: no {RESULTS} in {folder}", file=sys.stderr)
            return 2
        loaded.append(json.loads(path.read_text()))
    try:
        merged = merge_results(loaded)
    except ValueError as error:
        print(f"approxattn distill report: {error}", file=sys.stderr)
        return 2
    print(markdown_table(merged))
    return 0


def add_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``distill`` (with ``run`` and ``report``) to the ``approxattn`` command's subparsers."""
    distill = subparsers.add_parser("distill", help="distil a pretrained model (SmolLM2, MiniLM) into approxattn "
                                                    "methods; held-out KJV perplexity")
    sub = distill.add_subparsers(dest="distill_command", required=True)
    run = sub.add_parser("run", help="distil each method with the same budget and evaluate it and the teacher",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--teacher", choices=("smollm2", "minilm", "kjv-tiny"), default="smollm2",
                     help="kjv-tiny: a small softmax Llama trained here on the KJV train split first "
                          "(cached in --out/teacher), for machines without the budget for SmolLM2")
    run.add_argument("--methods", default="performer,linear", help="comma-separated methods (default performer,linear)")
    run.add_argument("--train-split", choices=TRAIN_SPLITS, default="train",
                     help="the students' training text: the lab's KJV excerpt (96 K tokens, default) or every book "
                          "before the held-out ones (Genesis to Philemon, ~1 M tokens)")
    run.add_argument("--finetune-teacher", type=int, default=0, metavar="STEPS",
                     help="first fine-tune the (causal) teacher on the train split with the next-token loss alone for "
                          "STEPS steps of the same recipe, then distil from it, as the SEA paper did (its teachers "
                          "are domain fine-tunes); cached in --out/teacher_finetuned (default 0: the teacher as loaded)")
    run.add_argument("--finetune-batch-size", type=int, default=None, metavar="N",
                     help="the teacher fine-tune's batch (default: --batch-size), e.g. to keep an earlier run's teacher "
                          "while the students take larger batches")
    run.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE", help="a method option (repeatable)")
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--seq-len", type=int, default=1024)
    run.add_argument("--lr", type=float, default=1e-5, help="base learning rate (AdamW)")
    run.add_argument("--new-lr-scale", type=float, default=10.0, help="lr factor of the methods' new parameters")
    run.add_argument("--pretrained-lr-scale", type=float, default=0.2, help="lr factor of the pretrained weights")
    run.add_argument("--weight-decay", type=float, default=0.01)
    run.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default="constant",
                     help="constant (SEA's recipe) or a decay to --min-lr-ratio x the peak at the last step")
    run.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the schedule")
    run.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr of a decaying schedule / peak lr")
    run.add_argument("--grad-clip", type=float, default=1.0)
    run.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-cuda-graph", action="store_true",
                     help="run every training step eagerly (default on CUDA: replayed from a CUDA graph after a warm-up)")
    run.add_argument("--checkpoint-every", type=int, default=100)
    run.add_argument("--weight", action="append", metavar="TERM=VALUE", help="a loss weight (repeatable)")
    run.add_argument("--hidden-loss", choices=("relative", "mse"), default="relative",
                     help="hidden-state term: per-token relative squared error (default) or the reference's plain MSE")
    run.add_argument("--eval-windows", type=int, default=None, help="at most this many held-out windows (default all)")
    run.add_argument("--layers", type=int, default=None, help="keep only the teacher's first N layers (debugging)")
    run.add_argument("--time-budget", type=float, default=None,
                     help="seconds of training for all methods together: time a few steps, then fit --steps")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    run.add_argument("--out", default="distill-report")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    run.set_defaults(func=run_command)
    rep = sub.add_parser("report", help="print the markdown table of one or more results folders (several: "
                                        "methods run as separate processes, merged)")
    rep.add_argument("folders", nargs="+", metavar="folder")
    rep.set_defaults(func=report_command)
    return distill


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="approxattn")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["distill", *argv])
    args.argv = ["distill", *argv]
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
