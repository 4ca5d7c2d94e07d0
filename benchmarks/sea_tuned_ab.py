"""The sea module at N = 65,536 (B=1, H=16, d=64, bf16, non-causal) with its kernels' default launch configs
against the best configs of the sweeps in --results (``sea_head_tune.json``, ``sea_encoder_tune.json``,
``row_gemm_tune.json``; any missing is skipped), applied through the kernels' OVERRIDE dicts, alternated in one
process; SDPA's forward timed beside them. Prints the configs picked, the medians, the ratios and the output
difference; writes ``sea_tuned_ab.json`` to --results. A sweep's best replaces a default only where it was
faster than the default timed in the same sweep.

    PYTHONPATH=src python benchmarks/sea_tuned_ab.py --results DIR [--seq 65536] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import approxattn
from approxattn.kernels import band_conv, row_window_gemm, sea_decoder_head, sea_encoder


def _best(rows: list[dict], default_ms: float | None) -> dict | None:
    """The fastest swept config, if it beat the default."""
    swept = [r for r in rows if r.get("config")]
    if not swept:
        return None
    best = min(swept, key=lambda r: r["ms"])
    return best["config"] if default_ms is None or best["ms"] < default_ms else None


# the single-kernel sweeps: (file, the name prefix of their default row, the OVERRIDE a pick goes into)
SWEEPS = {"head": ("sea_head_tune.json", "lean head (argmax", sea_decoder_head.OVERRIDE),
          "encoder": ("sea_encoder_tune.json", "fused kernel, default", sea_encoder.OVERRIDE)}


def picked_overrides(results: Path) -> dict[str, tuple[dict, dict]]:
    """{kernel: (the OVERRIDE dict to update, the entries)} from the sweeps found in results."""
    picked = {}
    for name, (file, default_name, target) in SWEEPS.items():
        if (results / file).exists():
            rows = json.loads((results / file).read_text())["rows"]
            best = _best(rows, next((r["ms"] for r in rows if r["name"].startswith(default_name)), None))
            if best:
                picked[name] = (target, best)
    gemms = results / "row_gemm_tune.json"
    if gemms.exists():
        swept = json.loads(gemms.read_text()).get("swept", [])
        for step, key in (("first", "gemm:step2"), ("middle", "gemm:step1")):
            rows = [r for r in swept if r["step"] == step]
            best = _best(rows, next((r["ms"] for r in rows if r["config"] is None), None))
            if best:
                picked[f"row gemm {step}"] = (row_window_gemm.OVERRIDE, {key: best})
        rows = [r for r in swept if r["step"] == "band"]
        best = _best(rows, next((r["ms"] for r in rows if r["config"] is None), None))
        if best:
            picked["band conv"] = (band_conv.OVERRIDE, best)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    picked = picked_overrides(args.results)
    for name, (_, entries) in picked.items():
        print(f"picked {name}: {entries}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 16, args.seq, 64, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    sea = approxattn.build("sea", head_dim=64).cuda().eval()

    def apply(tuned: bool) -> None:
        for target in (sea_decoder_head.OVERRIDE, sea_encoder.OVERRIDE, row_window_gemm.OVERRIDE, band_conv.OVERRIDE):
            target.clear()
        if tuned:
            for target, entries in picked.values():
                target.update(entries)

    times: dict[str, list[float]] = {"default": [], "tuned": [], "sdpa": []}
    with torch.no_grad():
        apply(False)
        reference = sea(q, k, v)
        apply(True)
        tuned_out = sea(q, k, v)
        difference = float((tuned_out.float() - reference.float()).norm() / reference.float().norm())
        print(f"tuned vs default output: relative difference {difference:.2e}", flush=True)
        for _ in range(args.rounds):
            for side in ("default", "tuned"):
                apply(side == "tuned")
                times[side].append(do_bench(lambda: sea(q, k, v), warmup=10, rep=100, return_mode="median"))
            times["sdpa"].append(do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=5, rep=50,
                                          return_mode="median"))
        apply(False)
    medians = {side: statistics.median(t) for side, t in times.items()}
    for side, t in times.items():
        print(f"{side:8s} " + " ".join(f"{x:7.3f}" for x in t) + f"   median {medians[side]:.3f} ms", flush=True)
    print(f"SDPA / default {medians['sdpa'] / medians['default']:.2f}x, SDPA / tuned "
          f"{medians['sdpa'] / medians['tuned']:.2f}x", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": args.seq,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "difference": difference}
    (args.results / "sea_tuned_ab.json").write_text(json.dumps(
        {"meta": meta, "picked": {name: entries for name, (_, entries) in picked.items()}, "times": times,
         "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
