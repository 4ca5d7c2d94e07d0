"""Distillation of pretrained transformers models into approxattn methods (SEA's recipe).

```python
from approxattn.distill import DistillConfig, distill, perplexity
d = distill(teacher, train_tokens, DistillConfig(method="performer", options={"num_features": 256}),
            out_dir="runs/performer")
print(perplexity(d.student, heldout_tokens, seq_len=1024))
```
``approxattn distill run|report`` runs the teacher-vs-methods comparison on the KJV text.
"""

from .data import SPLITS, TRAIN_SPLITS, eval_windows, split_text, token_stream, train_batch
from .losses import (
    RECIPES,
    LossWeights,
    attention_kl,
    attention_mse,
    layer_losses,
    model_losses,
    next_token_loss,
    recipe_for,
)
from .trainer import (
    DistillConfig,
    Distiller,
    LanguageModelTuner,
    distill,
    finetune,
    hidden_agreement,
    lr_factor,
    perplexity,
)

__all__ = [
    "RECIPES",
    "SPLITS",
    "TRAIN_SPLITS",
    "DistillConfig",
    "Distiller",
    "LanguageModelTuner",
    "LossWeights",
    "attention_kl",
    "attention_mse",
    "distill",
    "eval_windows",
    "finetune",
    "hidden_agreement",
    "layer_losses",
    "lr_factor",
    "model_losses",
    "next_token_loss",
    "perplexity",
    "recipe_for",
    "split_text",
    "token_stream",
    "train_batch",
]
