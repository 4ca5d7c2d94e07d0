"""SEA's non-causal decoder at real size: the three row-window GEMMs (each alone, under a few launch
configs) beside the layers they replace (row linear + two direct convs + the fused head kernel), same
inputs, one process. Forward only, bf16 maps, B=1, H=16, d=64.

    PYTHONPATH=src python benchmarks/row_gemm_tune.py --seq 65536 [--columns 128] [--json out.json]

Prints medians of ``triton.testing.do_bench`` in ms and each GEMM's bytes / time against the measured
copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
from triton.testing import do_bench

from approxattn.blocks.sea_estimator import NonCausalDecoder, histogram_resampling
from approxattn.kernels import band_conv as bc
from approxattn.kernels import row_window_gemm as rwg
from approxattn.kernels.sea_decoder_head import fast_decoder_head

CONFIGS = {
    "gemm": [{"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 2}, {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 2},
             {"BM": 64, "BN": 256, "num_warps": 8, "num_stages": 2}, {"BM": 128, "BN": 256, "num_warps": 8, "num_stages": 2},
             {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 3}, {"BM": 32, "BN": 128, "num_warps": 4, "num_stages": 2},
             # run 18: deeper pipelines and narrower K blocks (the 128 × 256 strided tile spills 564/708 B at BK 64)
             {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3}, {"BM": 128, "BN": 128, "num_warps": 4, "num_stages": 3},
             {"BM": 64, "BN": 256, "num_warps": 8, "num_stages": 3}, {"BM": 128, "BN": 256, "BK": 32, "num_warps": 8,
                                                                     "num_stages": 3},
             {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 3}, {"BM": 256, "BN": 128, "num_warps": 8, "num_stages": 2}],
    # the middle conv as the band kernel (K = 4·P + 32 of the GEMM's 256; session 26, CPU census only)
    "band": [{"BM": bm, "P": p, "num_warps": w, "num_stages": st}
             for bm, p, w, st in ((128, 16, 4, 2), (64, 16, 4, 2), (128, 16, 8, 2), (256, 16, 8, 2), (128, 16, 4, 1),
                                  (128, 32, 8, 2), (64, 32, 4, 2), (256, 16, 4, 2))]
            # programs that loop over row blocks (GRID_M along the rows: 384 programs at 64K, ~3 an SM, or 768), so
            # that Triton pipelines the next block's loads; the CPU census: 224 KiB of shared memory at 128 rows and
            # 2 stages (1 CTA an SM), so 64 rows too (session 26, untimed)
            + [{"BM": bm, "P": 16, "num_warps": 4, "num_stages": st, "GRID_M": g}
               for bm, st, g in ((128, 2, 6), (128, 1, 6), (64, 2, 12), (64, 2, 24), (64, 3, 12))],
    "softmax": [{"BM": 32, "num_warps": 4, "num_stages": 2}, {"BM": 16, "num_warps": 4, "num_stages": 2},
                {"BM": 16, "num_warps": 2, "num_stages": 2}, {"BM": 32, "num_warps": 4, "num_stages": 1},
                {"BM": 32, "num_warps": 4, "BK": 32, "num_stages": 2}],
}


def ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--columns", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", default="first,middle,head,head, half dots",
                        help="which GEMMs to sweep, comma-separated (first, middle, head, 'head, half dots'); "
                             "the old layers are timed only with the head")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    N, H, T = args.seq, 16, args.columns
    decoder = NonCausalDecoder(64, T, None, zero_last=True).to(dev).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(std=0.1)
    e = torch.randn(1, H, N, 128, device=dev).bfloat16()
    context = torch.rand(1, H, N, 128, device=dev).bfloat16()
    hist = context[..., :64]
    n_valid = torch.tensor([N], device=dev)
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 2 / (ms(functools.partial(dst.copy_, src)) * 1e-3)
    del src, dst
    rows = {}
    swept = []   # {"step", "config" (None: the default), "ms"}, for benchmarks/sea_tuned_ab.py
    with torch.no_grad():
        # the layers the GEMMs replace (what logits_and_probs ran before): row linear + convs, then the head kernel
        y = decoder._middle(e)
        weights = histogram_resampling(n_valid, 64, T, torch.float32)
        from approxattn.blocks.sea_estimator import interpolation_matrix

        interp = interpolation_matrix(decoder.width, T, dtype=y.dtype, device=y.device)
        if "head" in args.steps:
            rows["old: row linear + down + middle conv"] = ms(lambda: decoder._middle(e))
            rows["old: head kernel"] = ms(lambda: fast_decoder_head(y, decoder.out.weight, decoder.out.bias, interp, rows=N,
                                                                    histogram=hist.reshape(H, N, -1),
                                                                    hist_weights=weights, heads=H))
            rows["new: logits_and_probs (two GEMMs + head kernel)"] = ms(
                lambda: decoder.logits_and_probs(e, histogram=hist, n_valid=n_valid))
            os.environ["APPROXATTN_SEA_HEAD"] = "gemm"
            rows["new: logits_and_probs (three GEMMs)"] = ms(lambda: decoder.logits_and_probs(e, histogram=hist,
                                                                                              n_valid=n_valid))
            os.environ["APPROXATTN_SEA_HEAD"] = "kernel"
        w = decoder._row_gemm_matrices(e.dtype, e.device)
        first, taps, first_bias, middle, middle_bias, head, head_bias = (
            w.first, w.first_taps, w.first_bias, w.middle, w.middle_bias, w.head, w.head_bias)
        R = (N + 1) // 2
        x = e.reshape(H, N, 128)
        y1 = rwg.window_gemm(x, first, first_bias, tap_bias=taps, step=2, pad=1, virtual_rows=N, out_rows=R, relu=True)
        y2 = rwg.window_gemm(y1, middle, middle_bias, step=1, pad=1, virtual_rows=R, out_rows=R, relu=True)
        steps = {
            "first": (lambda: rwg.window_gemm(x, first, first_bias, tap_bias=taps, step=2, pad=1, virtual_rows=N,
                                              out_rows=R, relu=True), "gemm", x.numel() * 2 + y1.numel() * 2),
            "middle": (lambda: rwg.window_gemm(y1, middle, middle_bias, step=1, pad=1, virtual_rows=R, out_rows=R,
                                               relu=True), "gemm", 2 * y1.numel() * 2),
            "head": (lambda: rwg.window_gemm_softmax(y2, head, head_bias, up=2, virtual_rows=N, out_rows=N,
                                                     histogram=hist.reshape(H, N, -1), hist_weights=weights, heads=H),
                     "softmax", y2.numel() * 2 + H * N * 64 * 2 + H * N * T * (2 + 4 + 0) + H * N * 8),
        }
        if "band" in args.steps:
            _band_sweep(decoder, x, w, y2, R, N, rows, swept, bandwidth)
        variants = [(name, fn, kind, nbytes, False) for name, (fn, kind, nbytes) in steps.items()]
        variants.append(("head, half dots", steps["head"][0], "softmax", steps["head"][2], True))
        wanted = {step.strip() for step in args.steps.split(",")} | ({"head, half dots"} if "half dots" in args.steps else set())
        variants = [variant for variant in variants if variant[0] in wanted]
        for name, fn, kind, nbytes, half_dots in variants:
            rwg.HALF_SOFTMAX_DOTS = half_dots
            for cfg in [None] + CONFIGS[kind]:
                rwg.OVERRIDE.clear()
                if cfg is not None:
                    rwg.OVERRIDE[kind] = cfg
                try:
                    t = ms(fn)
                except Exception as error:  # noqa: BLE001  (a config past the device's resources)
                    print(f"{name} {cfg}: failed ({type(error).__name__}: {str(error)[:80]})", flush=True)
                    continue
                label = f"new: {name} {'default' if cfg is None else cfg}"
                rows[label] = t
                swept.append({"step": name, "config": cfg, "ms": t})
                print(f"{label:80s} {t:8.3f} ms  floor {nbytes / bandwidth * 1e3:6.3f} ms", flush=True)
            rwg.OVERRIDE.clear()
        rwg.HALF_SOFTMAX_DOTS = False
    print(f"{torch.cuda.get_device_name()}  N={N} H={H} T={T}  copy {bandwidth / 1e12:.2f} TB/s")
    for label, t in rows.items():
        print(f"{label:80s} {t:8.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "seq": N, "heads": H, "columns": T,
                       "bandwidth": bandwidth, "ms": rows, "swept": swept}, f, indent=1)


def _band_sweep(decoder, x, w, y2, R, N, rows, swept, bandwidth) -> None:
    """The middle conv as the band kernel over the first GEMM's position-major map, at its configs (each with
    the band tile for its P), and its output against the middle GEMM's (y2). w: the decoder's RowGemmWeights."""
    tile = w.band
    y1 = rwg.window_gemm(x, w.first_positions, w.first_bias_positions, tap_bias=w.first_taps_positions, step=2, pad=1,
                         virtual_rows=N, out_rows=R, relu=True)
    weight, bias = decoder.middle.weight, decoder.middle.bias
    nbytes = 2 * y1.numel() * 2
    for cfg in [None] + CONFIGS["band"]:
        bc.OVERRIDE.clear()
        bc.OVERRIDE.update(cfg or {})
        P = bc.positions_per_block(decoder.width, decoder.splits)
        band = tile if cfg is None else bc.band_tile(weight.float(), P).to(y1.dtype)
        try:
            out = bc.band_conv(y1, weight, bias, relu=True, tile=band)
            t = ms(lambda band=band: bc.band_conv(y1, weight, bias, relu=True, tile=band))
        except Exception as error:  # noqa: BLE001  (a config past the device's resources)
            print(f"band {cfg}: failed ({type(error).__name__}: {str(error)[:80]})", flush=True)
            continue
        diff = float((out.float() - y2.float()).norm() / y2.float().norm())
        label = f"new: band {'default' if cfg is None else cfg}"
        rows[label] = t
        swept.append({"step": "band", "config": cfg, "ms": t, "rel_diff_vs_gemm": diff})
        print(f"{label:80s} {t:8.3f} ms  floor {nbytes / bandwidth * 1e3:6.3f} ms  vs GEMM {diff:.1e}", flush=True)
    bc.OVERRIDE.clear()


if __name__ == "__main__":
    main()
