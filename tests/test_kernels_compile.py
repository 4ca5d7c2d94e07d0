"""Every Triton kernel launch of representative calls compiles for an H100 (sm_90) with Triton's real compiler.

The CPU tests run the kernels under the interpreter, which executes them as Python: code the compiler
rejects can pass there and fail only on a GPU (a negative control, a runtime branch binding an int in one
arm and a tensor in the other, passed the interpreter tests and failed here). This records the launches
of kernel attention (elu+1, FAVOR+ with one and four feature blocks, ReLU; causal and not; FLuRKA with a
key mask; bf16 and fp32 under autograd), Linformer's sequence projection, and SEA's forward (bf16
inference, causal and not, and fp32 training), and compiles each in a process without the interpreter
(``sm90_compile.py``) at the interpreter's block sizes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import sm90_compile
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


def _kernel_attention_calls(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[0, 28:] = False
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(1, 2, 32, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        for method, options, causal, key_mask in (
                ("linear", {}, False, None), ("linear", {}, True, None),
                ("performer", {"num_features": 256}, False, None), ("performer", {"num_features": 256}, True, None),
                ("performer", {"num_features": 64, "kernel": "relu"}, True, None),
                ("flurka-linear", {"rank": 8}, False, mask), ("flurka-performer", {"rank": 8}, False, mask),
                ("linformer", {"rank": 8}, False, None)):
            module = approxattn.build(method, head_dim=64, **options)
            module(q, k, v, causal=causal, key_padding_mask=key_mask).float().sum().backward()
    # the segment scan's other dq (the loop above ran the default, exact): APPROXATTN_CAUSAL_DQ=fast, bf16 only
    from approxattn.kernels import causal_linear_attn

    monkeypatch.setattr(causal_linear_attn, "CAUSAL_DQ", "fast")
    monkeypatch.setattr(causal_linear_attn, "_PLANS", causal_linear_attn.PlanCache())
    q, k, v = (torch.randn(1, 2, 32, 64, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    approxattn.build("linear", head_dim=64)(q, k, v, causal=True).float().sum().backward()


def _sea_calls():
    gen = torch.Generator().manual_seed(1)
    for dtype, grad in ((torch.bfloat16, False), (torch.float32, True)):
        q, k, v = (torch.randn(1, 4, 48, 16, generator=gen).to(dtype) for _ in range(3))
        for causal in (False, True):
            sea = approxattn.build("sea", head_dim=16, k=4, columns=8, num_features=16)
            sea.train(grad)
            with torch.set_grad_enabled(grad):
                out = sea(*(t.clone().requires_grad_(grad) for t in (q, k, v)), causal=causal)
                if grad:
                    out.sum().backward()
                else:   # the maps' head (forward above took the lean head on these one-cell rows)
                    sea.forward_with_details(q, k, v, causal=causal)
    # the head's other forms (the default is paired with split dots): direct or paired, TF32 or split dots
    from approxattn.kernels import sea_decoder_head

    for options in ({"PAIRED": 0, "SPLIT_DOTS": 0}, {"PAIRED": 0, "SPLIT_DOTS": 1}, {"PAIRED": 1, "SPLIT_DOTS": 0}):
        sea_decoder_head.OVERRIDE.update(options)
        try:
            with torch.no_grad():
                approxattn.build("sea", head_dim=16, k=4, columns=8, num_features=16).eval()(
                    q.bfloat16(), k.bfloat16(), v.bfloat16())
        finally:
            sea_decoder_head.OVERRIDE.clear()


@pytest.mark.slow
def test_kernel_launches_compile_for_sm90(monkeypatch, tmp_path):
    monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    with sm90_compile.recording() as launches:
        _kernel_attention_calls(monkeypatch)
        _sea_calls()
    entries = list(launches.values())
    kernels = {e["kernel"] for e in entries}
    assert {"_state_fwd", "_out_fwd", "_q_bwd_fused", "_dstate_bwd", "_kv_bwd"} <= kernels, kernels
    assert {e["constexprs"]["NMB"] for e in entries if e["kernel"] == "_q_bwd_fused"} == {1, 4}
    assert {e["constexprs"].get("EXACT") for e in entries if e["kernel"] == "_causal_dq"} == {False, True}
    assert len(kernels) >= 15, sorted(kernels)  # SEA's own kernels among them (sparse step, convs, head, ...)
    # SEA's non-causal bf16 forward at k·T/N < 1.5: one cell a row (the lean head, one-column sparse step)
    assert {"_single_column_fwd", "_encoder_gates_fwd", "_augment_fwd", "_column_mask_fwd", "_band_conv_fwd",
            "_decoder_head_fwd"} <= kernels, sorted(kernels)
    assert {e["constexprs"].get("STORE_MAPS") for e in entries if e["kernel"] == "_decoder_head_fwd"} == {False, True}
    assert {e["constexprs"].get("SPLIT_DOTS") for e in entries if e["kernel"] == "_decoder_head_fwd"} == {False, True}
    assert {(e["constexprs"].get("PAIRED"), e["constexprs"].get("SPLIT_DOTS")) for e in entries
            if e["kernel"] == "_decoder_head_fwd"} >= {(False, False), (False, True), (True, False), (True, True)}
    (tmp_path / "launches.json").write_text(json.dumps(entries))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "APPROXATTN_FORCE_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    done = subprocess.run([sys.executable, sm90_compile.__file__, str(tmp_path / "launches.json")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and f"compiled {len(entries)} failed 0" in done.stdout, done.stdout + done.stderr[-3000:]
