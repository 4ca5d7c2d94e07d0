"""approxattn.hf: methods inside transformers models through AttentionInterface (tiny random Llama,
plus MiniLM and SmolLM2 truncated to 2 layers when their wheels are installed)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import approxattn  # noqa: E402
import approxattn.hf as hf  # noqa: E402
from approxattn.lab.models import MODELS, model_available  # noqa: E402

from helpers import rel_err  # noqa: E402


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _need(name: str) -> None:
    if not model_available(name):
        pytest.skip(f"{MODELS[name].requirement} is not installed (scripts/install.sh installs it)")


def _ids(batch: int = 2, n: int = 24, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, n))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    return ids, mask


def test_patched_softmax_reproduces_the_model_with_padding():
    model = tiny_llama()
    ids, mask = _ids()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        hf.patch_model(model, "softmax")
        assert model.config._attn_implementation == hf.IMPLEMENTATION
        patched = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(patched[keep], reference[keep]) < 1e-5
    # one approxattn module per layer, a registered submodule of the layer's attention module
    assert len(hf.attached_modules(model)) == 2
    assert all(name.endswith(".self_attn") for name, _ in hf.attention_modules(model))


@pytest.mark.parametrize("method", ["softmax", "performer", "sea"])
def test_patched_model_runs_under_autocast(method):
    # transformers' rotary embedding promotes q, k to fp32 beside autocast's bf16 v
    model = tiny_llama()
    ids, mask = _ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(ids, attention_mask=mask).logits.float()
        hf.patch_model(model, method)
        patched = model(ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    assert torch.isfinite(patched[keep]).all()
    if method == "softmax":
        assert rel_err(patched[keep], reference[keep]) < 2e-2


def test_mixed_dtypes_outside_autocast_stay_an_error():
    model = tiny_llama(layers=1)
    hf.patch_model(model, "softmax")
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(TypeError, match="dtype"):
        hf.approxattn_attention(model.model.layers[0].self_attn, q, q[:, :2], q[:, :2].bfloat16(), None)


def test_unpatch_restores_the_model():
    model = tiny_llama()
    before = model.config._attn_implementation
    names = set(model.state_dict())
    hf.patch_model(model, "performer", num_features=16)
    assert any(".approxattn." in key for key in model.state_dict())  # random features saved with the model
    assert hf.patched_method(model) == "performer"
    hf.unpatch(model)
    assert model.config._attn_implementation == before
    assert set(model.state_dict()) == names and hf.patched_method(model) is None


def test_capture_records_the_teachers_attention():
    model = tiny_llama()
    ids, mask = _ids()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask, output_attentions=True)
        with hf.capture(model) as records:
            out = model(ids, attention_mask=mask)
    assert model.config._attn_implementation == "eager"  # restored
    assert [r.layer for r in records] == [0, 1]
    keep = mask.bool()
    assert rel_err(out.logits[keep], eager.logits[keep]) < 1e-5
    for record, theirs in zip(records, eager.attentions):
        assert record.q.shape == (2, 4, 24, 16) and record.k.shape == (2, 2, 24, 16)  # GQA kept unrepeated
        assert record.causal and record.key_padding_mask is not None
        rows = keep[:, None, :, None].expand_as(theirs)
        assert rel_err(record.probabilities[rows], theirs[rows]) < 1e-5
        assert record.context.shape == (2, 4, 24, 16)


def test_causal_method_does_not_see_the_future():
    model = hf.patch_model(tiny_llama(), "performer", num_features=32)
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_mask_conversion():
    n = 6
    keep = torch.tensor([[True] * n, [False, False] + [True] * (n - 2)])
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    full = keep[:, None, None, :] & causal
    got = hf.key_padding_mask_from_hf(full, batch=2, seq_q=n, seq_k=n, causal=True)
    torch.testing.assert_close(got, keep)
    additive = torch.zeros(2, 1, n, n).masked_fill(~full, torch.finfo(torch.float32).min)
    torch.testing.assert_close(hf.key_padding_mask_from_hf(additive, batch=2, seq_q=n, seq_k=n, causal=True), keep)
    assert hf.key_padding_mask_from_hf(torch.ones(2, 1, n, n, dtype=torch.bool), batch=2, seq_q=n, seq_k=n,
                                       causal=False) is None
    window = full & ~torch.ones(n, n, dtype=torch.bool).tril(-3)  # sliding window of 3
    with pytest.raises(ValueError, match="sliding window"):
        hf.key_padding_mask_from_hf(window, batch=2, seq_q=n, seq_k=n, causal=True)
    with pytest.raises(ValueError, match="attention_mask"):
        hf.key_padding_mask_from_hf(torch.ones(2, 5, dtype=torch.bool), batch=2, seq_q=n, seq_k=n, causal=False)


@pytest.mark.parametrize("method", ["softmax", "sea"])
def test_unpadded_mask_is_the_same_model_with_no_mask(method):
    """hf.unpadded_mask: the same tensor per shape, recognised without being read, and the model gives
    what it gives with no mask; a mask written in place is no longer trusted blindly."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 24))
    mask = hf.unpadded_mask(2, 24, causal=True, device="cpu")
    assert mask is hf.unpadded_mask(2, 24, causal=True, device="cpu") and mask.shape == (2, 1, 24, 24)
    assert torch.equal(mask[1, 0], torch.ones(24, 24, dtype=torch.bool).tril())
    assert not hf.unpadded_mask(2, 24, causal=False, device="cpu")[0, 0].logical_not().any()
    hf.patch_model(model, method, **({"k": 4, "columns": 8} if method == "sea" else {}))
    with torch.no_grad():
        reference = model(ids).logits
        given = model(ids, attention_mask=mask).logits
    assert rel_err(given, reference) < 1e-6
    assert hf.key_padding_mask_from_hf(mask, batch=2, seq_q=24, seq_k=24, causal=True) is None
    with pytest.raises(ValueError, match="another pattern"):   # causal triangle given to bidirectional attention
        hf.key_padding_mask_from_hf(mask, batch=2, seq_q=24, seq_k=24, causal=False)
    mask._base[3, :] = False   # written in place (through the square it views): not trusted any more
    assert mask._version > 0
    fresh = hf.unpadded_mask(2, 24, causal=True, device="cpu")
    assert fresh is not mask and torch.equal(fresh[0, 0], torch.ones(24, 24, dtype=torch.bool).tril())


