"""A static census of SEA's non-causal inference kernels as an H100 (sm_90) would run them, on the CPU.

For each kernel launch of SEA's bf16 forward at one cell a row (the launches of ``sea_registers.record``, GPU
launch configs, each compiled as the GPU's JIT specializes it): registers and spills (ptxas ``-v``), shared
memory, the CTAs an SM holds (registers, shared memory, warps), the machine instructions a warp issues
(``cuobjdump -sass``), its loops, and the programs launched at the target size (fitted from two recorded sizes,
``a + b·N`` programs, times heads / 2). For a kernel without loops every warp issues its whole program once, so

    issue floor = instructions a warp × warps × programs / (132 SMs × 4 schedulers × 1.755 GHz)

is a lower bound on its time from instruction issue alone (one instruction a scheduler a cycle; memory, tensor
cores and stalls come on top). A kernel far above its floor waits on latency or memory, one near it is bound by
its instruction count. Kernels with loops show their loop bodies' sizes instead (their trip counts are runtime).

    python benchmarks/sass_census.py [--seq 65536] [--heads 16] [--head-configs]   # ~1 (+3) minutes on 2 cores

The counts are the code generation of the Triton that runs it (the GPU machine has 3.6; for its counts on a CPU
machine with another, ``pip install --target .triton36 triton==3.6.0`` and run with ``PYTHONPATH=.triton36:src``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.755e9          # H100 SXM: SMs, warp schedulers an SM, boost clock
REGISTERS_PER_SM, SHARED_PER_SM, RESERVED_SHARED, MAX_WARPS, MAX_CTAS = 65536, 228 * 1024, 1024, 64, 32
RECORDED_SIZES, RECORDED_HEADS = (256, 512), 2
SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def record(n: int) -> list[dict]:
    """SEA's launches at sequence length n (two heads), with their grids; under the interpreter."""
    import sea_registers

    return sea_registers.record(n)


