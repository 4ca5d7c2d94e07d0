"""The small KJV softmax teacher (approxattn.distill.kjv_teacher): tokenizer renumbering, training
lowers the loss, and the trained teacher is cached and read back."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from approxattn.distill import kjv_teacher  # noqa: E402
from approxattn.distill.kjv_teacher import CompactTokenizer, TeacherConfig, train_teacher  # noqa: E402

TINY = TeacherConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48, seq_len=16, batch_size=4,
                     steps=40, lr=3e-3, warmup=5)


class CharTokenizer:
    """A stand-in for SmolLM2's tokenizer: one id per character (its code point mod 128)."""

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def test_compact_tokenizer_renumbers_and_maps_unknown_tokens_to_zero():
    tokenizer = CompactTokenizer(CharTokenizer(), [-1] + sorted({ord(c) % 128 for c in "abc"}))
    assert len(tokenizer) == 4
    ids = tokenizer("abcz")["input_ids"]
    assert ids == [1, 2, 3, 0]
    assert tokenizer.decode(ids) == "abc"


def test_training_lowers_the_loss():
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])
    tokens = pattern.repeat(200)
    _, history = train_teacher(TINY, tokens, 10, log=lambda _: None)
    assert len(history) == TINY.steps
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.6 * first


def test_the_teacher_is_cached(tmp_path, monkeypatch):
    def fake_tokenizer():
        return CompactTokenizer(CharTokenizer(), [-1] + list(range(128)))

    monkeypatch.setattr(kjv_teacher, "compact_tokenizer", fake_tokenizer)
    config = TeacherConfig(**(TINY.__dict__ | {"steps": 3}))
    messages = []
    model, tokenizer = kjv_teacher.load_kjv_teacher(tmp_path, config, log=messages.append)
    assert (tmp_path / config.cache_name()).exists()
    again, _ = kjv_teacher.load_kjv_teacher(tmp_path, config, log=messages.append)
    assert any("read" in m for m in messages)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in again.parameters())
