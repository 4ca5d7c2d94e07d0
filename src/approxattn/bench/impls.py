"""What the harness times: our fused kernels and reference paths, and the peers.

A :class:`Case` names one implementation at one problem size. ``build(case)`` returns a
function ``run(q, k, v) -> out`` and a function making its inputs ``(q, k, v, do)`` in the
layout it takes: ``[B, H, N, d]`` for everything except fla (``[B, N, H, K]``, its own).
Peers are imported lazily; a missing one is reported, not fatal.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from .case import IMPLS, Case


@contextlib.contextmanager
def _kernels_disabled():
    old = os.environ.get("APPROXATTN_DISABLE_KERNELS")
    os.environ["APPROXATTN_DISABLE_KERNELS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["APPROXATTN_DISABLE_KERNELS"]
        else:
            os.environ["APPROXATTN_DISABLE_KERNELS"] = old


def _standard_inputs(case: Case, device: str, requires_grad: bool, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    b, h, hk, n, d = case.batch, case.heads, case.kv, case.seq, case.head_dim

    def draw(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=case.torch_dtype).requires_grad_(requires_grad)

    return draw(b, h, n, d), draw(b, hk, n, d), draw(b, hk, n, d), torch.randn(
        b, h, n, d, generator=gen, device=device, dtype=case.torch_dtype)


def build(case: Case, device: str = "cuda") -> tuple[Callable, Callable[[bool, int], tuple]]:
    """``(run, make_inputs)`` for one case; raises ImportError when a peer is missing."""
    make = lambda requires_grad, seed: _standard_inputs(case, device, requires_grad, seed)  # noqa: E731

    if case.impl.startswith("sparse-"):
        from .sparse import build_sparse

        return build_sparse(case, device)

    if case.impl in ("fused", "reference", "graphed"):
        import approxattn

        options = dict(case.options)
        if "max_len" in approxattn.get_method(case.method).defaults:
            options.setdefault("max_len", case.seq)
        module = approxattn.build(case.method, head_dim=case.head_dim, **options).to(device).eval()
        scale = None if not approxattn.get_method(case.method).uses_scale else case.head_dim**-0.5

        if case.impl == "fused":
            def run(q, k, v):
                return module(q, k, v, causal=case.causal, scale=scale)
        elif case.impl == "graphed":  # approxattn.graphed: inference replayed from CUDA graphs (fwd only)
            fast = approxattn.graphed(module, max_graphs=16)

            def run(q, k, v):
                return fast(q, k, v, causal=case.causal, scale=scale)
        else:
            def run(q, k, v):
                with _kernels_disabled():
                    return module(q, k, v, causal=case.causal, scale=scale)
        return run, make

    if case.impl == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        # "default" is no forcing at all: whatever torch's dispatcher picks, i.e. what a user of SDPA gets
        backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}
        name = case.options.get("backend", "flash")
        if name not in backends:
            raise ValueError(f"sdpa option backend must be one of {tuple(backends)}, got {name!r}")
        backend = backends[name]

        def run(q, k, v):
            with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
                return scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=case.kv != case.heads)
        return run, make

    if case.impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        mask = None
        if case.causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, case.seq, case.seq,
                                     device=device)

        def run(q, k, v):
            return compiled(q, k, v, block_mask=mask, enable_gqa=case.kv != case.heads)
        return run, make

    if case.impl == "fla":
        from fla.ops.linear_attn import chunk_linear_attn

        feature_map = case.options.get("feature_map", "none")
        K = case.feature_dim or case.head_dim

        def make_fla(requires_grad, seed):
            gen = torch.Generator(device=device).manual_seed(seed)
            b, h, n = case.batch, case.heads, case.seq

            def draw(dim, positive=False):
                x = torch.randn(b, n, h, dim, generator=gen, device=device, dtype=case.torch_dtype)
                if positive:  # stand-in for random features: positive, O(1)
                    x = torch.nn.functional.elu(x) + 1
                return x.requires_grad_(requires_grad)

            positive = feature_map == "none"
            return draw(K, positive), draw(K, positive), draw(case.head_dim), torch.randn(
                b, n, h, case.head_dim, generator=gen, device=device, dtype=case.torch_dtype)

        def run(q, k, v):
            if feature_map == "elu":
                q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
            out, _ = chunk_linear_attn(q, k, v, normalize=True)
            return out
        return run, make_fla

    if case.impl == "performer-pytorch":
        if case.causal:
            raise ValueError("performer-pytorch causal has no fast path; not timed")
        from performer_pytorch import FastAttention

        attn = FastAttention(dim_heads=case.head_dim, nb_features=case.feature_dim or 256, causal=False).to(device)

        def run(q, k, v):
            return attn(q, k, v)
        return run, make

    raise ValueError(f"unknown implementation {case.impl!r}; expected one of {IMPLS}")