def sass(entry: dict, constexprs: dict | None = None,
         options: dict | None = None) -> tuple[list[tuple[int, str, str]], int, tuple[int, int, int]]:
    """The launch compiled for sm_90 (``constexprs`` / ``options`` over the recorded ones): its instructions as
    (address, opcode, operands), its shared memory in bytes, and (registers, spill store bytes, spill load bytes)
    a thread."""
    import triton
    from sm90_compile import compile_entry, compiled_usage

    compiled = compile_entry(entry, constexprs, options)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([str(tool), "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
    instructions = [(int(a, 16), op.split(".")[0], rest) for a, op, rest in SASS_LINE.findall(text)]
    return instructions, compiled.metadata.shared, compiled_usage(compiled)


def loop_bodies(instructions: list[tuple[int, str, str]]) -> list[int]:
    """The instruction count of each backward branch's body (a loop), outermost first."""
    bodies = []
    for address, op, rest in instructions:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            bodies.append(sum(start <= a <= address for a, _, _ in instructions))
    return sorted(bodies, reverse=True)


def resident_ctas(registers: int, shared: int, warps: int) -> int:
    """CTAs an SM holds: registers (allocated in 8s a thread), shared memory and warp slots."""
    by_registers = REGISTERS_PER_SM // (((registers + 7) // 8) * 8 * 32 * warps)
    by_shared = SHARED_PER_SM // (shared + RESERVED_SHARED)
    return max(0, min(by_registers, by_shared, MAX_WARPS // warps, MAX_CTAS))


def programs(entry: dict) -> int:
    return sum(g[0] * (g[1] if len(g) > 1 else 1) * (g[2] if len(g) > 2 else 1) for g in entry.get("grids", ()))


def census(small: list[dict], large: list[dict], seq: int, heads: int) -> list[dict]:
    """One row a kernel launch config: the static counts of ``large``'s entry, programs fitted to (seq, heads)."""
    (n1, n2), rows = RECORDED_SIZES, []
    paired = collections.defaultdict(list)
    for entry in small:
        paired[entry["kernel"]].append(entry)
    seen = collections.Counter()
    for entry in large:
        name = entry["kernel"]
        twin = paired[name][seen[name]] if seen[name] < len(paired[name]) else None
        seen[name] += 1
        instructions, shared, (registers, spill_stores, spill_loads) = sass(entry)
        warps = entry["options"].get("num_warps", 4)
        p2 = programs(entry)
        p1 = programs(twin) if twin else None
        target = None if p1 is None else round(((p1 + (p2 - p1) * (seq - n1) / (n2 - n1))) * heads / RECORDED_HEADS)
        loops = loop_bodies(instructions)
        issue = None if loops or target is None else len(instructions) * warps * target / (SMS * SCHEDULERS * CLOCK_HZ)
        mix = collections.Counter(op for _, op, _ in instructions)
        ctas = resident_ctas(registers, shared, warps)
        rows.append({
            "kernel": f"{entry['module'].rsplit('.', 1)[-1]}.{name}",
            "blocks": {k: v for k, v in entry["constexprs"].items() if k.startswith("B") and isinstance(v, int)},
            "warps": warps, "stages": entry["options"].get("num_stages", 2), "registers": registers,
            "spill_bytes": [spill_stores, spill_loads], "shared_kib": round(shared / 1024, 1),
            "ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "instructions_per_warp": len(instructions),
            "loop_bodies": loops, "programs": target,
            "issue_floor_ms": None if issue is None else round(issue * 1e3, 3),
            "tensor_core_instructions": mix["HMMA"] + mix["HGMMA"], "top_opcodes": dict(mix.most_common(8)),
        })
        print(f"{rows[-1]['kernel']}: {len(instructions)} instructions a warp", file=sys.stderr, flush=True)
    return rows


def head_configs(large: list[dict], rows: list[dict]) -> list[dict]:
    """The lean head at each config ``benchmarks/sea_head_tune.py`` sweeps (its CONFIGS: BR, warps, SPLIT_DOTS,
    PAIRED, maxnreg), compiled as the module would launch it; programs scaled from the recorded default's by the
    rows a program (BR, or 2·BR pairs' rows where PAIRED)."""
    import copy

    from sea_head_tune import CONFIGS

    entry = next(e for e in large if e["kernel"] == "_decoder_head_fwd" and not e["constexprs"].get("STORE_MAPS"))
    default = next(r for r in rows if r["kernel"].endswith("._decoder_head_fwd"))
    default_rows = entry["constexprs"]["BR"] * (2 if entry["constexprs"].get("PAIRED") else 1)
    found = []
    for config in CONFIGS:
        variant = copy.deepcopy(entry)
        # interp comes in y's dtype (bf16) where the dots are split, else in fp32
        variant["signature"]["r_ptr"] = "*bf16" if config.get("SPLIT_DOTS") else "*fp32"
        variant["options"].pop("maxnreg", None)     # the config's own cap, or none
        constexprs = {"BR": config["BR"], "SPLIT_DOTS": bool(config.get("SPLIT_DOTS")),
                      "PAIRED": bool(config.get("PAIRED"))}
        options = {k: config[k] for k in ("num_warps", "maxnreg") if k in config}
        instructions, shared, (registers, spill_stores, spill_loads) = sass(variant, constexprs, options)
        warps = config["num_warps"]
        program_rows = config["BR"] * (2 if config.get("PAIRED") else 1)
        target = default["programs"] * default_rows // program_rows
        ctas = resident_ctas(registers, shared, warps)
        found.append({"config": config, "rows_a_program": program_rows, "registers": registers,
                      "spill_bytes": [spill_stores, spill_loads], "shared_kib": round(shared / 1024, 1),
                      "ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "instructions_per_warp": len(instructions),
                      "programs": target,
                      "issue_floor_ms": round(len(instructions) * warps * target / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3, 3)})
        print(f"head {config}: {len(instructions)} instructions a warp", file=sys.stderr, flush=True)
    return found


def print_head_table(found: list[dict]) -> None:
    print("| head config (sea_head_tune.CONFIGS) | rows a program | registers | spills (B) | shared KiB | "
          "CTAs/SM (warps) | instr./warp | issue floor ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in found:
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"| {config} | {r['rows_a_program']} | {r['registers']} | {r['spill_bytes'][0]} / {r['spill_bytes'][1]} | "
              f"{r['shared_kib']} | {r['ctas_per_sm']} ({r['warps_per_sm']}) | {r['instructions_per_warp']} | "
              f"{r['issue_floor_ms']:.3f} |")


def print_table(rows: list[dict], seq: int, heads: int) -> None:
    print(f"| kernel | blocks | warps | registers | spills (B) | shared KiB | CTAs/SM (warps) | instr./warp "
          f"(tensor core) | loop bodies | programs at N={seq:,}, H={heads} | issue floor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        blocks = ", ".join(f"{k}={v}" for k, v in r["blocks"].items())
        loops = ", ".join(map(str, r["loop_bodies"])) or "none"
        floor = "—" if r["issue_floor_ms"] is None else f"{r['issue_floor_ms']:.3f}"
        print(f"| {r['kernel']} | {blocks} | {r['warps']} | {r['registers']} | {r['spill_bytes'][0]} / "
              f"{r['spill_bytes'][1]} | {r['shared_kib']} | {r['ctas_per_sm']} ({r['warps_per_sm']}) | "
              f"{r['instructions_per_warp']} ({r['tensor_core_instructions']}) | {loops} | {r['programs'] or '—'} | {floor} |")


def main() -> None:
    here = Path(__file__).resolve()
    sys.path[:0] = [str(here.parent), str(here.parents[1] / "tests")]
    from sm90_compile import launches_recorded_by

    recorded = launches_recorded_by(__file__, lambda: [record(n) for n in RECORDED_SIZES])
    if recorded is None:        # this was the interpreted child that recorded them
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--head-configs", action="store_true",
                        help="also the lean head at each config sea_head_tune.py sweeps")
    args = parser.parse_args()
    small, large = recorded
    rows = census(small, large, args.seq, args.heads)
    found = head_configs(large, rows) if args.head_configs else []
    import triton

    print(f"Triton {triton.__version__}, sm_90; SEA bf16 forward, one cell a row; programs fitted from N = "
          f"{RECORDED_SIZES[0]} and {RECORDED_SIZES[1]} at {RECORDED_HEADS} heads.\n")
    print_table(rows, args.seq, args.heads)
    if found:
        print()
        print_head_table(found)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "seq": args.seq, "heads": args.heads,
                                         "rows": rows, "head_configs": found}, indent=1))


if __name__ == "__main__":
    main()
