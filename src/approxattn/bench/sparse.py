"""SEA's sparse step in the bench: realistic compressed-column masks, the implementations, the ``sea`` preset.

The mask imitates what SEA's estimator + grouped top-k hand the sparse step (core_methods.md §2.4–2.5):
per query row a budget of ``round(H·k·T / L_i)`` cells (at least 1) over all heads' ``H × T``
compressed cells (SEA's ``causal_batch`` grouping, used here for both modes), so every row reads
about k keys per head on average; the cells are the top of a score field that is smooth along
the rows (one random draw per patch of 64 rows, plus a little per-row noise), so neighbouring
rows pick mostly the same columns, as SEA's CNN-decoded estimates do. Empty columns (L_i < T)
are never picked.

Implementations (``Case.impl``), all forward only:

- ``sparse-kernel``: :func:`approxattn.kernels.sparse_attention.fast_column_mask_attention`
  (tile runs built on every call + the Triton kernel);
- ``sparse-runs``: the tile-run construction alone (one Triton launch, or tensor ops with
  ``APPROXATTN_TRITON_TILE_RUNS=0``);
- ``sparse-flex``: FlexAttention (compiled) with a prebuilt ``BlockMask`` (mask build not timed);
- ``sparse-reference``: the PyTorch reference (gather path at these sizes).
"""

from __future__ import annotations

import torch

from ..blocks.sparse_attention import ColumnLayout, column_layout, column_mask_attention, nonempty_columns
from .case import Case

SPARSE_IMPLS = ("sparse-kernel", "sparse-runs", "sparse-flex", "sparse-reference")
ROWS_PER_PATCH = 64
ROW_CHUNK = 2048


def sea_like_selection(
    batch: int, heads: int, seq: int, columns: int, keys_per_row: float, *, causal: bool,
    key_padding_mask: torch.Tensor | None = None, seed: int = 0, device: str | torch.device = "cuda",
) -> tuple[torch.Tensor, ColumnLayout]:
    """``selected (B, H, N, T)`` bool and its layout, drawn like SEA's masks (see the module doc)."""
    layout = column_layout(batch, seq, seq, columns, causal=causal, key_padding_mask=key_padding_mask,
                           device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    patches = -(-seq // ROWS_PER_PATCH)
    coarse = torch.randn(batch, patches, heads * columns, generator=gen, device=device)
    selected = torch.empty(batch, seq, heads, columns, dtype=torch.bool, device=device)
    cells = heads * columns
    for start in range(0, seq, ROW_CHUNK):
        stop = min(seq, start + ROW_CHUNK)
        rows = torch.arange(start, stop, device=device)
        score = coarse[:, rows // ROWS_PER_PATCH] + 0.3 * torch.randn(batch, stop - start, cells, generator=gen,
                                                                     device=device)
        usable = nonempty_columns(ColumnLayout(layout.key_rank, layout.row_length[:, start:stop], columns))
        score = score.view(batch, stop - start, heads, columns).masked_fill(~usable[:, :, None], float("-inf"))
        length = layout.row_length[:, start:stop].clamp(min=1).double()
        budget = torch.round(heads * keys_per_row * columns / length).clamp(1, cells).long()      # (B, R)
        ordered = score.flatten(2).sort(dim=-1, descending=True).values
        threshold = torch.gather(ordered, 2, (budget - 1)[..., None])                            # (B, R, 1)
        selected[:, start:stop] = (score.flatten(2) >= threshold).view(batch, stop - start, heads, columns) \
            & (score > float("-inf"))
    return selected.permute(0, 2, 1, 3).contiguous(), layout


def build_sparse(case: Case, device: str = "cuda"):
    """``(run, make_inputs)`` for a sparse-step case (``case.options``: columns, keys_per_row)."""
    from ..kernels import sparse_attention as ks

    columns = case.options.get("columns", 256)
    keys = case.options.get("keys_per_row", 64)
    selected, layout = sea_like_selection(case.batch, case.heads, case.seq, columns, keys, causal=case.causal,
                                          device=device)
    scale = case.head_dim**-0.5

    def make(requires_grad, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        b, h, hk, n, d = case.batch, case.heads, case.kv, case.seq, case.head_dim

        def draw(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=case.torch_dtype)

        return draw(b, h, n, d), draw(b, hk, n, d), draw(b, hk, n, d), draw(b, h, n, d)

    if case.impl == "sparse-kernel":
        def run(q, k, v):
            out = ks.fast_column_mask_attention(q, k, v, selected, layout, scale=scale)
            if out is None:
                raise RuntimeError("the Triton kernel declined these inputs")
            return out
    elif case.impl == "sparse-runs":
        cfg = ks.launch_config(case.head_dim, case.head_dim)

        def run(q, k, v):
            return ks.build_tile_runs(selected, layout, cfg["BM"], cfg["BN"])
    elif case.impl == "sparse-flex":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = ks.flex_block_mask(selected, layout)

        def run(q, k, v):
            return ks.flex_column_mask_attention(q, k, v, selected, layout, scale=scale, block_mask=block_mask,
                                                 compiled=compiled)
    elif case.impl == "sparse-reference":
        def run(q, k, v):
            return column_mask_attention(q, k, v, selected, layout, scale=scale)
    else:
        raise ValueError(f"unknown sparse implementation {case.impl!r}; expected one of {SPARSE_IMPLS}")
    return run, make


SEA_SEQ = (4096, 8192, 16384, 32768, 65536)


def sea(seqs=SEA_SEQ) -> list[Case]:
    """SEA's sparse step (k = 64, T = 128/256) and the whole ``sea`` module beside SDPA, forward only."""
    import approxattn

    has_sea = "sea" in approxattn.available_methods()
    fwd = ("fwd",)
    cases: list[Case] = []
    for seq in seqs:
        for causal in (False, True):
            tag = " causal" if causal else ""
            cases.append(Case("sdpa", "SDPA flash" + tag, seq, causal, method="softmax", modes=fwd))
            for columns in (256, 128):
                opts = {"columns": columns, "keys_per_row": 64}
                cases.append(Case("sparse-kernel", f"sparse step T={columns} k=64 (Triton){tag}", seq, causal,
                                  options=opts, modes=fwd))
            opts = {"columns": 256, "keys_per_row": 64}
            cases.append(Case("sparse-runs", f"tile runs only T=256{tag}", seq, causal,
                              options=opts, modes=fwd))
            cases.append(Case("sparse-flex", f"sparse step T=256 k=64 (FlexAttention, mask prebuilt){tag}", seq,
                              causal, options=opts, modes=fwd))
            if seq <= 16384:
                cases.append(Case("sparse-reference", f"sparse step T=256 k=64 (PyTorch ref){tag}", seq, causal,
                                  options=opts, modes=fwd))
            if has_sea:
                cases.append(Case("fused", f"sea module (estimator + sparse), defaults{tag}", seq, causal,
                                  method="sea", modes=fwd))
                cases.append(Case("graphed", f"sea module, approxattn.graphed (CUDA graph replay){tag}", seq,
                                  causal, method="sea", modes=fwd))
    return cases
