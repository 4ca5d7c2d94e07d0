"""Distillation losses of SEA (Lee et al., ICLR 2024; reference recipe §2.6).

Per attention layer l, with the teacher's attention probabilities ``A^T`` and context ``ctx^T``:

* ``L_est   = w_est_kl · KL(A^T ‖ softmax(Ŝ)) + w_est_mse · MSE(softmax(Ŝ), A^T)`` where Ŝ are the
  method's estimated attention logits resized to ``(Nq, Nk)`` (only methods whose module has
  ``forward_with_details``; others have no L_est);
* ``L_dense = w_dense_kl · KL(A^T ‖ softmax(q kᵀ·scale)) + w_dense_mse · MSE(softmax(q kᵀ·scale), A^T)``
  on the student's own q, k (keeps them aligned with the teacher's);
* ``L_ctx   = w_context · MSE(ctx^T, ctx^S)`` (attention output before the output projection).

Model level: ``w_task · CE + w_hidden · mean_l MSE(h^T_l, h^S_l) + w_logits · KL(softmax(z^T) ‖ softmax(z^S))
+ mean_l (L_est + L_dense + L_ctx)``. KL terms sum over keys (vocabulary) and average over valid
query rows (tokens) and heads; MSE terms average over valid rows. Everything runs in fp32.
The hidden-state term is by default made relative per token (``hidden_loss="relative"``, see
:func:`model_losses`); ``"mse"`` is the reference's plain MSE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from ..hf import LayerRecord

HIDDEN_LOSSES = ("relative", "mse")
_LOG_FLOOR = -100.0  # log-probability floor: a key the student rules out costs a large, finite KL


@dataclass(frozen=True)
class LossWeights:
    """Weights of the distillation loss terms (see the module docstring)."""

    task: float
    hidden: float
    logits: float
    estimate_kl: float = 0.1
    estimate_mse: float = 1.0
    dense_kl: float = 0.1
    dense_mse: float = 1.0
    context: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"loss weight {f.name}: expected a finite number >= 0, got {value!r}")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def replace(self, **changes: Any) -> "LossWeights":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"loss weights: unknown term(s) {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return LossWeights(**(self.as_dict() | changes))


# SEA's recipes: OPT (causal LM) and BERT/GLUE (encoder)
RECIPES: dict[str, LossWeights] = {
    "causal-lm": LossWeights(task=0.1, hidden=5.0, logits=0.2),
    "encoder": LossWeights(task=0.1, hidden=10.0, logits=0.1),
}


def recipe_for(causal: bool) -> LossWeights:
    return RECIPES["causal-lm" if causal else "encoder"]


def _valid_rows(record: LayerRecord) -> torch.Tensor | None:
    """(B, 1, Nq, 1) bool: query rows of real tokens (self-attention with padding), or None = all."""
    mask = record.key_padding_mask
    if mask is None or record.q.shape[2] != mask.shape[1]:
        return None
    return mask[:, None, :, None]


def _row_mean(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, H, Nq, X) over the valid rows (and everything else)."""
    if rows is None:
        return values.mean()
    weights = rows.to(values.dtype).expand(values.shape[0], values.shape[1], values.shape[2], 1)
    return (values * weights).sum() / (weights.sum() * values.shape[-1]).clamp_min(1.0)


def attention_kl(teacher: torch.Tensor, student_log_probs: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher ‖ student) per query row, summed over keys, averaged over valid rows and heads.

    teacher ``(B, H, Nq, Nk)`` probabilities; student_log_probs the same shape (-inf allowed where
    the teacher is zero)."""
    teacher = teacher.float()
    log_student = student_log_probs.float().clamp_min(_LOG_FLOOR)
    per_row = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(dim=-1, keepdim=True)
    return _row_mean(per_row, rows)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of two ``(B, H, Nq, Nk)`` attention matrices over valid rows."""
    return _row_mean((student.float() - teacher.float()).square(), rows)


