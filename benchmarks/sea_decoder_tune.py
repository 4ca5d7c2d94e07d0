"""Launch-config sweep for SEA's decoder kernels at the module's 64K shapes (B=1, H=16, d=64, T=128, bf16):
the small conv (down: stride 2; middle) and the fused decoder head, each against a copy of its input
bytes (the memory floor's order). Prints a line per (kernel, BR, num_warps) with the median ms
(``triton.testing.do_bench``); ``--out`` saves the table as JSON.

    PYTHONPATH=src python benchmarks/sea_decoder_tune.py [--seq 65536] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from approxattn.blocks.sea_estimator import histogram_resampling, interpolation_matrix
from approxattn.kernels import sea_decoder_head, small_conv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    N, S, W, T, d, dev, dt = args.seq, 16, 64, 128, 64, "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    # the decoder's maps as the module makes them: x a permuted view of the row linear's output
    x = torch.randn(S, N, 4, W, device=dev, generator=gen).relu().to(dt).permute(0, 2, 1, 3)
    mid = torch.randn(S, 4, (N + 1) // 2, W, device=dev, generator=gen).relu().to(dt)
    w3 = torch.randn(4, 4, 3, 3, device=dev, generator=gen).to(dt) * 0.3
    b4 = torch.randn(4, device=dev, generator=gen).to(dt)
    w_out, b_out = torch.randn(1, 4, 3, 3, device=dev, generator=gen).to(dt) * 0.3, torch.zeros(1, device=dev, dtype=dt)
    hist = torch.rand(S, N, 2 * d, device=dev, generator=gen).to(dt)[..., :d]
    weights = histogram_resampling(torch.tensor([N], device=dev), d, T, torch.float32)
    interp = interpolation_matrix(W, T, dtype=dt, device=torch.device(dev))
    pad = {"pad_top": 1, "pad_bottom": 1, "pad_left": 1, "pad_right": 1, "relu": True}
    cases = {
        "conv down": lambda: small_conv.small_conv2d(x, w3, b4, stride_rows=2, **pad),
        "conv middle": lambda: small_conv.small_conv2d(mid, w3, b4, **pad),
        "decoder head": lambda: sea_decoder_head.decoder_head(mid, w_out, b_out, interp, rows=N, histogram=hist,
                                                              hist_weights=weights, heads=S),
    }
    floors = {"conv down": x.contiguous(), "conv middle": mid, "decoder head": mid}
    rows = []
    for name, fn in cases.items():
        module = sea_decoder_head if name == "decoder head" else small_conv
        floor = do_bench(lambda: floors[name].clone(), warmup=10, rep=50)
        print(f"{name}: copy of its input {floor:.3f} ms", flush=True)
        rows.append({"kernel": name, "config": "input copy", "ms": floor})
        for BR in (4, 8, 16, 32, 64, 128):
            for warps in (2, 4, 8):
                if name != "decoder head" and BR * 4 * W > 16384:
                    continue
                if name == "decoder head" and BR < 16:
                    continue
                module.OVERRIDE.clear()
                module.OVERRIDE.update({"BR": BR, "num_warps": warps})
                try:
                    ms = do_bench(fn, warmup=10, rep=50)
                except Exception as error:  # noqa: BLE001  (out of resources: report and go on)
                    print(f"  BR={BR} warps={warps}: failed {type(error).__name__}", flush=True)
                    continue
                rows.append({"kernel": name, "config": f"BR={BR} warps={warps}", "ms": ms})
                print(f"  BR={BR:3d} warps={warps}: {ms:.3f} ms", flush=True)
        module.OVERRIDE.clear()
        default = do_bench(fn, warmup=10, rep=50)
        rows.append({"kernel": name, "config": "default", "ms": default})
        print(f"  default: {default:.3f} ms", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seq": N}
        (args.out / "sea_decoder_tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