def test_bad_patches_raise_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown"):
        hf.patch_model(model, "no-such-method")
    with pytest.raises(NotImplementedError, match="causal"):
        hf.patch_model(model, "linformer")  # non-causal method on a causal LM
    with pytest.raises(ValueError):
        hf.patch_model(model, "performer", num_features=0)
    with pytest.raises(TypeError, match="model"):
        hf.patch_model(torch.nn.Linear(2, 2), "softmax")
    hf.patch_model(model, "linear")
    with pytest.raises(ValueError, match="already patched"):
        hf.patch_model(model, "softmax")
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(tiny_llama())


def test_truncate_layers():
    model = hf.truncate_layers(tiny_llama(layers=3), 1)
    assert len(hf.attention_modules(model)) == 1 and model.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="num_layers"):
        hf.truncate_layers(model, 5)


def test_minilm_patched_softmax_and_linformer():
    _need("minilm")
    from approxattn.lab.models import load_model

    model, tokenizer = load_model("minilm")
    model = copy.deepcopy(model)
    assert not hf.is_causal_model(model) and len(hf.attention_modules(model)) == 6
    batch = tokenizer(["In the beginning God created the heaven and the earth.", "And God said"],
                      padding=True, return_tensors="pt")
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        hf.patch_model(model, "softmax")
        patched = model(**batch).last_hidden_state
        assert rel_err(patched[keep], reference[keep]) < 1e-5
        hf.unpatch(model)
        hf.patch_model(model, "linformer", rank=8, max_len=64)  # non-causal methods work on encoders
        assert model(**batch).last_hidden_state.shape == reference.shape


