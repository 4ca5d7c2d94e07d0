"""Host time of the fused ops: what one fwd+bwd costs the CPU, next to SDPA's.

At small N every fused path is bound by the host (Python, Triton launches, small torch ops),
not by the GPU. For each case this prints, through the module path that ``approxattn bench``
times: the launch-side time per call (no synchronisation inside the loop), the wall time per
call, and the same for SDPA (flash) at the same shape; then the cost of one trivial Triton
launch and of ``torch.empty``. Run it once against the old and once against the new
``src`` (``PYTHONPATH``) for an A/B on the same machine.

Usage: PYTHONPATH=src python benchmarks/host_overhead.py [N ...]
"""

import sys
import time

import torch
import triton

import approxattn

SIZES = [int(a) for a in sys.argv[1:]] or [1024, 4096]
CASES = [
    ("elu+1", "linear", {}, False),
    ("FAVOR+ m=256", "performer", {"num_features": 256}, False),
    ("elu+1 causal", "linear", {}, True),
    ("FAVOR+ m=256 causal (prefix max)", "performer", {"num_features": 256}, True),
    ("FLuRKA r=128 m=256", "flurka-performer", {"rank": 128, "num_features": 256}, False),
]


def per_call(step, calls=50):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / calls * 1e3


for n in SIZES:
    q, k, v, do = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    for causal in (False, True):
        def sdpa_step():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.autograd.grad(out, (q, k, v), do)

        host, wall = per_call(sdpa_step)
        print(f"N={n:<6} {'SDPA' + (' causal' if causal else ''):<34} fwd+bwd host {host:.3f} ms, wall {wall:.3f} ms",
              flush=True)
    for label, method, options, causal in CASES:
        kwargs = dict(options)
        if method.startswith("flurka"):
            kwargs["max_len"] = n
        module = approxattn.build(method, head_dim=64, **kwargs).cuda().eval()
        scale = 64**-0.5 if approxattn.get_method(method).uses_scale else None
        if causal and method == "performer" and n > 4096:
            continue

        def fwd_step():
            with torch.no_grad():
                module(q, k, v, causal=causal, scale=scale)

        def both_step():
            torch.autograd.grad(module(q, k, v, causal=causal, scale=scale), (q, k, v), do)

        fh, fw = per_call(fwd_step)
        bh, bw = per_call(both_step)
        print(f"N={n:<6} {label:<34} fwd host {fh:.3f} ms, wall {fw:.3f} ms; "
              f"fwd+bwd host {bh:.3f} ms, wall {bw:.3f} ms", flush=True)


@triton.jit
def _noop(x_ptr, n):
    pass


x = torch.zeros(16, device="cuda")
_noop[(1,)](x, 16)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(1000):
    _noop[(1,)](x, 16)
print(f"trivial triton launch: {(time.perf_counter() - t0) * 1e3:.1f} us/launch (host)", flush=True)
t0 = time.perf_counter()
for _ in range(1000):
    torch.empty(16, device="cuda")
print(f"torch.empty: {(time.perf_counter() - t0) * 1e3:.1f} us", flush=True)
try:
    from approxattn.kernels import _launch

    print(f"direct launches: {getattr(_launch, 'DIRECT_LAUNCH', 'n/a (old code)')}", flush=True)
except ImportError:
    pass
