"""``approxattn bench``: timing, memory and roofline of the attention methods and their peers.

``python -m approxattn.bench run --preset headline --out benchmarks/results`` sweeps sequence
lengths for our fused kernels, our PyTorch reference paths, SDPA (FlashAttention backend; from
N=16K also cuDNN and torch's default dispatch), FlexAttention, fla's ``chunk_linear_attn`` and
performer-pytorch's ``FastAttention``, and writes ``results.json``, a markdown table and PNG plots.
``report`` redraws them from JSON.
"""

from .cli import add_commands, main

__all__ = ["add_commands", "main"]
