"""Distil a pretrained transformers model into one that uses an approxattn method.

teacher = the frozen original, run first under ``no_grad`` with its attention captured
(:func:`approxattn.hf.capture`); student = a deep copy patched with the method
(:func:`approxattn.hf.patch_model`), which keeps every pretrained weight and adds the method's
modules. Losses: :mod:`approxattn.distill.losses`. AdamW with two parameter groups: the new
(method) parameters at ``lr · new_lr_scale`` and the pretrained ones at ``lr · pretrained_lr_scale``,
weight decay, gradient-norm clipping, fp32 or bf16 autocast, and an optional learning-rate schedule
(linear warm-up, then constant, cosine or linear decay: :func:`lr_factor`). Checkpoints are written atomically
every ``checkpoint_every`` steps and at the end; :func:`distill` resumes from the checkpoint in
its folder, and a resumed run gives the same result as an uninterrupted one (the data windows of
step s depend only on (seed, s); RNG states are saved).

On CUDA an eager step is tens of thousands of small launches (SmolLM2 into SEA: ~80,000 aten calls), so
the host, not the GPU, sets its pace. With ``cuda_graph`` (the default) the step's losses, backward and gradient
clipping are captured once into a CUDA graph after ``GRAPH_WARMUP`` eager steps and replayed for every
later batch of the same shape; the optimizer (fused AdamW) runs eagerly after the replay, so the
learning-rate schedule needs nothing captured. Steps run eagerly where a graph would not compute the
same thing: on the CPU, with an attention mask (transformers checks padding masks with host syncs; without
one the models get ``hf.unpadded_mask``, which it passes through unread),
for a method with host-side per-call state (a redraw schedule: ``AttentionModule.replays_in_training``),
for another batch shape than the captured one, and after a capture that failed (warned once).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.profiler import record_function

from .. import hf
from ..cached import collecting
from ..graphs import capture, capture_stream
from ..registry import get_method
from .data import eval_windows, train_batch
from .losses import HIDDEN_LOSSES, LossWeights, layer_losses, model_losses, next_token_loss, recipe_for

PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
GRAPH_WARMUP = 2  # eager steps of a process before its step is captured (kernel compilation, cuDNN's search, AdamW's state)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _non_negative(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def student_options(method: Any, options: Any) -> Any:
    """``options`` with the distillation default of a random-feature method: features never redrawn
    unless ``redraw`` is given. The methods' default (every 1,000 training calls, lucidrains' and
    SEA's) landed a redraw on the last step of a 1,000-step run, so the student was evaluated on
    features it trained with for one clipped step. Anything malformed is returned as it came, for
    ``DistillConfig.validate`` to reject."""
    if not isinstance(options, dict) or "redraw" in options or not isinstance(method, str):
        return options
    try:
        spec = get_method(method)
    except ValueError:
        return options
    if any(option.name == "redraw" and option.default != "never" for option in spec.options):
        return options | {"redraw": "never"}
    return options  # no random features, or never redrawn anyway: the label stays as it was


@dataclass
class DistillConfig:
    """Options of one distillation run (defaults: SEA's recipe, sized for a short run). The
    method's options get the distillation defaults of ``student_options``."""

    method: str = "softmax"
    options: dict[str, Any] = field(default_factory=dict)  # the method's options
    steps: int = 300
    batch_size: int = 1
    seq_len: int = 1024
    lr: float = 1e-5
    new_lr_scale: float = 10.0  # the method's new parameters: lr x 10
    pretrained_lr_scale: float = 0.2  # the teacher's weights in the student: lr x 0.2
    weight_decay: float = 0.01
    lr_schedule: str = "constant"  # SEA's recipe; "cosine"/"linear" decay to min_lr_ratio · lr at the last step
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr over the first steps
    min_lr_ratio: float = 0.0  # the decayed schedules' final lr, as a fraction of the peak
    grad_clip: float = 1.0
    precision: str = "bf16"
    seed: int = 0
    checkpoint_every: int = 100
    weights: LossWeights | None = None  # None: SEA's causal-LM (OPT) or encoder (BERT) recipe
    hidden_loss: str = "relative"  # "mse": the reference's plain hidden-state MSE (see losses.model_losses)
    cuda_graph: bool = True  # on CUDA, replay each step's losses and backward from a CUDA graph (module doc)

    def validate(self) -> None:
        spec = get_method(self.method)  # clear error for an unknown method
        if not isinstance(self.options, dict):
            raise TypeError(f"options: expected a dict of {spec.name!r} options, got {type(self.options).__name__}")
        spec.resolve_options(dict(self.options))  # unknown options and bad values raise here
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        if self.seq_len < 2:
            raise ValueError(f"seq_len: expected an int >= 2, got {self.seq_len}")
        _non_negative("lr", self.lr, positive=True)
        for name in ("new_lr_scale", "pretrained_lr_scale", "weight_decay"):
            _non_negative(name, getattr(self, name))
        _non_negative("grad_clip", self.grad_clip, positive=True)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps: expected an int in [0, steps={self.steps}), got {self.warmup_steps!r}")
        _non_negative("min_lr_ratio", self.min_lr_ratio)
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio: expected a fraction in [0, 1], got {self.min_lr_ratio!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss: expected one of {HIDDEN_LOSSES}, got {self.hidden_loss!r}")
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph: expected a bool, got {type(self.cuda_graph).__name__}")
        if self.weights is not None and not isinstance(self.weights, LossWeights):
            raise TypeError(f"weights: expected a LossWeights or None, got {type(self.weights).__name__}")

    def __post_init__(self) -> None:
        self.options = student_options(self.method, self.options)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weights"] = None if self.weights is None else self.weights.as_dict()
        return out


def lr_factor(config: DistillConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak: a pure
    function of the step, so a resumed run follows the same schedule as an uninterrupted one."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)  # 0 at the peak, 1 at the last step
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.lr_schedule == "cosine" else 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` for precision 'bf16'; a no-op context for 'fp32'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
    """The model's outputs with hidden states. attention_mask: ``(B, N)``, or ``hf.unpadded_mask``'s (no
    padding: transformers then checks nothing on the host). No KV cache: nothing decodes."""
    if getattr(model.config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)


class _StepInterrupts:
    """A step's update, its count and its log row are kept together: an interrupt that arrives while a step
    is in flight waits for its end (one that landed between the update and the row lost a log row)."""

    in_step = False
    pending: str | None = None


def request_interrupt(reason: str) -> None:
    """Raise KeyboardInterrupt(reason) now, or at the end of the training step in flight (signal handlers:
    ``approxattn distill``'s SIGTERM)."""
    if _StepInterrupts.in_step:
        _StepInterrupts.pending = reason
        return
    raise KeyboardInterrupt(reason)


class Distiller:
    """One teacher, one student, one optimizer; :meth:`step` runs one optimisation step.

    teacher: a transformers model (left untouched: frozen, evaluated under ``no_grad``; its
    attention implementation is switched only while it runs). The student lives on the
    teacher's device.
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig) -> None:
        config.validate()
        self.config = config
        self.teacher = teacher
        self.causal = hf.is_causal_model(teacher)
        self.weights = config.weights if config.weights is not None else recipe_for(self.causal)
        torch.manual_seed(config.seed)  # the method's own initialisation (e.g. learned projections)
        student = copy.deepcopy(teacher)
        hf.patch_model(student, config.method, **config.options)
        self.student = student.train().requires_grad_(True)
        new = {id(p) for module in hf.attached_modules(student) for p in module.parameters()}
        new_params = [p for p in student.parameters() if id(p) in new]
        old_params = [p for p in student.parameters() if id(p) not in new]
        self.peak_lr = {"pretrained": config.lr * config.pretrained_lr_scale, "new": config.lr * config.new_lr_scale}
        groups = [{"params": old_params, "lr": self.peak_lr["pretrained"], "name": "pretrained"}]
        if new_params:
            groups.append({"params": new_params, "lr": self.peak_lr["new"], "name": "new"})
        # fused: a few launches per step instead of a dozen per parameter list (the step is host-bound)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda")
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        self._graph: _StepGraph | None = None
        self._eager_steps = 0   # of this process: a resumed run warms up again before it captures
        self.graph_replays = 0
        # why steps run eagerly on CUDA whatever their batch (None: they are captured after the warm-up)
        self.graph_off: str | None = None if config.cuda_graph else "cuda_graph=False"
        stateful = sorted({type(m).__name__ for m in hf.attached_modules(student) if not m.replays_in_training()})
        if stateful and self.graph_off is None:
            self.graph_off = f"{', '.join(stateful)} keeps host-side state per training call (a redraw schedule)"

    @property
    def device(self) -> torch.device:
        return model_device(self.student)

    def parameter_counts(self) -> dict[str, int]:
        return {group["name"]: sum(p.numel() for p in group["params"]) for group in self.optimizer.param_groups}

    def losses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All loss terms for one batch (``total`` included), with the student's graph attached."""
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:   # no padding
            valid = torch.ones_like(input_ids, dtype=torch.bool)
            attention_mask = hf.unpadded_mask(*input_ids.shape, causal=self.causal, device=device)
        else:
            attention_mask = attention_mask.to(device)
            valid = attention_mask.bool()
        with torch.no_grad(), autocast(device, self.config.precision), hf.capture(self.teacher) as teacher_layers, \
                record_function("distill.teacher"):
            self.teacher.eval()
            teacher_out = _forward(self.teacher, input_ids, attention_mask)
        with autocast(device, self.config.precision), hf.capture(self.student) as student_layers, \
                record_function("distill.student"):
            student_out = _forward(self.student, input_ids, attention_mask)
        if len(teacher_layers) != len(student_layers):
            raise RuntimeError(f"teacher and student ran {len(teacher_layers)} and {len(student_layers)} attention layers")
        with record_function("distill.model_losses"):
            terms = model_losses(teacher_out, student_out, input_ids=input_ids, valid=valid, causal=self.causal,
                                 weights=self.weights, hidden_loss=self.config.hidden_loss)
        per_layer: dict[str, list[torch.Tensor]] = {}
        with record_function("distill.layer_losses"):
            for t, s in zip(teacher_layers, student_layers):
                for name, value in layer_losses(t, s, self.weights).items():
                    per_layer.setdefault(name, []).append(value)
        for name, values in per_layer.items():
            terms[name] = torch.stack(values).mean()
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step; returns the loss terms (floats), the gradient norm, the lr factor,
        whether a CUDA graph ran it (``cuda_graph``), the step's wall seconds (the loss floats wait
        for the device) and when it ended (``unix_time``).

        input_ids ``(B, N)`` token ids; attention_mask ``(B, N)`` (1 = real token) or None (no padding).
        An interrupt requested during the step (:func:`request_interrupt`) is raised when it ends."""
        _StepInterrupts.in_step = True
        try:
            return self._step(input_ids, attention_mask)
        finally:
            _StepInterrupts.in_step = False
            reason, _StepInterrupts.pending = _StepInterrupts.pending, None
            if reason is not None:
                raise KeyboardInterrupt(reason)

    def _step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, float]:
        started = time.perf_counter()
        self.student.train()
        graph = self._graph_for(input_ids, attention_mask)
        with self._warm_up_stream(graph is None and self._capturable(attention_mask)):
            if graph is not None:
                terms, grad_norm = graph.replay(input_ids)
                self.graph_replays += 1
            else:
                # once captured, the gradients live in the graph's memory: an eager step zeroes them in place
                self.optimizer.zero_grad(set_to_none=self._graph is None)
                terms, grad_norm = self._losses_and_gradients(input_ids, attention_mask)
                self._eager_steps += 1
            with record_function("distill.optimizer"):
                factor = lr_factor(self.config, self.step_count)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.peak_lr[group["name"]] * factor
                self.optimizer.step()
        self.step_count += 1
        values = torch.stack([value.float() for value in terms.values()] + [grad_norm.float()]).tolist()  # one sync
        row = dict(zip(terms, values[:-1]))
        row["grad_norm"] = values[-1]
        row["lr_factor"] = factor
        row["cuda_graph"] = graph is not None
        row["seconds"] = time.perf_counter() - started
        row["step"] = self.step_count
        # when the step ended (Unix seconds): across resumed calls the gaps hold each call's loading (and any idle time)
        row["unix_time"] = time.time()
        self.history.append(row)
        return row

    def _losses_and_gradients(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss terms (detached), their backward and the gradient clipping: what a graph replays.
        Returns (terms, the gradient norm before clipping)."""
        terms = self.losses(input_ids, attention_mask)
        with record_function("distill.backward"):
            terms["total"].backward()
        with record_function("distill.clip"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        return {name: value.detach() for name, value in terms.items()}, grad_norm

    def _capturable(self, attention_mask: torch.Tensor | None) -> bool:
        return self.graph_off is None and self.device.type == "cuda" and attention_mask is None

    @property
    def settling_steps(self) -> int:
        """Steps of this process before its steps take their steady time (warm-up, then the capture)."""
        return GRAPH_WARMUP + 1 if self._capturable(None) and self._graph is None else 1

    def _graph_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _StepGraph | None:
        """The step's CUDA graph (captured here once the warm-up is done), or None: run eagerly."""
        if not self._capturable(attention_mask):
            return None
        if self._graph is not None:
            return self._graph if self._graph.fits(input_ids) else None
        if self._eager_steps < GRAPH_WARMUP:
            return None
        try:
            self._graph = _StepGraph(self, input_ids.to(self.device))
        except Exception as error:  # noqa: BLE001  (a step that cannot be captured still trains, eagerly)
            self.graph_off = f"its capture failed at {_failing_line(error)} ({type(error).__name__}: {str(error)[:200]})"
            warnings.warn(f"approxattn.distill: the training step runs eagerly: {self.graph_off}", RuntimeWarning,
                          stacklevel=3)
            self.optimizer.zero_grad(set_to_none=True)   # gradients the failed capture may have left
            return None
        return self._graph

    @contextmanager
    def _warm_up_stream(self, warming_up: bool):
        """The eager steps before a capture run on the capture's stream, as torch's CUDA-graph recipe
        asks (per-stream handles and workspaces exist before the capture needs them)."""
        if not warming_up:
            yield
            return
        stream, current = capture_stream(self.device.index or 0), torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            current.wait_stream(stream)

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = {
            "config": self.config.as_dict(),
            "step": self.step_count,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "cpu_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = dict(state["config"])
        mine = self.config.as_dict()
        # a resumed run may go on for more steps (unless a decaying schedule depends on their number)
        # or save less often; everything else must match. Checkpoints from before the schedule
        # options ran the constant schedule.
        saved = {"lr_schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.0} | saved
        # how a step runs (eagerly or from a CUDA graph) is not part of the recipe
        free = ("steps", "checkpoint_every", "cuda_graph") if mine["lr_schedule"] == "constant" \
            else ("checkpoint_every", "cuda_graph")
        different = sorted(k for k in mine if k not in free and saved.get(k) != mine[k])
        if different:
            raise ValueError("checkpoint: it was written with other options ("
                             + ", ".join(f"{k}: {saved.get(k)!r} there, {mine[k]!r} now" for k in different)
                             + "); use another output folder or the same options")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.history = list(state["history"])
        # RNG states are CPU byte tensors, whatever map_location moved the checkpoint to
        torch.set_rng_state(state["cpu_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint atomically (a crash mid-write leaves the previous one intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


def _failing_line(error: BaseException) -> str:
    """``file:line`` of the innermost frame of ``error``'s traceback outside torch (the op that synced)."""
    where = "?"
    for frame, line in traceback.walk_tb(error.__traceback__):
        path = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in path:
            where = f"{os.sep.join(Path(path).parts[-3:])}:{line}"
    return where


class _StepGraph:
    """One batch shape's step (``Distiller._losses_and_gradients``) captured into a CUDA graph: a static
    input buffer; the loss terms, the gradient norm and the parameters' gradients in the graph's memory
    pool, rewritten by every replay."""

    def __init__(self, distiller: Distiller, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        distiller.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them, in its pool
        with collecting() as self.kept:  # tensors process-wide caches handed the step live as long as the graph
            self.terms, self.grad_norm = capture(self.graph, lambda: distiller._losses_and_gradients(self.input_ids))

    def fits(self, input_ids: torch.Tensor) -> bool:
        return input_ids.shape == self.input_ids.shape and input_ids.dtype == self.input_ids.dtype

    def replay(self, input_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.terms, self.grad_norm


def _write_log(out_dir: Path, history: list[dict[str, float]]) -> None:
    tmp = out_dir / (LOG + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, out_dir / LOG)


def distill(
    teacher: nn.Module,
    train_tokens: torch.Tensor,
    config: DistillConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
    stop_after: int | None = None,
    trainer: type[Distiller] | None = None,
) -> Distiller:
    """Distil ``teacher`` into ``config.method`` for ``config.steps`` steps on windows of
    ``train_tokens`` (1-D token ids); returns the :class:`Distiller` (``.student``, ``.history``).

    With ``out_dir``: resumes from ``out_dir/checkpoint.pt`` when it exists, writes the
    checkpoint every ``checkpoint_every`` steps and at the end, and ``log.jsonl`` (one row per
    step). ``stop_after``: stop after this many steps of this call (an interruption, for tests).
    ``trainer``: the :class:`Distiller` subclass to run (default Distiller).
    """
    distiller = (trainer or Distiller)(teacher, config)
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None and (folder / CHECKPOINT).exists():
        distiller.load(folder / CHECKPOINT)
    start = distiller.step_count
    last_saved = start
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"distil {config.method}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))
        task = bar.add_task("steps", total=config.steps, completed=start, loss="")
        bar.start()
    try:
        done_here = 0
        while distiller.step_count < config.steps:
            if stop_after is not None and done_here >= stop_after:
                break
            batch = train_batch(train_tokens, step=distiller.step_count, batch_size=config.batch_size,
                                seq_len=config.seq_len, seed=config.seed)
            row = distiller.step(batch)
            done_here += 1
            if on_step is not None:
                on_step(row)
            if bar is not None:
                bar.update(task, completed=distiller.step_count, loss=f"loss {row['total']:.4g}")
            if folder is not None and distiller.step_count - last_saved >= config.checkpoint_every:
                distiller.save(folder / CHECKPOINT)
                _write_log(folder, distiller.history)
                last_saved = distiller.step_count
    finally:
        if bar is not None:
            bar.stop()
        if folder is not None and distiller.step_count > last_saved:
            distiller.save(folder / CHECKPOINT)
            _write_log(folder, distiller.history)
    return distiller


class LanguageModelTuner(Distiller):
    """A :class:`Distiller` whose loss is the student's next-token loss alone: the teacher is not
    run and no attention is captured (a fine-tune, not a distillation)."""

    def losses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:   # no padding
            valid = torch.ones_like(input_ids, dtype=torch.bool)
            attention_mask = hf.unpadded_mask(*input_ids.shape, causal=True, device=device)
        else:
            attention_mask = attention_mask.to(device)
            valid = attention_mask.bool()
        with autocast(device, self.config.precision):
            logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        task = next_token_loss(logits, input_ids, valid)
        return {"task": task, "total": task}


def finetune(
    model: nn.Module,
    train_tokens: torch.Tensor,
    config: DistillConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """``model`` (a causal LM) fine-tuned on windows of ``train_tokens`` with its next-token loss
    alone, for ``config.steps`` steps of ``config``'s optimizer, schedule and precision (its
    weights at ``lr · pretrained_lr_scale``). Returns (a new model, frozen and in eval mode; the
    per-step history) and leaves ``model`` untouched.

    This is how the SEA paper's teachers were made (OPT fine-tuned on Wikitext-2 before any
    distillation): a student distilled from it is compared with a teacher that knows the domain as
    well as it does. It runs as a ``softmax`` student of ``model`` (:class:`LanguageModelTuner`),
    so it checkpoints and resumes from ``out_dir`` like :func:`distill`; a checkpoint there of
    another recipe, or of more steps, raises ValueError."""
    if not hf.is_causal_model(model):
        raise ValueError(f"model: expected a causal LM (fine-tuning uses the next-token loss), got the encoder "
                         f"{type(model).__name__}")
    tuning = DistillConfig(**(config.as_dict() | {"method": "softmax", "options": {}, "weights": None}))
    distiller = distill(model, train_tokens, tuning, out_dir=out_dir, progress=progress, trainer=LanguageModelTuner)
    if distiller.step_count != tuning.steps:  # a constant schedule's checkpoint may have gone further
        raise ValueError(f"out_dir: {out_dir} holds a fine-tune of {distiller.step_count} steps, not {tuning.steps}")
    distiller.optimizer.zero_grad(set_to_none=True)  # the last step's gradients: as large as the model
    tuned = hf.unpatch(distiller.student)  # the softmax method has no parameters: nothing is lost
    return tuned.eval().requires_grad_(False), distiller.history


# ----------------------------------------------------------------------------- evaluation


def _eval_batches(models: tuple[nn.Module, ...], tokens: torch.Tensor, *, seq_len: int, batch_size: int,
                  precision: str, max_windows: int | None):
    """Yield ``(B, seq_len)`` id batches of the non-overlapping evaluation windows, on the first
    model's device, with every model in eval mode (their modes are restored afterwards)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    windows = eval_windows(tokens, seq_len=seq_len, max_windows=max_windows)
    device = model_device(models[0])
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        for i in range(0, windows.shape[0], batch_size):
            yield windows[i:i + batch_size].to(device)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 1,
    precision: str = "bf16",
    max_windows: int | None = None,
) -> dict[str, float]:
    """Perplexity of a causal LM on non-overlapping ``seq_len`` windows of ``tokens``:
    ``exp(Σ nll / Σ predicted tokens)`` (each window predicts its tokens 2..seq_len)."""
    total_nll, count, windows = 0.0, 0, 0
    start = time.perf_counter()
    for ids in _eval_batches((model,), tokens, seq_len=seq_len, batch_size=batch_size, precision=precision,
                             max_windows=max_windows):
        with autocast(ids.device, precision):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                                reduction="sum")
        total_nll += float(nll)
        count += ids[:, 1:].numel()
        windows += ids.shape[0]
    return {"ppl": math.exp(total_nll / count), "nll_per_token": total_nll / count, "tokens": count,
            "windows": windows, "seconds": time.perf_counter() - start}


@torch.no_grad()
def hidden_agreement(
    teacher: nn.Module,
    student: nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 1,
    precision: str = "bf16",
    max_windows: int | None = None,
) -> dict[str, float]:
    """For encoders (no language-model head): mean cosine similarity between the teacher's and
    the student's last hidden states, per token and for the mean-pooled window embedding."""
    token_cos, pooled_cos, count, windows = 0.0, 0.0, 0, 0
    for ids in _eval_batches((student, teacher), tokens, seq_len=seq_len, batch_size=batch_size,
                             precision=precision, max_windows=max_windows):
        mask = torch.ones_like(ids)
        with autocast(ids.device, precision):
            t = teacher(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            s = student(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        token_cos += float(torch.nn.functional.cosine_similarity(t, s, dim=-1).sum())
        pooled_cos += float(torch.nn.functional.cosine_similarity(t.mean(1), s.mean(1), dim=-1).sum()) * ids.shape[1]
        count += ids.numel()
        windows += ids.shape[0]
    return {"token_cosine": token_cos / count, "pooled_cosine": pooled_cos / count, "tokens": count,
            "windows": windows}
