"""The teacher-versus-methods comparison behind ``approxattn distill run``.

For one pretrained teacher (SmolLM2-135M or MiniLM-L6, loaded offline through
:func:`approxattn.lab.models.load_model`): evaluate the teacher on the held-out KJV split, then
distil each method with the *same* budget (steps, batch, sequence length, optimizer) and
evaluate it on the same windows. Causal LMs report perplexity; encoders (no LM head) report the
cosine similarity of the student's last hidden states to the teacher's.

Everything is written as it happens into the output folder — ``results.json`` (rewritten
atomically after each model), ``table.md``, and per method ``<label>/checkpoint.pt`` and
``log.jsonl`` — so an interrupted run loses nothing: running the same command again skips the
finished methods and resumes the unfinished one from its checkpoint.

``time_budget`` (seconds of training for all methods together) sizes the run: a few timed steps
of every method, then ``steps = min(steps, budget / Σ seconds per step)`` for all of them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import hf
from ..kernels import kernels_enabled
from .data import SPLITS, TRAIN_SPLITS, split_text, token_stream
from .trainer import (
    CHECKPOINT,
    DistillConfig,
    Distiller,
    distill,
    finetune,
    hidden_agreement,
    perplexity,
    student_options,
)

RESULTS = "results.json"
TABLE = "table.md"
TEACHERS = ("smollm2", "minilm", "kjv-tiny")
FINETUNED_TEACHER = "teacher_finetuned"  # the folder of --finetune-teacher's checkpoint


def method_label(method: str, options: dict[str, Any]) -> str:
    """e.g. ``performer(kernel=relu,num_features=256)``."""
    if not options:
        return method
    return method + "(" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + ")"


def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def _lab_teacher(name: str, out_dir: Path):
    from ..lab.models import load_model

    return load_model(name)


def _kjv_teacher(name: str, out_dir: Path):
    from .kjv_teacher import TeacherConfig, load_kjv_teacher

    return load_kjv_teacher(out_dir / "teacher", TeacherConfig(seq_len=512, batch_size=4, steps=600))


# teacher name → loader(name, out_dir) → (model, tokenizer). The lab's real models, or a small
# softmax Llama trained here on the KJV train split (cached in out_dir/teacher) where SmolLM2
# does not fit the budget.
TEACHER_LOADERS = {"smollm2": _lab_teacher, "minilm": _lab_teacher, "kjv-tiny": _kjv_teacher}


def load_teacher(name: str, *, num_layers: int | None = None, device: str | torch.device = "cpu",
                 out_dir: str | os.PathLike = "distill-report"):
    """(teacher model on ``device``, frozen, eval mode; tokenizer). ``num_layers`` truncates it."""
    if name not in TEACHERS:
        raise ValueError(f"teacher: expected one of {TEACHERS}, got {name!r}")
    model, tokenizer = TEACHER_LOADERS[name](name, Path(out_dir))
    if num_layers is not None:
        import copy

        model = hf.truncate_layers(copy.deepcopy(model), num_layers)
    return model.to(device).eval().requires_grad_(False), tokenizer


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"cpu {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (perplexity for causal LMs, cosine for encoders)."""
    causal = results.get("causal", True)
    teacher = results.get("teacher") or {}
    lines = []
    if causal:
        lines.append("| model | steps | train tokens | held-out PPL | × teacher | train s | final loss |")
        lines.append("|---|---|---|---|---|---|---|")
        tuned_steps = _finetune_steps(results)
        base = (results.get("base_teacher") or {}).get("ppl")
        if tuned_steps and base and teacher.get("ppl"):
            lines.append(f"| base teacher ({results['teacher_name']}, not fine-tuned) | - | - | {_fmt(base)} | "
                         f"{_fmt(base / teacher['ppl'], 3)} | - | - |")
        if teacher:
            tuned_batch = (results.get("teacher_finetune") or {}).get("batch_size")
            batch_note = f" of batch {tuned_batch}" if tuned_batch not in (None, results.get("config", {}).get(
                "batch_size")) else ""
            name = results["teacher_name"] + (f", fine-tuned {tuned_steps} steps{batch_note} on the "
                                              f"{_train_split_name(results)} split" if tuned_steps else "")
            lines.append(f"| teacher ({name}, exact softmax) | - | - | {_fmt(teacher.get('ppl'))} | 1.000 | - | - |")
        for row in results.get("methods", {}).values():
            ratio = row["eval"]["ppl"] / teacher["ppl"] if teacher.get("ppl") else None
            # three decimals: targets such as "within 5 %" sit at the second
            lines.append(f"| {row['label']} | {row['steps']} | {row['train_tokens']} | {_fmt(row['eval']['ppl'])} | "
                         f"{_fmt(ratio, 3)} | {_fmt(row['train_seconds'], 0)} | {_fmt(row.get('final_loss'), 4)} |")
    else:
        lines.append("| model | steps | train tokens | token cosine to teacher | pooled cosine | train s | final loss |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in results.get("methods", {}).values():
            lines.append(f"| {row['label']} | {row['steps']} | {row['train_tokens']} | "
                         f"{_fmt(row['eval']['token_cosine'], 4)} | {_fmt(row['eval']['pooled_cosine'], 4)} | "
                         f"{_fmt(row['train_seconds'], 0)} | {_fmt(row.get('final_loss'), 4)} |")
    held = results.get("heldout", {})
    cfg = results.get("config", {})
    lines.append("")
    lines.append(f"Teacher {results.get('teacher_name')} ({results.get('teacher_layers')} layers); held-out: "
                 f"{held.get('description')}, {held.get('windows')} non-overlapping windows of {cfg.get('seq_len')} "
                 f"tokens; precision {cfg.get('precision')}, batch {cfg.get('batch_size')}, lr {cfg.get('lr')} "
                 f"(new ×{cfg.get('new_lr_scale')}, pretrained ×{cfg.get('pretrained_lr_scale')}).")
    split = results.get("train_split") or {}
    lines.append(f"Students trained on {split.get('description', SPLITS['train'])} "
                 f"({split.get('tokens', '?')} tokens); rows labelled [train_split=…] on the other split.")
    lines.append(f"Device: {results.get('device')}; date {results.get('date')}; command: `{results.get('command')}`")
    return "\n".join(lines) + "\n"


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' results (e.g. one process per method) as one: the first run's header and
    teacher, every run's methods. The runs must share the teacher and its held-out evaluation,
    otherwise their perplexities are not comparable (ValueError). The table's footnote gives the
    first run's recipe, so every row of a run trained otherwise is labelled by what differs, and
    the device line names every device the runs used."""
    if not parts:
        raise ValueError("parts: expected at least one results dict")
    merged = json.loads(json.dumps(parts[0]))
    merged.setdefault("methods", {})
    for other in parts[1:]:
        for key in ("teacher_name", "heldout"):
            if other.get(key) != merged.get(key):
                raise ValueError(f"results: {key} differs between runs ({merged.get(key)!r} vs {other.get(key)!r})")
        if _finetune_steps(other) != _finetune_steps(merged):
            raise ValueError(f"results: the teacher was fine-tuned for {_finetune_steps(merged)} steps in one run and "
                             f"{_finetune_steps(other)} in another; their students distilled from different teachers")
        mine, theirs = (merged.get("teacher") or {}).get("ppl"), (other.get("teacher") or {}).get("ppl")
        if mine is not None and theirs is not None and abs(mine - theirs) > 1e-3 * mine:
            raise ValueError(f"results: teacher perplexity differs between runs ({mine} vs {theirs})")
        recipe = _recipe_difference(_recipe(parts[0]), _recipe(other))
        for label, row in other.get("methods", {}).items():
            if recipe:
                label = f"{label} [{recipe}]"  # trained otherwise than the footnote says: say how
                row = row | {"label": label}
            if label in merged["methods"]:
                raise ValueError(f"results: method {label!r} appears in more than one run with the same options")
            merged["methods"][label] = row
        device = other.get("device")
        if device and device not in (merged.get("device") or "").split(" | "):
            merged["device"] = f"{merged['device']} | {device}" if merged.get("device") else device
        if other.get("command") != merged.get("command"):
            merged["command"] = f"{merged.get('command')} ; {other.get('command')}"
    return merged


def _train_split_name(results: dict[str, Any]) -> str:
    """The split a run trained on (runs from before ``train_split`` was recorded: 'train')."""
    return (results.get("train_split") or {}).get("name", "train")


def _finetune_steps(results: dict[str, Any]) -> int:
    """Steps the run fine-tuned its teacher for before distilling (0: the teacher as loaded)."""
    return int((results.get("teacher_finetune") or {}).get("steps", 0))


def _recipe(results: dict[str, Any]) -> dict[str, Any]:
    """A run's training options, its train split, and whether its students ran the fused kernels
    (None: not recorded). Options a run predates take their defaults, which is how it ran (e.g. no
    ``lr_schedule``: constant), so they do not label rows as different."""
    config = DistillConfig().as_dict() | (results.get("config") or {})
    return config | {"kernels": results.get("kernels"), "train_split": _train_split_name(results)}


def _recipe_difference(first: dict[str, Any], other: dict[str, Any]) -> str:
    """``"lr=3e-05, lr_schedule=cosine"``: the training options in which ``other`` differs from ``first``."""
    keys = sorted(k for k in set(first) | set(other) if k not in ("method", "options", "checkpoint_every")
                  and first.get(k) != other.get(k))
    return ", ".join(f"{k}={other.get(k)}" for k in keys)


def _training_seconds(history: list[dict[str, float]], started: float) -> float:
    """Seconds of training: every step's own time when the history has them (those of earlier calls
    of a resumed run included), else the wall time since ``started``."""
    if history and all("seconds" in row for row in history):
        return sum(row["seconds"] for row in history)
    return time.perf_counter() - started


def _final_loss(history: list[dict[str, float]], last: int = 10) -> float | None:
    if not history:
        return None
    tail = history[-last:]
    return sum(row["total"] for row in tail) / len(tail)


def run_experiment(
    *,
    teacher: str,
    methods: list[tuple[str, dict[str, Any]]],
    config: DistillConfig,
    out_dir: str | os.PathLike,
    eval_max_windows: int | None = None,
    num_layers: int | None = None,
    time_budget: float | None = None,
    calibration_steps: int = 3,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
    train_split: str = "train",
    finetune_teacher_steps: int = 0,
    finetune_batch_size: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the comparison; returns the results dict also written to ``out_dir``.
    ``train_split``: the text the students train on, 'train' (the lab's 96 K-token KJV excerpt) or
    'train-full' (Genesis to Philemon, ~1 M tokens); the held-out books are the same for both.
    ``finetune_teacher_steps`` > 0 (causal teachers): first fine-tune the teacher on the same text
    with its next-token loss alone (:func:`~approxattn.distill.trainer.finetune`, ``config``'s
    recipe for that many steps; checkpointed in ``out_dir/teacher_finetuned``), then distil every
    student from the fine-tuned teacher, as the SEA paper did; the loaded teacher's perplexity is
    reported beside it as the base teacher. ``finetune_batch_size``: the fine-tune's batch (None: the
    students' ``config.batch_size``), so that students of a larger batch can keep an earlier run's
    teacher. ``time_budget`` sizes the students' training only."""
    if not methods:
        raise ValueError("methods: expected at least one method")
    if train_split not in TRAIN_SPLITS:
        raise ValueError(f"train_split: expected one of {TRAIN_SPLITS}, got {train_split!r}")
    if isinstance(finetune_teacher_steps, bool) or not isinstance(finetune_teacher_steps, int) \
            or finetune_teacher_steps < 0:
        raise ValueError(f"finetune_teacher_steps (--finetune-teacher): expected an int >= 0, got "
                         f"{finetune_teacher_steps!r}")
    if finetune_batch_size is not None and (isinstance(finetune_batch_size, bool)
                                            or not isinstance(finetune_batch_size, int) or finetune_batch_size < 1):
        raise ValueError(f"finetune_batch_size (--finetune-batch-size): expected an int >= 1 or None, got "
                         f"{finetune_batch_size!r}")
    finetune_batch_size = finetune_batch_size or config.batch_size
    if 0 < finetune_teacher_steps <= config.warmup_steps:
        raise ValueError(f"finetune_teacher_steps (--finetune-teacher): expected more steps than the "
                         f"{config.warmup_steps} warm-up steps, got {finetune_teacher_steps}")
    # each method's options with the distillation defaults, so labels and results show them
    methods = [(method, student_options(method, options)) for method, options in methods]
    for method, options in methods:
        DistillConfig(**(config.as_dict() | {"method": method, "options": options,
                                              "weights": config.weights})).validate()
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget: expected seconds > 0 or None, got {time_budget!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if results and results.get("teacher_name") != teacher:
        raise ValueError(f"out_dir: {out} holds results for teacher {results.get('teacher_name')!r}, not {teacher!r}")
    if results and _train_split_name(results) != train_split:
        raise ValueError(f"train_split (--train-split): {out} holds students trained on the "
                         f"{_train_split_name(results)!r} split, not {train_split!r}; use another output folder")
    if results and _finetune_steps(results) != finetune_teacher_steps:
        raise ValueError(f"finetune_teacher_steps (--finetune-teacher): {out} holds students of a teacher fine-tuned "
                         f"for {_finetune_steps(results)} steps, not {finetune_teacher_steps}; use another output folder")
    model, tokenizer = load_teacher(teacher, num_layers=num_layers, device=device, out_dir=out)
    causal = hf.is_causal_model(model)
    if finetune_teacher_steps and not causal:
        raise ValueError(f"finetune_teacher_steps (--finetune-teacher): expected a causal LM teacher (the fine-tune "
                         f"uses the next-token loss), got the encoder {teacher!r}")
    results.update({
        "teacher_name": teacher,
        "teacher_layers": len(hf.attention_modules(model)),
        "causal": causal,
        "config": config.as_dict() | {"method": None, "options": None},
        "device": device_description(device),
        "date": datetime.date.today().isoformat(),
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "transformers": __import__("transformers").__version__,
        # the students' fused Triton kernels (CUDA, unless APPROXATTN_DISABLE_KERNELS=1): same maths, other speed
        "kernels": kernels_enabled(torch.empty(0, device=device)),
    })
    results.setdefault("methods", {})

    def save() -> None:
        _write_json(path, results)
        (out / TABLE).write_text(markdown_table(results))

    log(f"tokenising the KJV {train_split} and held-out splits with {teacher}'s tokenizer")
    train_tokens = token_stream(tokenizer, split_text(train_split))
    heldout_tokens = token_stream(tokenizer, split_text("heldout"))
    seq_len = config.seq_len
    results["train_split"] = {"name": train_split, "description": SPLITS[train_split],
                              "tokens": int(train_tokens.numel())}

    def evaluate(student: torch.nn.Module) -> dict[str, float]:  # a student, or a causal teacher itself
        if causal:
            return perplexity(student, heldout_tokens, seq_len=seq_len, batch_size=config.batch_size,
                              precision=config.precision, max_windows=eval_max_windows)
        return hidden_agreement(model, student, heldout_tokens, seq_len=seq_len, batch_size=config.batch_size,
                                precision=config.precision, max_windows=eval_max_windows)

    if finetune_teacher_steps:
        if "base_teacher" not in results:
            log("evaluating the base teacher on the held-out split")
            results["base_teacher"] = evaluate(model)
            log(f"base teacher held-out perplexity {results['base_teacher']['ppl']:.3f}")
        folder = out / FINETUNED_TEACHER
        if "teacher_finetune" in results and not (folder / CHECKPOINT).exists():
            # the recorded teacher perplexity (and every student) came from that checkpoint
            raise ValueError(f"finetune_teacher_steps (--finetune-teacher): {out} holds students of a teacher "
                             f"fine-tuned in {folder}, whose {CHECKPOINT} is gone; use another output folder")
        log(f"fine-tuning the teacher on the {train_split} split (or loading it from {folder}): "
            f"{finetune_teacher_steps} steps, next-token loss")
        start = time.perf_counter()
        tuning = DistillConfig(**(config.as_dict() | {"steps": finetune_teacher_steps, "batch_size": finetune_batch_size,
                                                       "weights": config.weights}))
        try:
            tuned, history = finetune(model, train_tokens, tuning, out_dir=folder, progress=progress)
        except ValueError as error:  # a checkpoint of another recipe or length in the folder
            raise ValueError(f"finetune_teacher_steps (--finetune-teacher): {folder} holds a fine-tune of another "
                             f"recipe or length ({error}); the teacher's fine-tune follows the students' recipe for "
                             f"--finetune-teacher steps; use another output folder") from None
        model.to("cpu")  # the base teacher (maybe the loader's cached object) off the device while students train
        model = tuned
        results["teacher_finetune"] = {
            "steps": finetune_teacher_steps, "batch_size": finetune_batch_size, "loss": "next-token cross-entropy only",
            "train_seconds": _training_seconds(history, start),
            "final_loss": _final_loss(history), "folder": FINETUNED_TEACHER,
        }
    if causal and "teacher" not in results:
        log("evaluating the teacher on the held-out split")
        results["teacher"] = evaluate(model)
        log(f"teacher held-out perplexity {results['teacher']['ppl']:.3f}")
    windows = results["teacher"]["windows"] if causal else min(heldout_tokens.numel() // seq_len,
                                                                eval_max_windows or 10**9)
    results["heldout"] = {"description": "KJV Hebrews to Revelation", "tokens": int(heldout_tokens.numel()),
                          "windows": windows}
    save()

    pending = [(m, o) for m, o in methods if method_label(m, o) not in results["methods"]]
    steps = config.steps
    if time_budget is not None and "calibrated_steps" not in results and pending:
        seconds = {}
        for method, options in pending:
            label = method_label(method, options)
            cfg = DistillConfig(**(config.as_dict() | {"method": method, "options": options, "weights": config.weights}))
            probe = Distiller(model, cfg)
            from .data import train_batch

            settling = probe.settling_steps   # warm-up (allocations, kernel selection) and the CUDA graph's capture
            for i in range(settling + calibration_steps):
                if i == settling:
                    _sync(device)
                    start = time.perf_counter()
                probe.step(train_batch(train_tokens, step=i, batch_size=cfg.batch_size, seq_len=seq_len,
                                       seed=cfg.seed))
            _sync(device)
            seconds[label] = (time.perf_counter() - start) / calibration_steps
            log(f"calibration: {label} {seconds[label]:.3f} s/step")
            del probe
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fit = int(time_budget / sum(seconds.values()))
        results["calibration"] = {"seconds_per_step": seconds, "time_budget": time_budget}
        results["calibrated_steps"] = max(1, min(config.steps, fit))
        log(f"calibration: {results['calibrated_steps']} steps per method fit {time_budget:.0f} s")
        save()
    if "calibrated_steps" in results:
        steps = results["calibrated_steps"]

    for method, options in pending:
        label = method_label(method, options)
        cfg = DistillConfig(**(config.as_dict() | {"method": method, "options": options, "steps": steps,
                                                    "weights": config.weights}))
        folder = out / _folder_name(label)
        log(f"distilling {label}: {steps} steps of {cfg.batch_size} x {seq_len} tokens")
        start = time.perf_counter()
        distiller = distill(model, train_tokens, cfg, out_dir=folder, progress=progress)
        _sync(device)
        train_seconds = _training_seconds(distiller.history, start)
        evaluation = evaluate(distiller.student)
        results["methods"][label] = {
            "label": label, "method": method, "options": options, "steps": distiller.step_count,
            "train_tokens": distiller.step_count * cfg.batch_size * seq_len,
            "train_seconds": train_seconds, "parameters": distiller.parameter_counts(),
            "first_loss": distiller.history[0]["total"] if distiller.history else None,
            "final_loss": _final_loss(distiller.history), "final_terms": distiller.history[-1] if distiller.history else None,
            "eval": evaluation,
        }
        shown = f"PPL {evaluation['ppl']:.3f}" if causal else f"token cosine {evaluation['token_cosine']:.4f}"
        log(f"{label}: {shown} ({train_seconds:.0f} s training)")
        save()
        del distiller
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
