"""Per-kernel GPU time of one method's module, forward + backward (torch.profiler), e.g. to see where FLuRKA's
time goes beside its kernel stage, or where a distillation step's SEA layer goes at 2 × 1024 tokens.

Usage: PYTHONPATH=src python benchmarks/profile_module.py flurka-performer rank=128 num_features=256 [--seq 65536]
       PYTHONPATH=src python benchmarks/profile_module.py sea columns=256 half_estimate=False \
           --batch 2 --heads 9 --kv-heads 3 --seq 1024 --causal [--cudnn-benchmark]
(default B = 1, H = 16, d = 64, bf16, inputs and the module's parameters requiring gradients, as `approxattn bench`
times it). Prints the wall time per fwd+bwd (CUDA events, median), the summed kernel time, and the top kernels by
their own device time.
"""

import argparse
import ast
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import approxattn

parser = argparse.ArgumentParser()
parser.add_argument("method")
parser.add_argument("options", nargs="*", help="NAME=VALUE (Python literals)")
parser.add_argument("--seq", type=int, default=65536)
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
parser.add_argument("--causal", action="store_true")
parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
parser.add_argument("--calls", type=int, default=5)
parser.add_argument("--top", type=int, default=14)
args = parser.parse_args()
torch.backends.cudnn.benchmark = args.cudnn_benchmark
options = {name: ast.literal_eval(value) for name, value in (o.split("=", 1) for o in args.options)}
if "max_len" in approxattn.get_method(args.method).defaults:
    options.setdefault("max_len", args.seq)
module = approxattn.build(args.method, head_dim=64, **options).cuda()
kv_heads = args.kv_heads or args.heads
shape = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
q = torch.randn(args.batch, args.heads, args.seq, 64, **shape)
k, v = (torch.randn(args.batch, kv_heads, args.seq, 64, **shape) for _ in range(2))
grad = torch.ones(args.batch, args.heads, args.seq, 64, device="cuda", dtype=torch.bfloat16)


def step():
    module(q, k, v, causal=args.causal).backward(grad)


for _ in range(3):
    step()
torch.cuda.synchronize()
times = []
for _ in range(10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(args.calls):
        step()
    torch.cuda.synchronize()
kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
events = sorted(kernels, key=lambda e: -e.self_device_time_total)
total = sum(e.self_device_time_total for e in events) / args.calls / 1e3
print(f"== {args.method} {options} B={args.batch} H={args.heads}/{kv_heads} N={args.seq} causal={args.causal} "
      f"cudnn.benchmark={args.cudnn_benchmark}: wall {statistics.median(times):.3f} ms per fwd+bwd (median of 10), "
      f"kernels {total:.3f} ms")
for e in events[:args.top]:
    print(f"   {e.key[:70]:70s} {e.self_device_time_total / args.calls / 1e3:8.3f} ms  x{e.count // args.calls}")
