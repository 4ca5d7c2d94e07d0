"""Why a SmolLM2 distillation step is host-bound: aten calls per step, per attention layer (CPU).

Counts the aten operator calls (torch.profiler) of one distillation step (teacher forward, student
forward + losses, backward, AdamW) on SmolLM2 cut to a few layers, for a softmax student and a SEA
student, and of one SEA module call alone (forward + backward, 9 query / 3 key-value heads). On the
GPU each call costs host time whatever its size, which is what bounds the step there (2.3-2.9 s for
30 layers at 2 × 1024 tokens, benchmarks/results/h100/distill/NOTES.md, session 5).

    python benchmarks/distill_step_ops.py [--layers 2] [--seq 128]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def aten_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    from approxattn.api import build
    from approxattn.distill.experiment import load_teacher
    from approxattn.distill.trainer import DistillConfig, Distiller

    torch.manual_seed(0)
    model, _ = load_teacher("smollm2", num_layers=args.layers)
    ids = torch.randint(0, 40000, (1, args.seq))
    steps = {}
    for method, options in (("softmax", {}), ("sea", {"k": 64})):
        distiller = Distiller(model, DistillConfig(method=method, options=options, seq_len=args.seq))
        distiller.step(ids)   # warm-up
        steps[method] = aten_calls(lambda: distiller.step(ids))
        print(f"{method} student: {steps[method]} aten calls per step, "
              f"{steps[method] / args.layers:.0f} per layer ({args.layers} layers, {args.seq} tokens)")

    sea = build("sea", head_dim=64, k=64).train()
    q = torch.randn(1, 9, args.seq, 64, requires_grad=True)
    k, v = (torch.randn(1, 3, args.seq, 64, requires_grad=True) for _ in range(2))
    sea(q, k, v, causal=True).sum().backward()   # warm-up
    module = aten_calls(lambda: sea(q, k, v, causal=True).sum().backward())
    print(f"one causal SEA module call, forward + backward: {module} aten calls")


if __name__ == "__main__":
    main()
