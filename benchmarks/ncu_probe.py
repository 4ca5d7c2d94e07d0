"""Where the fused kernel-attention kernels spend their issue slots: one fwd+bwd under Nsight Compute,
and the SASS opcode mix of each compiled Triton kernel.

Usage (device machine):  ncu --clock-control none --profile-from-start off --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section WarpStateStats python benchmarks/ncu_probe.py [case]
then  python benchmarks/ncu_probe.py --sass [FILE]  (opcode histogram of the kernels in Triton's cache; FILE: their
whole SASS too).
Cases: favor (non-causal FAVOR+ m=256), relu (ReLU m=256), favor-causal (prefix max), all at N = 65,536.
"""

import collections
import glob
import os
import re
import subprocess
import sys


def sass_histogram(dump: str | None = None) -> None:
    """Opcode counts of every cached kernel; ``dump``: also write the whole SASS of each to that file."""
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    out = open(dump, "w") if dump else None
    for cubin in sorted(glob.glob(f"{cache}/*/*.cubin")):
        name = os.path.basename(cubin)[: -len(".cubin")]
        sass = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        if out:
            out.write(f"===== {name} ({cubin})\n{sass}\n")
        ops = collections.Counter()
        for line in sass.splitlines():
            hit = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?", line)
            if hit:
                ops[hit.group(1)] += 1
        total = sum(ops.values())
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(18))
        print(f"{name}: {total} instructions: {top}")


def profile(case: str) -> None:
    import torch

    from approxattn.kernels import FeatureConfig
    from feature_step import fwd_bwd_step

    w = torch.randn(256, 64, device="cuda")
    cfgs = {
        "favor": (FeatureConfig("favor", w, x_scale=64**-0.25, ratio=256**-0.5, eps=1e-6), False),
        "relu": (FeatureConfig("relu", w, x_scale=64**-0.25, eps=1e-3), False),
        "favor-causal": (FeatureConfig("favor", w, x_scale=64**-0.25, ratio=256**-0.5, eps=1e-6), True),
    }
    cfg, causal = cfgs[case]
    step = fwd_bwd_step(cfg, causal, 65536)
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sass"]:
        sass_histogram(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        profile(sys.argv[1] if len(sys.argv) > 1 else "favor")
