"""SEA's non-causal estimator at N = 65,536 (B=1, H=16, d=64, bf16, m = 33 FAVOR+ features over [P, v], 128
wide): launch configs of its two kernels (``state``, ``out``), each swept with the other at its default, forward
only. Prints the table; writes ``sea_estimator_tune.json`` to --out.

    PYTHONPATH=src python benchmarks/sea_estimator_tune.py [--seq 65536] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from approxattn.blocks.feature_maps import favor_ratio
from approxattn.blocks.random_matrices import gaussian_orthogonal_matrix
from approxattn.kernels import FeatureConfig, _launch, linear_attn
from approxattn.kernels.ops import unchecked_feature_attention
from approxattn.methods.sparse import SOFTMAX_EPS, default_num_features

CONFIGS = [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 4, 2), (128, 8, 2), (64, 4, 3), (128, 4, 3), (256, 4, 2),
           (256, 8, 2), (32, 4, 1), (64, 4, 1), (128, 8, 3)]


def override(kind=None, config=None):
    _launch.OVERRIDES.clear()
    if kind is not None:
        _launch.OVERRIDES[kind] = config
    linear_attn._FORWARD_PLANS.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(1, 16, args.seq, 64, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    v_aug = torch.randn(1, 16, args.seq, 128, device="cuda", generator=gen).to(torch.bfloat16)
    m = default_num_features(64)
    projection = gaussian_orthogonal_matrix(m, 64, torch.Generator().manual_seed(0)).cuda()
    cfg = FeatureConfig("favor", projection, x_scale=0.125**0.5, ratio=favor_ratio(m, hyperbolic=False),
                        eps=SOFTMAX_EPS, stabilize=True)
    run = lambda: unchecked_feature_attention(q, k, v_aug, cfg, causal=False)  # noqa: E731
    rows = []
    with torch.no_grad():
        override()
        base = run().float()
        default = do_bench(run, warmup=10, rep=50, return_mode="median")
        print(f"defaults: {default:.3f} ms", flush=True)
        rows.append({"kind": "defaults", "ms": default})
        for kind in ("state", "out"):
            for bn, warps, stages in CONFIGS:
                override(kind, {"BN": bn, "num_warps": warps, "num_stages": stages})
                try:
                    diff = float((run().float() - base).norm() / base.norm())
                    ms = do_bench(run, warmup=10, rep=50, return_mode="median")
                except Exception as error:  # noqa: BLE001  (out of resources: report and go on)
                    print(f"{kind} BN={bn} warps={warps} stages={stages}: {type(error).__name__}", flush=True)
                    continue
                rows.append({"kind": kind, "BN": bn, "num_warps": warps, "num_stages": stages, "ms": ms, "diff": diff})
                print(f"{kind:5s} BN={bn:<4d} warps={warps} stages={stages}: {ms:.3f} ms (diff {diff:.1e})", flush=True)
        override()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": args.seq, "features": m,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (args.out / "sea_estimator_tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
