"""Where one distillation step's time goes on the GPU: host (CPU) against device (CUDA kernels).

A SmolLM2-135M-shaped Llama (30 layers, 9 query / 3 key-value heads, hidden 576; random weights: the
step's cost does not depend on them, and no model file is needed) distilled into each student
(softmax, sea k=64) at batch × seq tokens: wall seconds per step (median of a few, after warm-up),
then one step under torch.profiler: summed CPU self time of aten ops and their count, summed CUDA
kernel time, and the top CUDA ops. Each student runs its steps eagerly and replayed from a CUDA graph
(``DistillConfig.cuda_graph``), side by side (``--cuda-graph off|on|both``). Prints a table and writes
``distill_step_profile.json``.

    python benchmarks/distill_step_profile.py --out DIR [--batch 2] [--seq 1024] [--steps 5] \
        [--methods softmax,sea] [--option sea.columns=256 --option sea.half_estimate=False] [--cuda-graph both]

Run it as the distillation runs do (``APPROXATTN_DISABLE_KERNELS=1``: the students' PyTorch paths)
or without, to see what the Triton kernels change.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from approxattn.distill import DistillConfig, Distiller
from approxattn.distill.cli import parse_method_options


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def smollm2_shaped(layers: int, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device).eval().requires_grad_(False)


def profile_student(teacher, method: str, options: dict, batch: int, seq: int, steps: int, device: str,
                    cuda_graph: bool) -> dict:
    distiller = Distiller(teacher, DistillConfig(method=method, options=options, batch_size=batch, seq_len=seq,
                                                 cuda_graph=cuda_graph))
    ids = torch.randint(0, 49152, (batch, seq), device=device)
    for _ in range(distiller.settling_steps + 1):
        distiller.step(ids)                         # warm-up: allocations, cuDNN/cuBLAS choices, the capture
    sync(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        distiller.step(ids)                         # its loss floats wait for the device
        sync(device)
        seconds.append(time.perf_counter() - start)
    sync_sites: dict[str, int] = {}
    if device == "cuda" and not cuda_graph:   # what would stop a capture: host syncs in losses + backward
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distiller.losses(ids)["total"].backward()
        torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                site = f"{w.filename}:{w.lineno}"
                sync_sites[site] = sync_sites.get(site, 0) + 1
        distiller.optimizer.zero_grad(set_to_none=True)
        sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        distiller.step(ids)
        sync(device)
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    device_ops = sorted(events, key=lambda e: -e.self_device_time_total)
    result = {
        "method": method, "options": options, "cuda_graph": cuda_graph, "graph_replays": distiller.graph_replays,
        "graph_off": distiller.graph_off, "host_syncs": sync_sites, "step_s": statistics.median(seconds), "steps_s": seconds,
        "aten_calls": sum(e.count for e in aten),
        "aten_cpu_self_s": sum(e.self_cpu_time_total for e in aten) / 1e6,
        "cuda_kernel_s": sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6,
        "top_cuda_ops": [(e.key[:90], e.self_device_time_total / 1e3, e.count) for e in device_ops[:40]],
        # user ranges (record_function labels such as sea.select): their device time includes their children
        "ranges": sorted(((e.key, e.device_time_total / 1e3, e.cpu_time_total / 1e3, e.count) for e in events
                          if "." in e.key and not e.key.startswith(("aten::", "cuda", "Optimizer", "void", "Memcpy"))),
                         key=lambda r: -r[1])[:30],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    del distiller
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="softmax,sea")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--cuda-graph", choices=("off", "on", "both"), default="both",
                        help="steps eager, replayed from a CUDA graph, or both side by side (default)")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                        help="a student option, as the distill CLI takes it (default sea.k=64)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    teacher = smollm2_shaped(args.layers, args.device)
    methods = args.methods.split(",")
    options_of = parse_method_options(args.option, methods)   # Python literals, as the distill CLI reads them
    if "sea" in options_of:
        options_of["sea"] = {"k": 64} | options_of["sea"]
    results = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graph]
    for (method, options), graphed in itertools.product(options_of.items(), modes):
        r = profile_student(teacher, method, options, args.batch, args.seq, args.steps, args.device, graphed)
        results.append(r)
        mode = f"graph ({r['graph_replays']} replays)" if r["graph_replays"] else \
            f"eager{'' if not graphed else ' (graph off: ' + r['graph_off'] + ')'}"
        print(f"{method} {mode}: step {r['step_s']:.3f} s wall | aten calls {r['aten_calls']}, CPU self {r['aten_cpu_self_s']:.3f} s"
              f" | CUDA kernels {r['cuda_kernel_s']:.3f} s | peak {r['peak_gib'] or 0:.1f} GiB", flush=True)
        if not graphed:
            print(f"  host syncs in one eager step's losses and backward: {sum(r['host_syncs'].values())}",
                  *(f"    {c} x {site}" for site, c in r["host_syncs"].items()), sep="\n", flush=True)
        for name, ms, count in r["top_cuda_ops"]:
            print(f"    {ms:9.2f} ms  x{count:<5d} {name}", flush=True)
        print("  ranges (device ms incl. children, CPU ms, count):", flush=True)
        for name, dev_ms, cpu_ms, count in r["ranges"]:
            print(f"    {dev_ms:9.2f} {cpu_ms:9.2f}  x{count:<5d} {name}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "batch": args.batch, "seq": args.seq,
            "layers": args.layers, "cudnn_benchmark": args.cudnn_benchmark, "kernels_disabled": os.environ.get("APPROXATTN_DISABLE_KERNELS") == "1"}
    (args.out / "distill_step_profile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
