"""Save one ``sea`` forward's output and selection (fixed seed and inputs) to compare two source trees.

    PYTHONPATH=.ab_old/src python benchmarks/sea_outputs.py save /tmp/old.pt --seq 4096,65536
    PYTHONPATH=src python benchmarks/sea_outputs.py save /tmp/new.pt --seq 4096,65536 [--option half_estimate=False]
    python benchmarks/sea_outputs.py compare /tmp/old.pt /tmp/new.pt

B=1, H=16, d=64, bf16 on CUDA, eval, no grad, default options (plus ``--option NAME=VALUE``, Python
literals); non-causal and causal. ``save`` also keeps each output's error against exact attention
(SDPA on the same inputs), ‖out − exact‖ / ‖exact‖. ``compare`` prints, per (N, causal), the output's
relative difference ‖new − old‖ / ‖old‖, the fraction of selected cells that differ (a flipped cell
swaps a whole column of keys for its row), and both trees' errors against exact attention (if the
selections differ by near-ties only, those two errors match).
"""

from __future__ import annotations

import argparse
import ast

import torch


def save(path: str, seqs: list[int], options: dict) -> None:
    import approxattn

    module = approxattn.build("sea", head_dim=64, **options).cuda().eval()
    results = {}
    for n in seqs:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        for causal in (False, True):
            with torch.no_grad():
                result = module.forward_with_details(q, k, v, causal=causal)
                exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
            error = ((result.output.float() - exact).norm() / exact.norm()).item()
            results[(n, causal)] = (result.output.float().cpu(), result.selected.cpu(), error)
    torch.save(results, path)


def compare(old_path: str, new_path: str) -> None:
    old, new = torch.load(old_path), torch.load(new_path)
    for key in old:
        (out_a, sel_a, *err_a), (out_b, sel_b, *err_b) = old[key], new[key]
        rel = ((out_b - out_a).norm() / out_a.norm()).item()
        flips = (sel_a != sel_b).float().mean().item()
        errors = ""
        if err_a and err_b:
            errors = f", error vs exact attention {err_a[0]:.4f} (old) / {err_b[0]:.4f} (new)"
        print(f"N={key[0]} causal={key[1]}: output rel diff {rel:.2e}, selected cells differing {flips:.2e}{errors}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--seq", default="4096,65536")
    parser.add_argument("--option", action="append", default=[], help="NAME=VALUE (a Python literal) for the module")
    args = parser.parse_args()
    if args.action == "save":
        options = {name: ast.literal_eval(value) for name, value in (o.split("=", 1) for o in args.option)}
        save(args.paths[0], [int(s) for s in args.seq.split(",")], options)
    else:
        compare(*args.paths)
