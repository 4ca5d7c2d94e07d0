"""SEA's sparse step with one column a row at N = 65,536 (B=1, H=16, d=64, bf16): the one-column kernel
against the general column-mask kernel on the same rows (smooth columns, like an estimate's), and a sweep of the
one-column kernel's launch configs. Prints a table and writes ``single_column_tune.json`` to --out.

    PYTHONPATH=src python benchmarks/single_column_tune.py --seq 65536 [--out DIR] [--configs]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton.testing

from approxattn.blocks.sparse_attention import column_layout
from approxattn.kernels import single_column_attention as sca
from approxattn.kernels.sparse_attention import fast_column_mask_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--columns", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--configs", action="store_true", help="sweep BM, BN, warps, stages")
    args = parser.parse_args()
    n, T = args.seq, args.columns
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 16, n, 64, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(3))
    layout = column_layout(1, n, n, T, causal=False, device="cuda")
    row_column = sca.smooth_columns(1, 16, n, T, generator=gen)
    one_hot = torch.nn.functional.one_hot(row_column, T).bool()
    mix = (torch.rand(1, 16, n, device="cuda"), torch.rand(1, 16, n, device="cuda"),
           torch.randn(1, 16, 1, 64, device="cuda"))
    rows = []

    def timed(name, fn):
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append({"name": name, "ms": ms})
        print(f"{name:60s} {ms:8.3f} ms", flush=True)
        return ms

    with torch.no_grad():
        general = fast_column_mask_attention(q, k, v, one_hot, layout, scale=0.125, mix=mix)
        single = sca.fast_single_column_attention(q, k, v, row_column, layout, scale=0.125, mix=mix)
        diff = ((single.float() - general.float()).norm() / general.float().norm()).item()
        print(f"one-column vs general kernel: relative difference {diff:.2e}", flush=True)
        timed("general column-mask kernel (runs + order + kernel)",
              lambda: fast_column_mask_attention(q, k, v, one_hot, layout, scale=0.125, mix=mix))
        timed("one-column kernel (tables + kernel)",
              lambda: sca.fast_single_column_attention(q, k, v, row_column, layout, scale=0.125, mix=mix))
        timed("one-column tables alone", lambda: sca.column_blocks(row_column, T, 64))
        if args.configs:
            for bm, bn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (1, 2, 3)):
                sca.OVERRIDE.clear()
                sca.OVERRIDE.update(BM=bm, BN=bn, num_warps=warps, num_stages=stages)
                try:
                    timed(f"one-column BM={bm} BN={bn} warps={warps} stages={stages}",
                          lambda: sca.fast_single_column_attention(q, k, v, row_column, layout, scale=0.125, mix=mix))
                except Exception as error:  # noqa: BLE001  (out of resources: report and go on)
                    print(f"BM={bm} BN={bn} warps={warps} stages={stages}: {type(error).__name__}", flush=True)
            sca.OVERRIDE.clear()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": n, "columns": T,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "difference": diff}
        (args.out / "single_column_tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
