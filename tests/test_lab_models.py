"""The lab on real pretrained models (MiniLM-L6, SmolLM2-135M from PyPI wheels, installed by
scripts/install.sh): hook capture against the model's own attention, the disk cache, and a small
real `compare`. Each model loads once per test process."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from approxattn.lab import metrics  # noqa: E402
from approxattn.lab.models import (  # noqa: E402
    MODELS,
    captured_qkv,
    capture_layers,
    model_available,
    reference_attention,
    tokenize,
)
from approxattn.lab.report import REPORT_FILES  # noqa: E402
from approxattn.lab.runner import CompareConfig, run_compare  # noqa: E402

N = 64


def _need(name: str) -> None:
    if not model_available(name):
        pytest.skip(f"{MODELS[name].requirement} is not installed (scripts/install.sh installs it)")


@pytest.fixture(scope="module", params=["minilm", "smollm2"])
def model_case(request):
    name = request.param
    _need(name)
    info = MODELS[name]
    layer = min(3, info.num_layers - 1)
    ids = tokenize(name, "kjv", N)
    captured = capture_layers(name, ids, [0, layer])
    return name, info, layer, ids, captured


def test_tokenize_gives_exactly_n_tokens(model_case):
    _, _, _, ids, _ = model_case
    assert ids.shape == (1, N)


def test_hook_capture_reproduces_the_models_attention(model_case):
    name, info, layer, ids, captured = model_case
    c = captured[layer]
    assert c["q"].shape == (1, info.num_heads, N, info.head_dim)
    assert c["k"].shape == (1, info.num_kv_heads, N, info.head_dim) == c["v"].shape
    assert c["scale"] == pytest.approx(info.head_dim ** -0.5)
    ours = metrics.exact_matrix(c["q"], c["k"], causal=info.causal, scale=c["scale"])
    theirs = reference_attention(name, ids, layer).double()
    assert float((ours - theirs).abs().max()) < 1e-5
    # the layer below the last one was captured in the same (early-stopped) forward pass
    assert captured[0]["q"].shape == c["q"].shape


def test_capture_cache_and_causal_prefix(tmp_path):
    _need("smollm2")
    messages = []
    first = captured_qkv("smollm2", "fortunes", N, [1], cache=tmp_path, on_load=messages.append)[1]
    assert messages and list((tmp_path / "captures").glob("*.pt"))
    messages.clear()
    again = captured_qkv("smollm2", "fortunes", N, [1], cache=tmp_path, on_load=messages.append)[1]
    assert not messages  # served from disk, the model never ran
    torch.testing.assert_close(again["q"], first["q"])
    # a causal model's longer capture serves a shorter request exactly
    prefix = captured_qkv("smollm2", "fortunes", N // 2, [1], cache=tmp_path, on_load=messages.append)[1]
    assert not messages
    torch.testing.assert_close(prefix["k"], first["k"][:, :, : N // 2])


def test_dequantized_copy_loads_the_same_model(tmp_path, monkeypatch):
    """SmolLM2's GGUF is de-quantised once and saved under the cache directory; the next load reads
    that copy: the same weights (tied embeddings still tied), config and tokenizer. A cache directory
    that cannot be written only skips the saving."""
    _need("smollm2")
    from approxattn.lab.models import DEQUANTIZED_DONE, _load_gguf_causal_lm

    monkeypatch.setenv("APPROXATTN_CACHE", str(tmp_path / "cache"))
    first, first_tokenizer = _load_gguf_causal_lm(MODELS["smollm2"])
    saved = list((tmp_path / "cache" / "dequantized").glob(f"*/{DEQUANTIZED_DONE}"))
    assert len(saved) == 1
    again, again_tokenizer = _load_gguf_causal_lm(MODELS["smollm2"])
    expected, got = first.state_dict(), again.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert again.config.to_diff_dict() == first.config.to_diff_dict()
    text = "In the beginning God created the heaven and the earth."
    assert again_tokenizer(text)["input_ids"] == first_tokenizer(text)["input_ids"]
    ids = torch.tensor([first_tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first.eval()(ids).logits, again.eval()(ids).logits)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("APPROXATTN_CACHE", str(blocked))
    model, _ = _load_gguf_causal_lm(MODELS["smollm2"])
    assert torch.equal(model.lm_head.weight, first.lm_head.weight)


def test_compare_on_real_models(tmp_path):
    _need("minilm")
    _need("smollm2")
    out = tmp_path / "report"
    config = CompareConfig(
        methods=["softmax", "performer", "linformer", "flurka-performer"],
        inputs=[f"minilm:n={N}:layers=1:heads=0,1", f"smollm2:n={N}:layers=1:heads=0"],
        scaling=[N], quick=True, out=str(out), cache=str(tmp_path / "cache"), threads=1, time_budget_s=0.0,
        rpca_n=32,
    )
    result = run_compare(config, progress=False)
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    rows = result.rows
    causal_linformer = [r for r in rows if r["kind"] == "measure" and r["source"] == "smollm2"
                        and r["method"] == "linformer"]
    assert causal_linformer and all(r["status"] == "n/a" and "causal" in r["reason"] for r in causal_linformer)
    smollm = [r for r in rows if r["kind"] == "measure" and r["source"] == "smollm2" and r["method"] == "softmax"]
    assert smollm[0]["heads"] == 3 and smollm[0]["kv_heads"] == 1 and smollm[0]["out_rel_err"] < 1e-5
    assert any(r["kind"] == "hybrid" and r["status"] == "ok" for r in rows)
    spectra = [r for r in rows if r["kind"] == "spectrum" and r["status"] == "ok"]
    assert {r["source"] for r in spectra} == {"minilm", "smollm2"}
    rpca = [r for r in rows if r["kind"] == "rpca" and r["status"] == "ok"]
    assert rpca and all(0 <= h["low_rank_energy"] <= 1.0 + 1e-9 for r in rpca for h in r["heads_analysis"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["table"]["reference_input"].startswith("minilm/")
