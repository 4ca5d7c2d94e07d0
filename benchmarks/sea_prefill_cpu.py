"""Cost of building SEA's decoding state for cached generation, on the CPU (2 threads).

Times (median of 5, after one warm-up) a 2-layer tiny Llama patched with SEA on a prompt of N
tokens: the forward alone, the forward inside ``approxattn.hf.cached_decoding`` (which also runs
``SEAAttention.prefill`` in every layer), and one cached decoding step; and, for one SEA module
at that layer's shape, ``prefill`` against N ``decode_step`` calls (the state built by stepping).
Usage: .venv/bin/python benchmarks/sea_prefill_cpu.py [N] [OUT_JSON]
"""

import json
import platform
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import approxattn
import approxattn.hf as hf

N = int(sys.argv[1]) if len(sys.argv) > 1 else 120
OUT = sys.argv[2] if len(sys.argv) > 2 else None
torch.set_num_threads(2)
torch.manual_seed(0)


def median_ms(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * N)
options = approxattn.get_method("sea").example_options(N + 16)
model = hf.patch_model(LlamaForCausalLM(config).eval(), "sea", **options)
ids = torch.randint(1, 97, (1, N))
results = {"prompt_tokens": N, "layers": 2, "options": options, "device": platform.processor() or platform.machine(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
           "command": "python benchmarks/sea_prefill_cpu.py " + " ".join(sys.argv[1:])}
with torch.no_grad():
    results["forward_ms"] = median_ms(lambda: model(ids, use_cache=True))
    with hf.cached_decoding(model):
        results["forward_with_prefill_ms"] = median_ms(lambda: model(ids, use_cache=True))
        steps = []
        for _ in range(6):  # each step needs a fresh prompt (its cache and state move on); the first warms up
            prompt = model(ids, use_cache=True)
            nxt = prompt.logits[:, -1:].argmax(-1)
            begin = time.perf_counter()
            model(nxt, past_key_values=prompt.past_key_values, use_cache=True)
            steps.append((time.perf_counter() - begin) * 1e3)
        results["cached_step_ms"] = statistics.median(steps[1:])

    sea = approxattn.build("sea", head_dim=16, **options).eval()
    q, k, v = torch.randn(1, 4, N, 16), torch.randn(1, 2, N, 16), torch.randn(1, 2, N, 16)

    def stepped():
        state = sea.decoding_state(batch=1, heads=4, kv_heads=2, value_dim=16)
        for t in range(N):
            sea.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)

    results["module_prefill_ms"] = median_ms(lambda: sea.prefill(q, k, v))
    results["module_stepped_ms"] = median_ms(stepped)
print(json.dumps(results, indent=1))
if OUT:
    with open(OUT, "w") as handle:
        json.dump(results, handle, indent=1)
