"""A small softmax teacher trained from scratch on the KJV train split, for distillation runs that
cannot afford SmolLM2 (the issue's fallback: no GPU time, or a CPU-only machine).

The model is a Llama (the same architecture family as SmolLM2: RoPE, GQA, SwiGLU) with
``hidden 256, 4 layers, 4 query / 2 key-value heads of dim 64``, tied embeddings, over a compact
vocabulary: SmolLM2's tokenizer, with its ids renumbered to the ~10K that occur in the KJV text
(both splits: only *which* tokens exist, no statistics), so the LM head stays cheap on a CPU.

Training: AdamW, linear warm-up then cosine decay, random windows of the train split, for a step
count or a wall-clock budget. The trained weights are cached in ``cache_dir`` under a name that
encodes the configuration, so the distillation runs (and a resumed run) reuse the same teacher.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .data import split_text, token_stream, train_batch


@dataclass(frozen=True)
class TeacherConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 704
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1500
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0

    def cache_name(self) -> str:
        return "kjv_teacher_" + "_".join(f"{k}{v}" for k, v in asdict(self).items()) + ".pt"


class CompactTokenizer:
    """SmolLM2's tokenizer with ids renumbered to the tokens of a fixed text (0 = any other token).

    ``tokenizer(text, add_special_tokens=False)["input_ids"]`` like a Hugging Face tokenizer
    (what :func:`approxattn.distill.data.token_stream` calls)."""

    def __init__(self, base: Any, vocabulary: list[int]) -> None:
        self.base = base
        self.vocabulary = vocabulary                      # compact id → base id (index 0 unused: unknown)
        self.compact = {base_id: i for i, base_id in enumerate(vocabulary) if i > 0}

    def __len__(self) -> int:
        return len(self.vocabulary)

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs: Any) -> dict[str, list[int]]:
        ids = self.base(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [self.compact.get(i, 0) for i in ids]}

    def decode(self, ids: list[int]) -> str:
        return self.base.decode([self.vocabulary[i] for i in ids if i > 0])


def base_tokenizer() -> Any:
    """SmolLM2's tokenizer, offline, without loading its weights."""
    import contextlib
    import os

    from transformers import AutoTokenizer

    from ..lab.models import _package_folder, get_model_info

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    folder = _package_folder(get_model_info("smollm2"))
    gguf = sorted(p.name for p in folder.glob("*.gguf"))[0]
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)


def compact_tokenizer() -> CompactTokenizer:
    base = base_tokenizer()
    seen: set[int] = set()
    for split in ("train", "heldout"):
        seen.update(token_stream(base, split_text(split)).tolist())
    return CompactTokenizer(base, [-1] + sorted(seen))


def new_model(config: TeacherConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        head_dim=config.hidden // config.heads, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama)


def train_teacher(
    config: TeacherConfig,
    tokens: torch.Tensor,
    vocab_size: int,
    *,
    time_budget: float | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, list[dict[str, float]]]:
    """Train a new teacher on ``tokens`` (1-D ids); stops at ``config.steps`` or ``time_budget`` s."""
    model = new_model(config, vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history = []
    start = time.perf_counter()
    for step in range(config.steps):
        batch = train_batch(tokens, step=step, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - start
        history.append({"step": step + 1, "loss": loss.item(), "seconds": elapsed})
        if (step + 1) % 50 == 0:
            log(f"teacher step {step + 1}: loss {history[-1]['loss']:.3f} ({elapsed:.0f} s)")
        if time_budget is not None and elapsed > time_budget:
            log(f"teacher: time budget reached after {step + 1} steps")
            break
    return model.eval().requires_grad_(False), history


def load_kjv_teacher(
    cache_dir: str | Path = "distill-cache",
    config: TeacherConfig = TeacherConfig(),
    *,
    time_budget: float | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, CompactTokenizer]:
    """(teacher in eval mode, frozen; its tokenizer): trained once, then read from ``cache_dir``."""
    tokenizer = compact_tokenizer()
    path = Path(cache_dir) / config.cache_name()
    model = new_model(config, len(tokenizer))
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        log(f"teacher: read {path}")
        return model.eval().requires_grad_(False), tokenizer
    log(f"teacher: training a KJV softmax teacher ({config}) — cached afterwards at {path}")
    tokens = token_stream(tokenizer, split_text("train"))
    model, history = train_teacher(config, tokens, len(tokenizer), time_budget=time_budget, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "config": asdict(config), "history": history}, tmp)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps({"config": asdict(config), "history": history[-5:],
                                                       "steps": len(history)}, indent=1))
    return model, tokenizer
