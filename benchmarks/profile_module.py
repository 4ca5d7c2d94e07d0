"""Per-kernel GPU time of one method's module, forward + backward (torch.profiler), e.g. to see where FLuRKA's
time goes beside its kernel stage.

Usage: PYTHONPATH=src python benchmarks/profile_module.py flurka-performer rank=128 num_features=256 [--seq 65536]
(B = 1, H = 16, d = 64, bf16, inputs and the module's parameters requiring gradients, as `approxattn bench` times it).
"""

import argparse
import ast

import torch
from torch.profiler import ProfilerActivity, profile

import approxattn

parser = argparse.ArgumentParser()
parser.add_argument("method")
parser.add_argument("options", nargs="*", help="NAME=VALUE (Python literals)")
parser.add_argument("--seq", type=int, default=65536)
parser.add_argument("--calls", type=int, default=5)
args = parser.parse_args()
options = {name: ast.literal_eval(value) for name, value in (o.split("=", 1) for o in args.options)}
if "max_len" in approxattn.get_method(args.method).defaults:
    options.setdefault("max_len", args.seq)
module = approxattn.build(args.method, head_dim=64, **options).cuda()
q, k, v = (torch.randn(1, 16, args.seq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))


def step():
    module(q, k, v).backward(torch.ones(1, 16, args.seq, 64, device="cuda", dtype=torch.bfloat16))


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(args.calls):
        step()
    torch.cuda.synchronize()
events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
total = sum(e.device_time_total for e in events) / args.calls / 1e3
print(f"== {args.method} {options} N={args.seq}: GPU time {total:.3f} ms per fwd+bwd")
for e in events[:14]:
    print(f"   {e.key[:70]:70s} {e.device_time_total / args.calls / 1e3:8.3f} ms  x{e.count // args.calls}")