def dense_log_probs(record: LayerRecord) -> torch.Tensor:
    """log softmax(q kᵀ·scale) of the student's own q, k: ``(B, Hq, Nq, Nk)`` fp32, -inf where masked."""
    q, k = record.q.float(), record.k.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * record.scale
    if record.key_padding_mask is not None:
        logits = logits.masked_fill(~record.key_padding_mask[:, None, None, :], float("-inf"))
    if record.causal:
        n = logits.shape[-1]
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    # rows with no key (padded queries) would be NaN; they are excluded by _valid_rows
    return torch.log_softmax(logits, dim=-1).nan_to_num(nan=0.0)


def layer_losses(teacher: LayerRecord, student: LayerRecord, weights: LossWeights) -> dict[str, torch.Tensor]:
    """The per-layer terms ``estimate`` (methods with an estimator), ``dense`` and ``context``."""
    if teacher.probabilities is None:
        raise ValueError("teacher: the teacher's record has no attention probabilities (capture it unpatched)")
    rows = _valid_rows(student)
    target = teacher.probabilities
    out: dict[str, torch.Tensor] = {}
    if student.details is not None and hasattr(student.details, "estimated_attention_logits"):
        estimated = torch.log_softmax(student.details.estimated_attention_logits().float(), dim=-1)
        estimated = estimated.nan_to_num(nan=0.0)
        out["estimate"] = (weights.estimate_kl * attention_kl(target, estimated, rows)
                           + weights.estimate_mse * attention_mse(estimated.exp(), target, rows))
    dense = dense_log_probs(student)
    out["dense"] = (weights.dense_kl * attention_kl(target, dense, rows)
                    + weights.dense_mse * attention_mse(dense.exp(), target, rows))
    out["context"] = weights.context * _row_mean((student.context.float() - teacher.context.float()).square(), rows)
    return out


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits (B, N, V)`` on ``input_ids (B, N)``, over the
    positions where both the token and its predecessor are real (``valid (B, N)`` bool)."""
    labels = input_ids[:, 1:].masked_fill(~(valid[:, 1:] & valid[:, :-1]), -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def model_losses(
    teacher_out: Any,
    student_out: Any,
    *,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    causal: bool,
    weights: LossWeights,
    hidden_loss: str = "relative",
) -> dict[str, torch.Tensor]:
    """Model-level terms ``task`` (next-token CE, causal LMs with logits), ``hidden`` and ``logits``.

    valid ``(B, N)`` bool: real (non-padding) tokens. hidden_loss: ``"mse"`` the reference's plain
    MSE of hidden states; ``"relative"`` (default) each token's squared error divided by the mean
    square of the teacher's hidden state at that token.
    """
    if hidden_loss not in HIDDEN_LOSSES:
        raise ValueError(f"hidden_loss: expected one of {HIDDEN_LOSSES}, got {hidden_loss!r}")
    out: dict[str, torch.Tensor] = {}
    token_weights = valid.float()
    count = token_weights.sum().clamp_min(1.0)
    student_logits = getattr(student_out, "logits", None)
    if student_logits is not None:
        if causal:
            out["task"] = weights.task * next_token_loss(student_logits, input_ids, valid)
        log_student = torch.log_softmax(student_logits.float(), dim=-1)
        log_teacher = torch.log_softmax(teacher_out.logits.float(), dim=-1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
        out["logits"] = weights.logits * (per_token * token_weights).sum() / count
    teacher_hidden, student_hidden = teacher_out.hidden_states, student_out.hidden_states
    if teacher_hidden is not None and student_hidden is not None:
        # hidden_states[0] is the embedding output; compare the output of every block
        per_layer = []
        for t, s in zip(teacher_hidden[1:], student_hidden[1:]):
            t, s = t.float(), s.float()
            error = (s - t).square().mean(dim=-1)
            if hidden_loss == "relative":
                # per token, relative to the teacher's own size: Llama-family residual streams carry
                # "massive activations" (values in the thousands on a few tokens), which make the
                # plain MSE ~1e6 and drown every other term (SmolLM2: measured, see the README)
                error = error / t.square().mean(dim=-1).clamp_min(1e-6)
            per_layer.append((error * token_weights).sum() / count)
        out["hidden"] = weights.hidden * torch.stack(per_layer).mean()
    return out
