"""Text for distillation: a fixed train / held-out split of the King James Bible.

* train: the lab's KJV excerpt (Genesis onwards, ``approxattn.lab`` package data; 96 K SmolLM2
  tokens, so a run of 1,000 steps × 2,048 tokens passes over it ~21 times);
* train-full: every book before the held-out ones, Genesis to Philemon
  (``approxattn/distill/data/kjv_train.txt.gz``, ~1 M tokens);
* held-out: Hebrews to Revelation (``approxattn/distill/data/kjv_heldout.txt.gz``) — books no
  model is distilled on. Both package files are made by ``scripts/make_distill_text.py``.

Both are tokenised once into one long stream of token ids. Training draws windows at random
offsets (a generator seeded by ``(seed, step)``, so a resumed run sees exactly the windows an
uninterrupted run would); evaluation uses consecutive non-overlapping windows.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

from ..lab.text import load_text

SPLITS = {
    "train": "KJV Genesis onwards (approxattn.lab's kjv.txt.gz)",
    "train-full": "KJV Genesis to Philemon (approxattn.distill's kjv_train.txt.gz)",
    "heldout": "KJV Hebrews to Revelation (approxattn.distill's kjv_heldout.txt.gz)",
}
TRAIN_SPLITS = ("train", "train-full")
PACKAGE_FILES = {"train-full": "kjv_train.txt.gz", "heldout": "kjv_heldout.txt.gz"}


@lru_cache(maxsize=None)
def split_text(split: str) -> str:
    """The text of ``split`` ('train', 'train-full' or 'heldout')."""
    if split == "train":
        return load_text("kjv")
    if split in PACKAGE_FILES:
        data = resources.files("approxattn.distill").joinpath("data").joinpath(PACKAGE_FILES[split]).read_bytes()
        return gzip.decompress(data).decode("utf-8")
    raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")


def token_stream(tokenizer: Any, text: str, *, chunk_chars: int = 200_000) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D LongTensor (no special tokens); paragraphs are
    tokenised in chunks so no tokenizer length limit applies."""
    paragraphs = text.split("\n\n")
    ids: list[int] = []
    chunk: list[str] = []
    size = 0
    for paragraph in paragraphs + [None]:
        if paragraph is None or size + len(paragraph) > chunk_chars:
            if chunk:
                piece = "\n\n".join(chunk) + ("\n\n" if paragraph is not None else "")
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
            chunk, size = [], 0
        if paragraph is not None:
            chunk.append(paragraph)
            size += len(paragraph) + 2
    return torch.tensor(ids, dtype=torch.long)


def _check_windows(tokens: torch.Tensor, seq_len: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D stream of token ids, got shape {tuple(tokens.shape)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    if tokens.numel() < seq_len:
        raise ValueError(f"seq_len: the token stream has only {tokens.numel()} tokens, fewer than seq_len={seq_len}")


def train_batch(tokens: torch.Tensor, *, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """``(batch_size, seq_len)`` windows of ``tokens`` at offsets drawn for training step ``step``."""
    _check_windows(tokens, seq_len)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, *, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping ``(W, seq_len)`` windows (the tail shorter than seq_len is dropped)."""
    _check_windows(tokens, seq_len)
    count = tokens.numel() // seq_len
    if max_windows is not None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"max_windows: expected an int >= 1 or None, got {max_windows!r}")
        count = min(count, max_windows)
    return tokens[: count * seq_len].view(count, seq_len)
