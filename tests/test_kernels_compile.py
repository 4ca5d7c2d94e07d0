"""The non-causal kernel-attention launches compile for an H100 (sm_90) with Triton's real compiler.

The CPU tests run every kernel under the interpreter, which executes them as Python: code that the
compiler rejects can pass there and fail only on a GPU. This records the launches of representative
calls under the interpreter (bf16: elu+1 with one feature block, FAVOR+ with four, FLuRKA-linear with a
key mask) and compiles each for sm_90 in a process without the interpreter (``sm90_compile.py``),
at the H100 launch configs' block size along N.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import approxattn

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from triton.backends import backends

    return "nvidia" in backends


pytestmark = [
    pytest.mark.skipif(not INTERPRETED, reason="records launches under the interpreter (CPU machines)"),
    pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend (ptxas)"),
]


def _record_launches(monkeypatch) -> list[dict]:
    from approxattn.kernels import _launch

    entries: dict[str, dict] = {}
    first_launch = _launch.Launch._first_launch

    def record(self, pointers):
        fn = getattr(self.fn, "fn", self.fn)
        meta = {k: v for k, v in self.meta.items() if k not in ("num_warps", "num_stages")}
        if "BN" in meta:
            meta["BN"] = 64  # the interpreter's 16; the H100 configs use 64 or 128
        entry = {"module": fn.__module__, "kernel": fn.__name__,
                 "pointers": [str(p.dtype).removeprefix("torch.") for p in pointers],
                 "scalars": [type(c).__name__ for c in self.consts], "constexprs": meta}
        entries.setdefault(json.dumps(entry, sort_keys=True), entry)
        return first_launch(self, pointers)

    monkeypatch.setattr(_launch.Launch, "_first_launch", record)
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 64, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[0, 28:] = False
    for method, options, key_padding_mask in (("linear", {}, None), ("performer", {"num_features": 256}, None),
                                              ("flurka-linear", {"rank": 8}, mask)):
        module = approxattn.build(method, head_dim=64, **options)
        module(q, k, v, key_padding_mask=key_padding_mask).float().sum().backward()
    return list(entries.values())


@pytest.mark.slow
def test_kernel_attention_launches_compile_for_sm90(monkeypatch, tmp_path):
    entries = _record_launches(monkeypatch)
    kernels = {e["kernel"] for e in entries}
    assert {"_state_fwd", "_combine_parts", "_out_fwd", "_q_bwd_fused", "_dstate_bwd", "_kv_bwd"} <= kernels
    assert {e["constexprs"]["NMB"] for e in entries if e["kernel"] == "_q_bwd_fused"} == {1, 4}
    (tmp_path / "launches.json").write_text(json.dumps(entries))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "APPROXATTN_FORCE_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_compile.py")),
                           str(tmp_path / "launches.json")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and f"compiled {len(entries)} failed 0" in done.stdout, done.stdout + done.stderr[-3000:]