def test_smollm2_truncated_patched_softmax():
    _need("smollm2")
    from approxattn.lab.models import load_model

    model, tokenizer = load_model("smollm2")
    model = hf.truncate_layers(copy.deepcopy(model), 2)
    assert hf.is_causal_model(model)
    ids = tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(ids).logits
        hf.patch_model(model, "softmax")
        patched = model(ids).logits
    assert rel_err(patched, reference) < 1e-5
    # GQA: 9 query heads over 3 key/value heads, passed unrepeated
    with torch.no_grad(), hf.capture(model) as records:
        model(ids)
    assert records[0].q.shape[1] == 9 and records[0].k.shape[1] == 3


@pytest.mark.parametrize("method", sorted(name for name, spec in approxattn.available_methods().items()
                                          if spec.supports_causal))
def test_kv_cache_decoding_is_exact_or_refused(method):
    # one token over the KV cache of a prompt = the last row of the whole causal forward, for the
    # methods whose metadata says so; the others refuse the cached step instead of answering otherwise
    spec = approxattn.available_methods()[method]
    model = hf.patch_model(tiny_llama(), method, **spec.example_options(24))
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        prompt = model(ids[:, :-1], use_cache=True)
        if spec.kv_cache_decoding:
            step = model(ids[:, -1:], past_key_values=prompt.past_key_values, use_cache=True).logits[:, -1]
            assert rel_err(step, full) < 1e-5
        else:
            with pytest.raises(NotImplementedError, match="use_cache=False"):
                model(ids[:, -1:], past_key_values=prompt.past_key_values, use_cache=True)
            generated = model.generate(ids[:, :-1], max_new_tokens=2, do_sample=False, use_cache=False,
                                       pad_token_id=0)
            assert generated.shape == (2, 25)
            assert torch.equal(generated[:, 23], model(ids[:, :-1], use_cache=False).logits[:, -1].argmax(-1))


def test_sea_cached_decoding_equals_the_full_forward():
    """Inside cached_decoding a one-token SEA step over transformers' KV cache comes from SEA's
    decoding state and equals the last row of the whole causal forward; greedy generation with
    the cache picks the tokens it picks without."""
    spec = approxattn.get_method("sea")
    model = hf.patch_model(tiny_llama(), "sea", **spec.example_options(32))
    ids = torch.randint(1, 97, (2, 24))  # no pad token (0): generate would mask it as padding
    with torch.no_grad(), hf.cached_decoding(model):
        full = model(ids, use_cache=False).logits[:, -1]
        prompt = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prompt.past_key_values, use_cache=True).logits[:, -1]
        assert rel_err(step, full) < 1e-5
        cached = model.generate(ids[:, :-1], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        uncached = model.generate(ids[:, :-1], max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_sea_cached_decoding_refuses_a_cache_it_was_not_built_along():
    spec = approxattn.get_method("sea")
    model = hf.patch_model(tiny_llama(), "sea", **spec.example_options(32))
    a, b = torch.randint(0, 97, (2, 2, 20))
    with torch.no_grad(), hf.cached_decoding(model):
        first = model(a, use_cache=True)
        model(b, use_cache=True)  # the decoding state now follows b
        with pytest.raises(NotImplementedError, match="no longer matches"):
            model(a[:, -1:], past_key_values=first.past_key_values, use_cache=True)
        ids, mask = _ids(n=20)
        padded = model(ids, attention_mask=mask, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        with pytest.raises(NotImplementedError, match="padding"):
            model(ids[:, -1:], attention_mask=step_mask, past_key_values=padded.past_key_values, use_cache=True)
    # outside the block the cached step is refused as before
    with torch.no_grad(), pytest.raises(NotImplementedError, match="cached_decoding"):
        model(b[:, -1:], past_key_values=model(b, use_cache=True).past_key_values, use_cache=True)


def test_cached_decoding_needs_a_method_with_a_decoding_state():
    for model in (hf.patch_model(tiny_llama(), "performer", num_features=16), tiny_llama()):
        with pytest.raises(ValueError, match="decode_step"), hf.cached_decoding(model):
            pass
