"""SEA's encoder-and-gates kernel at N = 65,536 (B=1, H=16, d=64, bf16 maps): its launch configs against the
unfused path (two GEMMs, the LayerNorm kernel, the gates' linear). Prints the table; writes
``sea_encoder_tune.json`` to --out.

    PYTHONPATH=src python benchmarks/sea_encoder_tune.py [--seq 65536] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from triton.testing import do_bench

import approxattn
from approxattn.blocks.sea_estimator import linear
from approxattn.kernels import sea_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sea = approxattn.build("sea", head_dim=64).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    context = torch.randn(1, 16, args.seq, 128, device="cuda", generator=gen).to(torch.bfloat16)
    own_value = torch.randn(1, 16, args.seq, 64, device="cuda", generator=gen).to(torch.bfloat16)
    parts = (sea.encoder.weight, sea.encoder.bias, sea.encoder_norm.weight, sea.encoder_norm.bias,
             sea.encoder_norm.eps, sea.gate.weight, sea.gate.bias)
    fused = lambda: sea_encoder.fast_encoder_and_gates(context, own_value, *parts)  # noqa: E731
    rows = []

    def timed(name, fn, config=None):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append({"name": name, "ms": ms, "config": config})
        print(f"{name:50s} {ms:8.3f} ms", flush=True)

    with torch.no_grad():
        e, gates = fused()
        ref_e, ref_gates = sea_encoder.encoder_and_gates_reference(context, own_value, *parts)
        diff = float((e.float() - ref_e.float()).norm() / ref_e.float().norm())
        print(f"kernel vs twin: e rel diff {diff:.2e}", flush=True)
        timed("unfused (GEMMs, LayerNorm kernel, gates linear)",
              lambda: torch.sigmoid(linear(sea._encode(context, own_value, 1), sea.gate)))
        timed("fused kernel, default config", fused)
        for br, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2)):
            sea_encoder.OVERRIDE.clear()
            sea_encoder.OVERRIDE.update(BR=br, num_warps=warps, num_stages=stages)
            try:
                timed(f"fused BR={br} warps={warps} stages={stages}", fused,
                      config={"BR": br, "num_warps": warps, "num_stages": stages})
            except Exception as error:  # noqa: BLE001  (out of resources: report and go on)
                print(f"fused BR={br} warps={warps} stages={stages}: {type(error).__name__}", flush=True)
        sea_encoder.OVERRIDE.clear()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": args.seq,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "e_rel_diff": diff}
        (args.out / "sea_encoder_tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
