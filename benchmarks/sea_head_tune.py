"""SEA's non-causal decoder head at inference over the row-window GEMMs' map (N = 65,536, B·H = 16, T = 128,
bf16 maps, the histogram residual on): the head kernel writing logits and probabilities against its lean form
(argmax and column sums only), its configs in the lean form (BR, num_warps, SPLIT_DOTS, PAIRED, maxnreg), and the
TF32 and split dots' and the paired kernel's column sums and argmax against the fp64 twin. Prints a table; writes
``sea_head_tune.json`` to --out. (Run 17 also timed the head as GEMMs over the map, since removed: 2.4–5.4 ms
against 1.65, ``benchmarks/results/h100/run17/call3/head_tune.log``; run 18 a banded kernel, the conv as three
tap GEMMs over the flattened map rows, since removed: 1.774 ms lean against 1.651,
``benchmarks/results/h100/run18/call1d/head_tune.log``.)

    PYTHONPATH=src python benchmarks/sea_head_tune.py [--seq 65536] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton.testing

from approxattn.blocks.sea_estimator import NonCausalDecoder, interpolation_matrix
from approxattn.kernels import sea_decoder_head as head


# the paired kernel first, since the census gives it the lowest floors and a call's time limit may cut the sweep
# (BR counts pairs of rows), at the configs the CPU census found spill-free: 16 rows at 8 warps capped to 80
# registers (3 CTAs an SM), 32 rows at 8 warps capped to 128 (2 CTAs), 16 rows at 4 warps (3 CTAs); uncapped and
# split forms beside them
CONFIGS = [{"PAIRED": 1, "BR": br, "num_warps": warps, **({"maxnreg": cap} if cap else {}), "SPLIT_DOTS": split}
            for br, warps, cap, split in ((8, 8, 80, 0), (8, 8, None, 0), (16, 8, 128, 0), (16, 8, None, 0),
                                          (8, 4, 128, 0), (8, 4, None, 0), (16, 8, 128, 1), (8, 4, 128, 1))]
# (BR, warps) with the TF32 dots and with SPLIT_DOTS (half dots over hi + lo splits: half the shared memory);
# maxnreg 64 lets an SM hold 4 CTAs of 8 warps instead of 3 (the CPU census: 4 / 12 spill bytes split, none TF32)
CONFIGS += [{"BR": br, "num_warps": warps, "SPLIT_DOTS": split}
           for split, br, warps in itertools.product((0, 1), (16, 32), (4, 8))]
CONFIGS += [{"BR": 16, "num_warps": 8, "SPLIT_DOTS": split, "maxnreg": 64} for split in (0, 1)]
CONFIGS += [{"BR": 64, "num_warps": 8, "SPLIT_DOTS": 1}]
# around run 19's winner (now the default: paired, split, 16 pairs, 8 warps, ≤ 128 registers): uncapped, other caps,
# 4 and 16 warps, 32 pairs (`--near` sweeps these alone)
NEAR = [{"PAIRED": 1, "SPLIT_DOTS": 1, "BR": br, "num_warps": warps, **({"maxnreg": cap} if cap else {})}
        for br, warps, cap in ((16, 8, None), (16, 8, 96), (16, 8, 168), (16, 4, 128), (32, 8, 128), (32, 16, None),
                               (8, 8, 128))]
CONFIGS += NEAR


def full(config: dict) -> dict:
    """A swept config with every option the kernel's defaults would otherwise fill (direct, TF32 dots, no register
    cap), so that it times what its name says whatever the defaults are."""
    return {"PAIRED": 0, "SPLIT_DOTS": 0, "maxnreg": None, **config}


def _precision(view, decoder, interp, common) -> dict[str, dict[str, float]]:
    """The lean head's column sums and argmax against the fp64 twin: TF32 or split dots, direct or paired."""
    best_ref, sums_ref = head.decoder_head_best_reference(view.double(), decoder.out.weight.to(view.dtype),
                                                          decoder.out.bias.to(view.dtype), interp.double(),
                                                          **{**common, "histogram": common["histogram"].double()})
    found = {}
    for name, config in (("tf32", {"PAIRED": 0, "SPLIT_DOTS": 0}), ("split", {"PAIRED": 0, "SPLIT_DOTS": 1}),
                         ("paired", {"PAIRED": 1, "SPLIT_DOTS": 0}), ("paired split", {"PAIRED": 1, "SPLIT_DOTS": 1})):
        head.OVERRIDE.clear()
        head.OVERRIDE.update(config)
        best, sums = head.fast_decoder_head_best(view, decoder.out.weight, decoder.out.bias, interp, **common)
        found[name] = {"sums_rel_err": float((sums.double() - sums_ref).norm() / sums_ref.norm()),
                       "argmax_agree": float((best == best_ref).float().mean())}
        print(f"{name} against the fp64 twin: {found[name]}", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--near", action="store_true", help="only the configs around the default (NEAR)")
    args = parser.parse_args()
    n, T = args.seq, 128
    torch.manual_seed(0)
    decoder = NonCausalDecoder(64, T, None, zero_last=True).cuda().eval()
    with torch.no_grad():
        for parameter in decoder.out.parameters():
            parameter.normal_(std=0.3)
    e = torch.randn(1, 16, n, 128, device="cuda").to(torch.bfloat16)
    hist = torch.rand(1, 16, n, 128, device="cuda").to(torch.bfloat16)[..., :64]
    n_valid = torch.tensor([n], device="cuda")
    rows = []

    def timed(name, fn, config=None):
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append({"name": name, "ms": ms, "config": config})
        print(f"{name:60s} {ms:8.3f} ms", flush=True)

    with torch.no_grad():
        y = decoder._row_gemm_map(e)
        view = decoder._head_view(y, n)
        h, weights = decoder._head_histogram(hist, n_valid)
        interp = interpolation_matrix(decoder.width, T, dtype=y.dtype, device=y.device)
        common = dict(rows=n, histogram=h, hist_weights=weights, heads=16)
        lean = lambda: head.fast_decoder_head_best(view, decoder.out.weight, decoder.out.bias, interp, **common)  # noqa: E731
        full = head.fast_decoder_head(view, decoder.out.weight, decoder.out.bias, interp, **common)
        best, sums = lean()
        agree = (best == full[2]).float().mean().item()
        sums_diff = ((sums - full[1].sum(1)).norm() / sums.norm()).item()
        print(f"lean vs full head: argmax agree {agree:.5f}, column sums rel diff {sums_diff:.2e}", flush=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": n, "columns": T,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argmax_agree": agree,
                "sums_rel_diff": sums_diff}
        # precision first and the file rewritten after every row: a call's time limit can cut the sweep
        # (each config compiles), and what was measured must survive it
        meta["precision"] = _precision(view, decoder, interp, common)
        head.OVERRIDE.clear()
        save = lambda: _save(args.out, meta, rows)  # noqa: E731
        timed("head with maps (logits + probs)",
              lambda: head.fast_decoder_head(view, decoder.out.weight, decoder.out.bias, interp, **common))
        timed("lean head (argmax + column sums)", lean)   # the default: paired, split dots, 16 pairs, 8 warps
        save()
        for config in NEAR if args.near else CONFIGS:
            complete = full(config)
            head.OVERRIDE.clear()
            head.OVERRIDE.update(complete)
            name = "lean head " + " ".join(f"{k}={v}" for k, v in config.items())
            try:
                timed(name, lean, config=complete)
            except Exception as error:  # noqa: BLE001  (out of resources: report and go on)
                print(f"{name}: {type(error).__name__}", flush=True)
            save()
        head.OVERRIDE.clear()


def _save(out: Path | None, meta: dict, rows: list[dict]) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sea_head_tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
