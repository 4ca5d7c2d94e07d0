"""SEA's non-causal decoder head at inference over the row-window GEMMs' map (N = 65,536, B·H = 16, T = 128,
bf16 maps, the histogram residual on): the banded kernel (the conv as tap GEMMs over the flattened map rows,
the default since run 18) against the direct one (36 shifted tiles an output row), each writing the maps
and in its lean form (argmax and column sums only), and the banded kernel's (BM, BK, BD, warps, stages)
configs in the lean form. Prints a table; writes ``sea_head_tune.json`` to --out. (Run 17 also timed the head
as dense GEMMs with the resize folded in: 2.4–5.4 ms, ``benchmarks/results/h100/run17/call3/head_tune.log``.)

    PYTHONPATH=src python benchmarks/sea_head_tune.py [--seq 65536] [--out DIR] [--configs]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--configs", action="store_true", help="also sweep the banded kernel's launch configs")
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

    def timed(name, fn, **extra):
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as error:  # noqa: BLE001  (out of resources: report and go on)
            print(f"{name:60s} {type(error).__name__}", flush=True)
            return
        rows.append({"name": name, "ms": ms, **extra})
        print(f"{name:60s} {ms:8.3f} ms", flush=True)

    def with_override(override, fn):
        def run():
            head.OVERRIDE.clear()
            head.OVERRIDE.update(override)
            try:
                return fn()
            finally:
                head.OVERRIDE.clear()
        return run

    with torch.no_grad():
        y = decoder._row_gemm_map(e)
        view = decoder._head_view(y, n)
        h, weights = decoder._head_histogram(hist, n_valid)
        interp = interpolation_matrix(decoder.width, T, dtype=y.dtype, device=y.device)
        common = dict(rows=n, histogram=h, hist_weights=weights, heads=16)
        w, b = decoder.out.weight, decoder.out.bias
        lean = lambda: head.fast_decoder_head_best(view, w, b, interp, **common)  # noqa: E731
        full = lambda: head.fast_decoder_head(view, w, b, interp, **common)  # noqa: E731
        direct = {"kernel": "direct"}
        banded_full, direct_full = full(), with_override(direct, full)()
        best, sums = lean()
        agreement = {
            "banded_vs_direct_argmax": (banded_full[2] == direct_full[2]).float().mean().item(),
            "banded_vs_direct_probs_rel": ((banded_full[1] - direct_full[1]).norm() / direct_full[1].norm()).item(),
            "lean_vs_full_argmax": (best == banded_full[2]).float().mean().item(),
            "lean_vs_full_sums_rel": ((sums - banded_full[1].sum(1)).norm() / sums.norm()).item(),
        }
        del banded_full, direct_full
        print("agreement:", json.dumps(agreement), flush=True)
        timed("direct head with maps", with_override(direct, full))
        timed("direct lean head", with_override(direct, lean))
        timed("banded head with maps", full)
        timed("banded lean head (default config)", lean)
        if args.configs:
            configs = [(bm, 64, 32, warps, stages) for bm, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3))
                       if not (bm == 128 and warps == 4)] + [(64, 32, 32, 8, 2), (64, 32, 32, 8, 3)]
            for bm, bk, bd, warps, stages in configs:
                cfg = {"BM": bm, "BK": bk, "BD": bd, "num_warps": warps, "num_stages": stages}
                timed(f"banded lean BM={bm} BK={bk} BD={bd} warps={warps} stages={stages}",
                      with_override(cfg, lean), config=cfg)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": n, "columns": T,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **agreement}
        (args.out / "sea_head_tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
