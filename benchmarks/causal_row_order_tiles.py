"""KV tiles the causal sparse step visits: rows in index order against rows sorted by first key (CPU).

The prediction behind ``kernels.sparse_attention.rows_by_first_keys``: for B=1, H=16, T=128 and
64×64 tiles, the tiles of SEA-like smooth selections (``bench.sparse.sea_like_selection``, neighbouring
rows choose the same columns) and of one random column per row, built both ways, and what
``_cheaper_row_order`` keeps (per head, the fewer).

    python benchmarks/causal_row_order_tiles.py [--seq 16384,65536]
"""

from __future__ import annotations

import argparse
import os

import torch

from approxattn.bench.sparse import sea_like_selection
from approxattn.blocks.sparse_attention import column_layout
from approxattn.kernels.sparse_attention import (
    _cheaper_row_order,
    rows_by_first_keys,
    tile_runs,
    tile_runs_by_column_lengths,
)

H, T, BM, BN = 16, 128, 64, 64
# CPU tensors: the tensor-op run builder (the Triton one needs a GPU or the interpreter)
os.environ.setdefault("APPROXATTN_TRITON_TILE_RUNS", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="16384,65536")
    args = parser.parse_args()
    for n in (int(s) for s in args.seq.split(",")):
        layout = column_layout(1, n, n, T, causal=True)
        smooth, _ = sea_like_selection(1, H, n, T, 64, causal=True, seed=1, device="cpu")
        scattered = torch.zeros(1, H, n, T, dtype=torch.bool)
        scattered.scatter_(-1, torch.randint(0, T, (1, H, n, 1), generator=torch.Generator().manual_seed(0)), True)
        for name, selected in (("sea-like (smooth)", smooth), ("one random column per row", scattered)):
            index = tile_runs(selected, layout, BM, BN)[1].sum().item()
            order = rows_by_first_keys(selected, layout).long()
            ordered = selected.gather(2, order[..., None].expand_as(selected))
            length = layout.row_length[:, None, :].expand(1, H, n).gather(2, order)
            by_key = tile_runs_by_column_lengths(ordered, length, layout, BM, BN)[1].sum().item()
            kept = _cheaper_row_order(selected, layout, BM, BN)[2].sum().item()
            print(f"N={n:,} {name}: tiles in index order {index:,}, sorted by first key {by_key:,}, kept {kept:,} "
                  f"(dense causal {H * (n // BM) * (n // BM + 1) // 2:,})", flush=True)


if __name__ == "__main__":
    main()
