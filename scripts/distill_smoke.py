#!/usr/bin/env python3
"""Quick check of approxattn.hf + approxattn.distill on the current device (GPU or CPU).

A tiny random Llama (GQA 4/2): the patched model with method softmax matches the unpatched one,
then a few bf16 distillation steps of every method named on the command line, with timings.
Usage: python scripts/distill_smoke.py [sea performer linear]
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import approxattn.hf as hf
from approxattn.distill import DistillConfig, distill, perplexity

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
methods = sys.argv[1:] or ["sea", "performer", "linear"]
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)
torch.manual_seed(0)
teacher = LlamaForCausalLM(cfg).to(device).eval().requires_grad_(False)
ids = torch.randint(0, 512, (2, 256), device=device)
mask = torch.ones_like(ids)
mask[1, :17] = 0
reference = teacher(ids, attention_mask=mask).logits
student = hf.patch_model(__import__("copy").deepcopy(teacher), "softmax")
patched = student(ids, attention_mask=mask).logits
keep = mask.bool()
err = float((patched - reference)[keep].norm() / reference[keep].norm())
print(f"{device}: patched softmax vs unpatched logits rel err {err:.2e}")
assert err < 1e-4, err
tokens = torch.randint(0, 512, (20000,))
for method in methods:
    options = {"sea": {"k": 64, "columns": 128}, "performer": {"num_features": 256}}.get(method, {})
    start = time.perf_counter()
    d = distill(teacher, tokens, DistillConfig(method=method, options=options, steps=4, seq_len=1024, precision="bf16"))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ppl = perplexity(d.student, tokens, seq_len=1024, max_windows=2)["ppl"]
    first, last = d.history[0], d.history[-1]
    print(f"{method}: 4 steps {seconds:.2f} s, loss {first['total']:.4f} -> {last['total']:.4f}, "
          f"terms {sorted(k for k in last if k not in ('step', 'grad_norm'))}, ppl {ppl:.1f}")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
print("smoke ok")
