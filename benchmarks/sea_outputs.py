"""Save one ``sea`` forward's output and selection (fixed seed and inputs) to compare two source trees.

    PYTHONPATH=.ab_old/src python benchmarks/sea_outputs.py save /tmp/old.pt --seq 4096,65536
    PYTHONPATH=src python benchmarks/sea_outputs.py save /tmp/new.pt --seq 4096,65536
    python benchmarks/sea_outputs.py compare /tmp/old.pt /tmp/new.pt

B=1, H=16, d=64, bf16 on CUDA, eval, no grad, default options; non-causal and causal. ``compare``
prints, per (N, causal), the output's relative difference ‖new − old‖ / ‖old‖ and the fraction of
selected cells that differ (a flipped cell swaps a whole column of keys for its row).
"""

from __future__ import annotations

import argparse

import torch


def save(path: str, seqs: list[int]) -> None:
    import approxattn

    module = approxattn.build("sea", head_dim=64).cuda().eval()
    results = {}
    for n in seqs:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        for causal in (False, True):
            with torch.no_grad():
                result = module.forward_with_details(q, k, v, causal=causal)
            results[(n, causal)] = (result.output.float().cpu(), result.selected.cpu())
    torch.save(results, path)


def compare(old_path: str, new_path: str) -> None:
    old, new = torch.load(old_path), torch.load(new_path)
    for key in old:
        (out_a, sel_a), (out_b, sel_b) = old[key], new[key]
        rel = ((out_b - out_a).norm() / out_a.norm()).item()
        flips = (sel_a != sel_b).float().mean().item()
        print(f"N={key[0]} causal={key[1]}: output rel diff {rel:.2e}, selected cells differing {flips:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--seq", default="4096,65536")
    args = parser.parse_args()
    if args.action == "save":
        save(args.paths[0], [int(s) for s in args.seq.split(",")])
    else:
        compare(*args.paths)
