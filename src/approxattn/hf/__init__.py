"""Hugging Face integration: any approxattn method inside a transformers model.

```python
import approxattn.hf
approxattn.hf.patch_model(model, "performer", num_features=256)   # same model, patched in place
with approxattn.hf.capture(model) as records: model(input_ids)       # per-layer q, k, context
with approxattn.hf.cached_decoding(model): model.generate(ids)   # SEA: cached steps from its state
approxattn.hf.unpatch(model)
```
See :mod:`approxattn.hf.patch` for how masks, scaling, GQA and causality are handled.
"""

from .patch import (
    ATTACHED,
    IMPLEMENTATION,
    LayerRecord,
    approxattn_attention,
    attached_modules,
    attention_modules,
    cached_decoding,
    capture,
    exact_attention_with_probabilities,
    head_dim_of,
    is_causal_model,
    key_padding_mask_from_hf,
    patch_model,
    patched_method,
    register,
    truncate_layers,
    unpadded_mask,
    unpatch,
)

__all__ = [
    "ATTACHED",
    "IMPLEMENTATION",
    "LayerRecord",
    "approxattn_attention",
    "attached_modules",
    "attention_modules",
    "cached_decoding",
    "capture",
    "exact_attention_with_probabilities",
    "head_dim_of",
    "is_causal_model",
    "key_padding_mask_from_hf",
    "patch_model",
    "patched_method",
    "register",
    "truncate_layers",
    "unpadded_mask",
    "unpatch",
]
