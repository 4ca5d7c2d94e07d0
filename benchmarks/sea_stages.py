"""Where a ``sea`` forward spends its time, stage by stage (probe, estimator, decoder, select,
sparse, gates), from a torch.profiler trace of the named ranges the module opens.

    PYTHONPATH=src python3 benchmarks/sea_stages.py --seq 16384,65536 [--out DIR] [--device cuda] [--ops]

B=1, H=16, d=64, bf16 on CUDA (fp32 on CPU), eval mode, no grad, default options. Prints, per
(N, causal): the wall-clock median of whole forwards (CUDA-synchronised) beside SDPA's (same
protocol, same inputs), the peak memory of one forward above the inputs (both), and the device
(or CPU) time of each stage and of the top ops; writes ``sea_stages.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import approxattn

STAGE_PREFIX = "sea."  # the module names its profiler ranges sea.<stage>


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_and_peak(fn, device: str, repeats: int) -> tuple[float, float | None]:
    """Median wall ms of ``fn()`` (synchronised) and its peak memory in MiB above what was allocated
    before (CUDA only)."""
    for _ in range(2):
        fn()
    walls = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        walls.append((time.perf_counter() - start) * 1e3)
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(walls), peak


def op_table(prof, use_device: bool, limit: int = 25) -> dict[str, list]:
    """Per stage, the ops called directly inside it (their kernels included), summed by (name, input
    shapes), most expensive first: ``{stage: [(ms, count, name, shapes), ...]}``."""
    table: dict[str, dict] = {}
    for event in prof.events():
        parent = event.cpu_parent
        if parent is None or not parent.name.startswith(STAGE_PREFIX) or event.name.startswith(STAGE_PREFIX):
            continue
        total = event.device_time_total if use_device else event.cpu_time_total
        shapes = str([s for s in (event.input_shapes or []) if s])[:100]
        entry = table.setdefault(parent.name, {}).setdefault((event.name, shapes), [0.0, 0])
        entry[0] += total / 1e3
        entry[1] += 1
    return {stage: sorted(([ms, n, name, shapes] for (name, shapes), (ms, n) in ops.items()), reverse=True)[:limit]
            for stage, ops in table.items()}


def stage_times(seq: int, causal: bool, device: str, options: dict, repeats: int = 5, ops: bool = False) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    module = approxattn.build("sea", head_dim=64, **options).to(device).eval()
    q, k, v = (torch.randn(1, 16, seq, 64, device=device, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        wall, peak = wall_and_peak(lambda: module(q, k, v, causal=causal), device, repeats)
        sdpa_wall, sdpa_peak = wall_and_peak(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), device, repeats)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities, record_shapes=ops) as prof:
            module(q, k, v, causal=causal)
            _sync(device)
    events = prof.key_averages()
    use_device = device == "cuda"

    def ms(event) -> float:
        total = event.device_time_total if use_device else event.cpu_time_total
        return total / 1e3

    stages = {}
    for event in events:
        if event.key.startswith(STAGE_PREFIX):
            # on CUDA a named range shows up twice (CPU annotation and GPU annotation): keep the max
            stages[event.key] = max(stages.get(event.key, 0.0), ms(event))
    ops = sorted((e for e in events if not e.key.startswith(STAGE_PREFIX)),
                 key=lambda e: -(e.self_device_time_total if use_device else e.self_cpu_time_total))
    top = [(e.key, (e.self_device_time_total if use_device else e.self_cpu_time_total) / 1e3, e.count)
           for e in ops[:15]]
    return {"seq": seq, "causal": causal, "wall_ms": wall, "peak_mib": peak, "sdpa_wall_ms": sdpa_wall,
            "sdpa_peak_mib": sdpa_peak, "stages_ms": stages, "top_ops": top,
            "stage_ops": op_table(prof, use_device) if ops else None}


def fused_agreement(seq: int, device: str) -> dict:
    """The fused path (Triton estimator on bf16 operands, Triton sparse step) against the PyTorch
    reference path (``APPROXATTN_DISABLE_KERNELS=1``) on the same bf16 inputs: relative error of
    the estimated attention and of the output, and the fraction of selected cells that differ."""
    import os

    module = approxattn.build("sea", head_dim=64).to(device).eval()
    q, k, v = (torch.randn(1, 16, seq, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    result = {}
    for causal in (False, True):
        with torch.no_grad():
            fused = module.forward_with_details(q, k, v, causal=causal)
            os.environ["APPROXATTN_DISABLE_KERNELS"] = "1"
            try:
                ref = module.forward_with_details(q, k, v, causal=causal)
            finally:
                del os.environ["APPROXATTN_DISABLE_KERNELS"]

        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm()).item()

        with torch.no_grad():   # the decoder's GEMMs on TF32 (the default for half inputs) against exact fp32
            os.environ["APPROXATTN_SEA_TF32"] = "0"
            try:
                exact = module.forward_with_details(q, k, v, causal=causal)
            finally:
                del os.environ["APPROXATTN_SEA_TF32"]
        result["causal" if causal else "noncausal"] = {
            "estimated_attention_rel_err": rel(fused.estimated_attention(), ref.estimated_attention()),
            "output_rel_err": rel(fused.output, ref.output),
            "selected_cells_differing": (fused.selected != ref.selected).float().mean().item(),
            "tf32_vs_fp32_estimated_attention_rel_err": rel(fused.estimated_attention(), exact.estimated_attention()),
            "tf32_vs_fp32_output_rel_err": rel(fused.output, exact.output),
            "tf32_vs_fp32_selected_cells_differing": (fused.selected != exact.selected).float().mean().item(),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="16384,65536")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--option", action="append", default=[], help="NAME=VALUE (int) for the sea module")
    parser.add_argument("--check", type=int, default=0, help="N for a fused-vs-reference agreement check first")
    parser.add_argument("--ops", action="store_true", help="also list each stage's ops with their input shapes")
    parser.add_argument("--repeats", type=int, default=5, help="synchronised forwards per wall-clock median")
    args = parser.parse_args()
    options = {name: int(value) for name, value in (o.split("=", 1) for o in args.option)}
    results = []
    agreement = None
    if args.check:
        agreement = fused_agreement(args.check, args.device)
        print(f"fused vs reference at N={args.check}: {json.dumps(agreement)}", flush=True)
    for seq in (int(s) for s in args.seq.split(",")):
        for causal in (False, True):
            try:
                r = stage_times(seq, causal, args.device, options, repeats=args.repeats, ops=args.ops)
            except Exception as error:  # noqa: BLE001  (report and go on to the next shape)
                print(f"N={seq} causal={causal}: failed: {type(error).__name__}: {error}", flush=True)
                results.append({"seq": seq, "causal": causal, "error": f"{type(error).__name__}: {error}"})
                continue
            results.append(r)
            stages = "  ".join(f"{k[4:]} {v:.2f}" for k, v in r["stages_ms"].items())
            memory = "" if r["peak_mib"] is None else f", peak {r['peak_mib']:.0f} MiB (SDPA {r['sdpa_peak_mib']:.0f})"
            print(f"N={seq} causal={causal}: wall {r['wall_ms']:.2f} ms (SDPA {r['sdpa_wall_ms']:.2f}){memory} | {stages}",
                  flush=True)
            for name, t, count in r["top_ops"]:
                print(f"    {t:9.3f} ms  x{count:<4d} {name[:90]}", flush=True)
            for stage, rows in (r["stage_ops"] or {}).items():
                print(f"  {stage}:", flush=True)
                for ms, count, name, shapes in rows:
                    print(f"    {ms:9.3f} ms  x{count:<3d} {name[:40]:40s} {shapes}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "options": options}
        (args.out / "sea_stages.json").write_text(json.dumps({"meta": meta, "agreement": agreement, "results": results}, indent=1))


if __name__ == "__main__":
    main()
