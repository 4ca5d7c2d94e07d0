"""approxattn.distill: losses, training (loss decreases, resume = uninterrupted), evaluation, data
split, option errors and the ``approxattn distill`` command (tiny random Llama; MiniLM for the CLI)."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import approxattn  # noqa: E402
from approxattn.distill import (  # noqa: E402
    DistillConfig,
    Distiller,
    LossWeights,
    attention_kl,
    distill,
    eval_windows,
    finetune,
    lr_factor,
    perplexity,
    split_text,
    train_batch,
)
from approxattn.distill.cli import main as distill_main, parse_method_options  # noqa: E402
from approxattn.lab.models import MODELS, model_available  # noqa: E402

VOCAB = 61


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def tiny_teacher(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2)  # large weights: peaked attention, worth distilling
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def stream(n: int = 4000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_attention_kl_matches_torch_and_ignores_padded_rows():
    p = torch.softmax(torch.randn(2, 3, 5, 7), dim=-1)
    log_q = torch.log_softmax(torch.randn(2, 3, 5, 7), dim=-1)
    expected = F.kl_div(log_q, p, reduction="sum") / (2 * 3 * 5)
    assert float(attention_kl(p, log_q, None)) == pytest.approx(float(expected), rel=1e-5)
    assert float(attention_kl(p, p.log(), None)) == pytest.approx(0.0, abs=1e-6)
    rows = torch.ones(2, 1, 5, 1, dtype=torch.bool)
    rows[1, :, :2] = False
    garbage = log_q.clone()
    garbage[1, :, :2] = -50.0  # rows that are padding must not count
    assert float(attention_kl(p, garbage, rows)) == pytest.approx(float(attention_kl(p, log_q, rows)), rel=1e-6)


def test_distillation_loss_decreases():
    teacher = tiny_teacher()
    tokens = stream()
    config = DistillConfig(method="performer", options={"num_features": 32, "redraw": "never"}, steps=60,
                           seq_len=16, batch_size=2, lr=1e-2, precision="fp32",
                           weights=LossWeights(task=0.0, hidden=5.0, logits=0.2))
    probe = train_batch(tokens, step=10_000, batch_size=4, seq_len=16, seed=1)  # never trained on
    before = Distiller(teacher, config)
    with torch.no_grad():
        start = {k: float(v) for k, v in before.losses(probe).items()}
    after = distill(teacher, tokens, config)
    with torch.no_grad():
        end = {k: float(v) for k, v in after.losses(probe).items()}
    assert set(start) == {"task", "logits", "hidden", "dense", "context", "total"}  # performer: no estimator
    assert end["total"] < 0.8 * start["total"]
    assert all(end[term] < start[term] for term in ("hidden", "logits", "dense", "context"))
    # the teacher is untouched
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config._attn_implementation != approxattn.hf.IMPLEMENTATION


def test_estimator_loss_appears_exactly_for_methods_with_details():
    teacher = tiny_teacher()
    batch = train_batch(stream(), step=0, batch_size=1, seq_len=16, seed=0)
    for method, options in approxattn.available_methods().items():
        if method not in ("linear", "sea"):
            continue
        opts = {"k": 4, "columns": 8, "num_features": 8} if method == "sea" else {}
        d = Distiller(teacher, DistillConfig(method=method, options=opts, seq_len=16, precision="fp32"))
        terms = d.losses(batch)
        has_estimator = hasattr(approxattn.hf.attached_modules(d.student)[0], "forward_with_details")
        assert ("estimate" in terms) == has_estimator
        assert torch.isfinite(terms["total"])


def test_random_features_stay_fixed_unless_a_redraw_is_asked_for():
    """A redraw on one of the last steps evaluates the student on features it never trained with
    (the 1,000-step SmolLM2 runs hit the methods' every-1,000-calls default on their last step)."""
    assert DistillConfig(method="performer").options == {"redraw": "never"}
    assert DistillConfig(method="sea", options={"k": 4}).options == {"k": 4, "redraw": "never"}
    assert DistillConfig(method="performer", options={"redraw": 3}).options == {"redraw": 3}
    assert DistillConfig(method="linear").options == {}           # no random features: nothing added
    from approxattn.registry import get_method
    never = [m for m in approxattn.available_methods()
             if any(o.name == "redraw" and o.default == "never" for o in get_method(m).options)]
    assert never and all(DistillConfig(method=m).options == {} for m in never)  # never redrawn anyway: label kept
    with pytest.raises(ValueError, match="unknown method"):
        DistillConfig(method="nope").validate()
    teacher, tokens = tiny_teacher(), stream()
    for options, draws in (({"num_features": 8}, 0), ({"num_features": 8, "redraw": 3}, 1)):
        config = DistillConfig(method="performer", options=options, steps=3, seq_len=16, batch_size=1,
                               precision="fp32")
        student = distill(teacher, tokens, config).student
        modules = approxattn.hf.attached_modules(student)
        assert modules and all(int(m.feature_draws) == draws for m in modules)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    teacher = tiny_teacher()
    tokens = stream()
    config = DistillConfig(method="performer", options={"num_features": 16, "redraw": 2}, steps=6, seq_len=16,
                           lr=1e-3, precision="fp32", checkpoint_every=2)
    whole = distill(teacher, tokens, config, out_dir=tmp_path / "whole")
    part = distill(teacher, tokens, config, out_dir=tmp_path / "split", stop_after=3)  # "interrupted"
    assert part.step_count == 3 and (tmp_path / "split" / "checkpoint.pt").exists()
    resumed = distill(teacher, tokens, config, out_dir=tmp_path / "split")
    assert resumed.step_count == 6
    assert [r["total"] for r in resumed.history] == [r["total"] for r in whole.history]
    stamps = [r["unix_time"] for r in resumed.history]   # when each step ended, kept across the resume
    assert stamps == sorted(stamps) and stamps[2] == part.history[2]["unix_time"]
    for (name, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    lines = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))
    # a finished run resumes to itself; other options in the same folder are refused
    assert distill(teacher, tokens, config, out_dir=tmp_path / "split").step_count == 6
    other = DistillConfig(**(config.as_dict() | {"lr": 2e-3, "weights": None}))
    with pytest.raises(ValueError, match="lr"):
        distill(teacher, tokens, other, out_dir=tmp_path / "split")


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@given(steps=st.integers(2, 400), warmup_fraction=st.floats(0, 0.99), min_ratio=st.floats(0, 1))
@settings(max_examples=30, deadline=None)
def test_lr_factor_warms_up_peaks_once_and_ends_at_the_floor(schedule, steps, warmup_fraction, min_ratio):
    warmup = min(steps - 1, int(warmup_fraction * steps))
    config = DistillConfig(steps=steps, lr_schedule=schedule, warmup_steps=warmup, min_lr_ratio=min_ratio)
    config.validate()
    factors = [lr_factor(config, s) for s in range(steps)]
    assert all(0 < f <= 1 for f in factors[:warmup]) and factors[warmup - 1 if warmup else 0] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:warmup], factors[1:warmup]))            # warm-up rises
    after = factors[warmup:]
    assert after[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))                       # then never rises
    if schedule == "constant":
        assert after == [1.0] * len(after)
    elif len(after) > 1:
        assert after[-1] == pytest.approx(min_ratio) and min(after) >= min_ratio - 1e-12


def test_sigterm_saves_the_steps_done_and_the_run_resumes(tmp_path):
    """A SIGTERM (``timeout``, a reclaimed machine) between checkpoints: under the CLI's handler it
    interrupts like Ctrl-C, the checkpoint holds every step done (4, with checkpoints every 100), the
    resume gives the uninterrupted result, and the previous SIGTERM handler is back afterwards."""
    import os
    import signal

    from approxattn.distill.cli import sigterm_as_interrupt

    teacher, tokens = tiny_teacher(), stream()
    config = DistillConfig(method="performer", options={"num_features": 16}, steps=6, seq_len=16, lr=1e-3,
                           precision="fp32", checkpoint_every=100)
    whole = distill(teacher, tokens, config)

    def terminate_at_four(row):
        terminate_at_four.calls += 1
        if terminate_at_four.calls == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    terminate_at_four.calls = 0
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        distill(teacher, tokens, config, out_dir=tmp_path, on_step=terminate_at_four)
    assert signal.getsignal(signal.SIGTERM) is before
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    resumed = distill(teacher, tokens, config, out_dir=tmp_path)
    assert [r["total"] for r in resumed.history] == [r["total"] for r in whole.history]


def test_sigterm_inside_a_step_waits_for_its_end(tmp_path, monkeypatch):
    """A SIGTERM that lands mid-step (on the GPU: while the host waits for the step's loss values) is
    raised after the step: its update, its count and its log row stay together (session 20 lost a row)."""
    import os
    import signal

    from approxattn.distill.cli import sigterm_as_interrupt

    teacher, tokens = tiny_teacher(), stream()
    config = DistillConfig(method="performer", options={"num_features": 16}, steps=5, seq_len=16, lr=1e-3,
                           precision="fp32", checkpoint_every=100)
    whole = distill(teacher, tokens, config)
    losses = Distiller.losses

    def terminated_in_the_third(self, *args, **kwargs):
        terminated_in_the_third.calls += 1
        if terminated_in_the_third.calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses(self, *args, **kwargs)

    terminated_in_the_third.calls = 0
    monkeypatch.setattr(Distiller, "losses", terminated_in_the_third)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        distill(teacher, tokens, config, out_dir=tmp_path)
    monkeypatch.setattr(Distiller, "losses", losses)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    resumed = distill(teacher, tokens, config, out_dir=tmp_path)
    assert [r["total"] for r in resumed.history] == [r["total"] for r in whole.history]


def test_the_optimizer_runs_the_schedule_and_a_resume_follows_it(tmp_path):
    teacher = tiny_teacher()
    tokens = stream()
    config = DistillConfig(method="performer", options={"num_features": 16, "redraw": 2}, steps=6, seq_len=16,
                           lr=1e-3, precision="fp32", checkpoint_every=2, lr_schedule="cosine", warmup_steps=2,
                           min_lr_ratio=0.1)
    whole = distill(teacher, tokens, config, out_dir=tmp_path / "whole")
    expected = [lr_factor(config, s) for s in range(6)]
    assert [row["lr_factor"] for row in whole.history] == expected
    assert expected[0] == 0.5 and expected[1] == 1.0 and expected[-1] == pytest.approx(0.1)
    for group in whole.optimizer.param_groups:  # the last step ran at the floor
        assert group["lr"] == pytest.approx(whole.peak_lr[group["name"]] * 0.1)
    distill(teacher, tokens, config, out_dir=tmp_path / "split", stop_after=3)
    resumed = distill(teacher, tokens, config, out_dir=tmp_path / "split")
    assert [r["total"] for r in resumed.history] == [r["total"] for r in whole.history]
    assert all(r["seconds"] > 0 for r in resumed.history)   # the first call's steps kept their times
    # a decaying schedule depends on the number of steps: going on for more is refused
    longer = DistillConfig(**(config.as_dict() | {"steps": 8, "weights": None}))
    with pytest.raises(ValueError, match="steps"):
        distill(teacher, tokens, longer, out_dir=tmp_path / "split")


@pytest.mark.gpu
def test_resume_on_cuda(tmp_path):
    """A checkpoint loads onto the GPU (``map_location``), and its RNG states, which that moved
    there too, still restore (the first SmolLM2 run's resume failed on exactly this)."""
    teacher = tiny_teacher().cuda()
    tokens = stream()
    config = DistillConfig(method="sea", options={"k": 4, "columns": 8, "num_features": 8}, steps=4, seq_len=32, lr=1e-3,
                           precision="bf16", checkpoint_every=2)
    whole = distill(teacher, tokens, config, out_dir=tmp_path / "whole")
    distill(teacher, tokens, config, out_dir=tmp_path / "split", stop_after=2)
    resumed = distill(teacher, tokens, config, out_dir=tmp_path / "split")
    assert resumed.step_count == 4
    torch.testing.assert_close(torch.tensor([r["total"] for r in resumed.history]),
                               torch.tensor([r["total"] for r in whole.history]), rtol=1e-3, atol=0)


def test_a_redraw_schedule_keeps_the_step_eager():
    """A CUDA graph would replay the captured call's redraw decision (made on the host) every step."""
    teacher = tiny_teacher()
    assert Distiller(teacher, DistillConfig(method="performer")).graph_off is None   # redraw "never"
    assert "redraw" in Distiller(teacher, DistillConfig(method="performer", options={"redraw": 2})).graph_off
    assert Distiller(teacher, DistillConfig(method="sea", cuda_graph=False)).graph_off == "cuda_graph=False"


def _graph_and_eager(method: str, options: dict, batches: list[torch.Tensor]) -> tuple[Distiller, Distiller]:
    """The same steps on the same batches, with and without CUDA graphs (tiny teacher on the GPU, fp32)."""
    teacher = tiny_teacher().cuda()
    runs = []
    for graphed in (True, False):
        d = Distiller(teacher, DistillConfig(method=method, options=options, seq_len=32, lr=1e-3, precision="fp32",
                                             cuda_graph=graphed))
        d.initial = torch.cat([p.detach().flatten().clone() for p in d.student.parameters()])
        for batch in batches:
            d.step(batch)
        runs.append(d)
    return runs[0], runs[1]


def _assert_same_training(graphed: Distiller, eager: Distiller) -> None:
    """Same loss terms and gradient norms step by step; the weights differ by under 1 % of how far training
    moved them. (Not per weight: Adam turns a gradient near zero, whose sign two runs may round apart,
    into a full-size step, as it did once for a decoder bias on the H200: 2.5 % apart.)"""
    for term in ("total", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[term] for r in graphed.history]),
                                   torch.tensor([r[term] for r in eager.history]), rtol=1e-4, atol=0)
    assert torch.equal(graphed.initial, eager.initial)
    final = {name: torch.cat([p.detach().flatten() for p in d.student.parameters()])
             for name, d in (("graphed", graphed), ("eager", eager))}
    moved = float((final["eager"] - eager.initial).norm())
    assert moved > 0 and float((final["graphed"] - final["eager"]).norm()) < 0.01 * moved


@pytest.mark.gpu
@pytest.mark.parametrize("method, options", [("softmax", {}), ("sea", {"k": 4, "columns": 8, "num_features": 8})])
def test_cuda_graph_steps_train_as_eager_steps_do(method, options):
    """Warm-up steps, the capture, replays, and an eager step of another shape between replays (it
    must write the gradients the graph owns, not new ones) give the eager run's losses and weights."""
    tokens = stream()
    batches = [train_batch(tokens, step=s, batch_size=2, seq_len=32, seed=0) for s in range(5)]
    batches.insert(4, train_batch(tokens, step=9, batch_size=1, seq_len=24, seed=0))
    graphed, eager = _graph_and_eager(method, options, batches)
    assert [r["cuda_graph"] for r in graphed.history] == [False, False, True, True, False, True]
    assert graphed.graph_replays == 3 and not any(r["cuda_graph"] for r in eager.history)
    _assert_same_training(graphed, eager)


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_trains_eagerly(monkeypatch):
    """A host sync inside the step fails its capture: warned once, and training goes on eagerly with the
    same result (no gradient of the failed capture left behind)."""
    tokens = stream()
    batches = [train_batch(tokens, step=s, batch_size=2, seq_len=32, seed=0) for s in range(4)]
    losses = Distiller.losses

    def syncing(self, *args, **kwargs):
        terms = losses(self, *args, **kwargs)
        if float(terms["total"]) < 0:   # a read on the host: not allowed while a graph is captured
            raise AssertionError("unreachable")
        return terms

    monkeypatch.setattr(Distiller, "losses", syncing)
    with pytest.warns(RuntimeWarning, match="runs eagerly: its capture failed"):
        graphed, eager = _graph_and_eager("sea", {"k": 4, "columns": 8, "num_features": 8}, batches)
    assert graphed.graph_replays == 0 and "capture failed" in graphed.graph_off
    _assert_same_training(graphed, eager)


def test_perplexity_is_exp_mean_nll():
    teacher = tiny_teacher()
    tokens = stream(200)
    got = perplexity(teacher, tokens, seq_len=50, max_windows=3, precision="fp32")
    windows = tokens[:150].view(3, 50)
    with torch.no_grad():
        logits = teacher(windows).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert got["tokens"] == 3 * 49 and got["windows"] == 3
    assert got["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_data_split_and_windows():
    train, heldout = split_text("train"), split_text("heldout")
    assert heldout.startswith("God, who at sundry times")
    assert heldout[1000:1200] not in train and "come, Lord Jesus" in heldout
    full = split_text("train-full")   # every book before the held-out ones: the excerpt and ~10x more
    assert full.startswith(train[:2000]) and train[-300:] in full and len(full) > 9 * len(train)
    assert full.rstrip().endswith("be with your spirit. Amen.")           # Philemon, the book before Hebrews
    assert all(heldout[i:i + 200] not in full for i in range(0, len(heldout) - 200, 15_000))
    with pytest.raises(ValueError, match="split"):
        split_text("test")
    tokens = torch.arange(100)
    a = train_batch(tokens, step=3, batch_size=2, seq_len=10, seed=0)
    torch.testing.assert_close(a, train_batch(tokens, step=3, batch_size=2, seq_len=10, seed=0))
    assert not torch.equal(a, train_batch(tokens, step=4, batch_size=2, seq_len=10, seed=0))
    w = eval_windows(tokens, seq_len=30)
    assert w.shape == (3, 30) and torch.equal(w.flatten(), tokens[:90])
    with pytest.raises(ValueError, match="seq_len"):
        eval_windows(tokens, seq_len=101)


@pytest.mark.parametrize("change, match", [
    ({"method": "no-such-method"}, "unknown"),
    ({"method": "performer", "options": {"no_such_option": 1}}, "no_such_option"),
    ({"steps": 0}, "steps"),
    ({"precision": "fp16"}, "precision"),
    ({"lr": -1.0}, "lr"),
    ({"grad_clip": 0}, "grad_clip"),
    ({"hidden_loss": "l1"}, "hidden_loss"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"steps": 10, "warmup_steps": 10}, "warmup_steps"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"min_lr_ratio": float("nan")}, "min_lr_ratio"),
    ({"cuda_graph": "yes"}, "cuda_graph"),
])
def test_bad_options_raise_clear_errors(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DistillConfig(**change).validate()


def test_bad_loss_weights_and_cli_options():
    with pytest.raises(ValueError, match="hidden"):
        LossWeights(task=0.1, hidden=-1.0, logits=0.2)
    with pytest.raises(ValueError, match="unknown"):
        LossWeights(task=0.1, hidden=1.0, logits=0.2).replace(bogus=1.0)
    assert parse_method_options(["performer.num_features=64", "performer.kernel=relu"], ["performer"]) == {
        "performer": {"num_features": 64, "kernel": "relu"}}
    with pytest.raises(ValueError, match="METHOD.NAME=VALUE"):
        parse_method_options(["num_features=64"], ["performer"])
    with pytest.raises(ValueError, match="not in --methods"):
        parse_method_options(["sea.k=64"], ["performer"])
    with pytest.raises(NotImplementedError, match="causal"):
        Distiller(tiny_teacher(), DistillConfig(method="linformer"))


def test_cli_run_and_report_on_minilm(tmp_path, capsys):
    if not model_available("minilm"):
        pytest.skip(f"{MODELS['minilm'].requirement} is not installed")
    out = tmp_path / "run"
    args = ["run", "--teacher", "minilm", "--layers", "1", "--methods", "linear", "--steps", "2", "--seq-len", "32",
            "--eval-windows", "2", "--precision", "fp32", "--no-progress", "--out", str(out)]
    assert distill_main(args) == 0
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert logged and all(re.match(r"\[ *\d+ s\] ", line) for line in logged)   # seconds since the start
    assert any("distilling linear" in line for line in logged)
    results = json.loads((out / "results.json").read_text())
    row = results["methods"]["linear"]
    assert row["steps"] == 2 and 0.0 < row["eval"]["token_cosine"] <= 1.0
    assert results["causal"] is False and "teacher" not in results  # encoders: no perplexity
    assert results["kernels"] is False                                 # a CPU run: the PyTorch paths
    capsys.readouterr()
    assert distill_main(["report", str(out)]) == 0
    assert "token cosine" in capsys.readouterr().out
    assert results["train_split"]["name"] == "train"
    assert distill_main(args + ["--train-split", "train-full"]) == 2   # a resume on other text: refused
    assert "--train-split" in capsys.readouterr().err
    full = tmp_path / "full"
    assert distill_main(args[:-1] + [str(full), "--train-split", "train-full"]) == 0
    split = json.loads((full / "results.json").read_text())["train_split"]
    assert split["name"] == "train-full" and split["tokens"] > 9 * results["train_split"]["tokens"]
    assert "Genesis to Philemon" in (full / "table.md").read_text()
    assert distill_main(["run", "--teacher", "minilm", "--methods", "linear", "--option", "bad", "--out",
                         str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert distill_main(args[:-1] + [str(tmp_path / "tuned"), "--finetune-teacher", "2"]) == 2  # an encoder: refused
    assert "causal LM teacher" in capsys.readouterr().err


def _fake_results(teacher_ppl: float, label: str, ppl: float) -> dict:
    row = {"label": label, "method": label, "options": {}, "steps": 3, "train_tokens": 96, "train_seconds": 1.0,
           "final_loss": 0.5, "eval": {"ppl": ppl}}
    return {"teacher_name": "kjv-tiny", "causal": True, "teacher": {"ppl": teacher_ppl, "windows": 2},
            "heldout": {"description": "KJV Hebrews to Revelation", "tokens": 100, "windows": 2},
            "config": {"seq_len": 32}, "command": f"run {label}", "device": "GPU A", "methods": {label: row}}


def test_report_merges_runs_of_one_teacher(tmp_path, capsys):
    from approxattn.distill.experiment import merge_results

    merged = merge_results([_fake_results(10.0, "performer", 12.5), _fake_results(10.0, "linear", 11.0)])
    assert list(merged["methods"]) == ["performer", "linear"]
    assert merged["command"] == "run performer ; run linear"
    assert merged["device"] == "GPU A"
    with pytest.raises(ValueError, match="teacher perplexity"):
        merge_results([_fake_results(10.0, "performer", 12.5), _fake_results(11.0, "linear", 11.0)])
    with pytest.raises(ValueError, match="more than one run"):
        merge_results([_fake_results(10.0, "linear", 12.5), _fake_results(10.0, "linear", 11.0)])
    # the same method trained with another recipe keeps both rows, the second labelled by what differs
    cosine = _fake_results(10.0, "linear", 11.0)
    cosine["config"] = {"seq_len": 32, "lr_schedule": "cosine", "lr": 3e-5}
    both = merge_results([_fake_results(10.0, "linear", 12.5), cosine])
    assert list(both["methods"]) == ["linear", "linear [lr=3e-05, lr_schedule=cosine]"]
    with_kernels = _fake_results(10.0, "linear", 11.0) | {"kernels": True}       # the same recipe, fused kernels
    assert list(merge_results([_fake_results(10.0, "linear", 12.5), with_kernels])["methods"]) == [
        "linear", "linear [kernels=True]"]
    assert both["methods"]["linear [lr=3e-05, lr_schedule=cosine]"]["eval"]["ppl"] == 11.0
    # a method that appears once is labelled too when its run's recipe is not the footnote's (the first run's)
    other = _fake_results(10.0, "softmax", 9.0) | {"device": "GPU B"}
    other["config"] = {"seq_len": 32, "steps": 1000}
    three = merge_results([_fake_results(10.0, "linear", 12.5), other, _fake_results(10.0, "performer", 12.0)])
    assert list(three["methods"]) == ["linear", "softmax [steps=1000]", "performer"]
    assert three["device"] == "GPU A | GPU B"
    # options a run predates take their defaults (no lr_schedule recorded = constant): no label for them
    explicit = _fake_results(10.0, "performer", 12.0)
    explicit["config"] = {"seq_len": 32, "lr_schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.0}
    assert list(merge_results([_fake_results(10.0, "linear", 12.5), explicit])["methods"]) == ["linear", "performer"]
    longer = _fake_results(10.0, "linear", 10.5) | {"train_split": {"name": "train-full", "tokens": 10**6}}
    assert list(merge_results([_fake_results(10.0, "linear", 12.5), longer])["methods"]) == [
        "linear", "linear [train_split=train-full]"]
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])
    for name, part in (("a", _fake_results(10.0, "performer", 12.5)), ("b", _fake_results(10.0, "linear", 11.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    capsys.readouterr()
    assert distill_main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    assert "| performer | 3 | 96 | 12.500 | 1.250 |" in table and "| linear | 3 | 96 | 11.000 | 1.100 |" in table
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps(_fake_results(11.0, "sea", 11.0)))
    assert distill_main(["report", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert distill_main(["report", str(tmp_path / "missing")]) == 2


class ByteTokenizer:
    """Bytes modulo the tiny vocabulary: enough to run the KJV pipeline on ``tiny_teacher``."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [b % VOCAB for b in text.encode()]}


def test_finetune_lowers_the_lm_loss_resumes_and_leaves_the_model_untouched(tmp_path):
    from approxattn import hf

    teacher, tokens = tiny_teacher(), stream(3000, seed=4)
    original = {name: p.clone() for name, p in teacher.state_dict().items()}
    before = perplexity(teacher, tokens, seq_len=32, max_windows=8, precision="fp32")["ppl"]
    config = DistillConfig(steps=6, batch_size=2, seq_len=32, lr=2e-2, precision="fp32")
    tuned, history = finetune(teacher, tokens, config, out_dir=tmp_path / "ft")
    assert perplexity(tuned, tokens, seq_len=32, max_windows=8, precision="fp32")["ppl"] < 0.9 * before
    assert all(torch.equal(p, original[name]) for name, p in teacher.state_dict().items())
    assert hf.patched_method(tuned) is None and not any(p.requires_grad for p in tuned.parameters())
    assert not tuned.training and len(history) == 6 and all(p.grad is None for p in tuned.parameters())
    assert all(set(row) >= {"task", "total"} and "hidden" not in row and row["total"] == row["task"]
               for row in history)                                        # the LM loss alone, no teacher terms
    again, history_again = finetune(teacher, tokens, config, out_dir=tmp_path / "ft")  # finished: loaded, not retrained
    assert history_again == history                                      # the same rows, step times included
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="holds a fine-tune of 6 steps, not 4"):
        finetune(teacher, tokens, DistillConfig(**(config.as_dict() | {"steps": 4, "weights": None})),
                 out_dir=tmp_path / "ft")
    with pytest.raises(ValueError, match="causal LM"):
        finetune(tiny_encoder(), tokens, config)


def tiny_encoder():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=64)
    return BertModel(config).eval()


def test_run_distils_from_a_finetuned_teacher_and_keeps_runs_apart(tmp_path, monkeypatch):
    from approxattn.distill import experiment

    monkeypatch.setitem(experiment.TEACHER_LOADERS, "kjv-tiny", lambda name, out: (tiny_teacher(), ByteTokenizer()))
    run = dict(teacher="kjv-tiny", methods=[("linear", {})], eval_max_windows=4, device="cpu", progress=False,
               log=lambda message: None, config=DistillConfig(steps=2, batch_size=2, seq_len=32, lr=2e-2,
                                                               precision="fp32"))
    out = tmp_path / "tuned"
    results = experiment.run_experiment(out_dir=out, finetune_teacher_steps=8, **run)
    assert results["teacher_finetune"]["steps"] == 8 and (out / "teacher_finetuned" / "checkpoint.pt").exists()
    assert results["teacher"]["ppl"] < results["base_teacher"]["ppl"]   # the students' teacher is the tuned one
    table = (out / "table.md").read_text()
    assert "| base teacher (kjv-tiny, not fine-tuned) |" in table and "fine-tuned 8 steps on the train split" in table
    assert "fine-tuned 8 steps on the train split" in table
    with pytest.raises(ValueError, match="--finetune-teacher"):      # a resume with another teacher: refused
        experiment.run_experiment(out_dir=out, finetune_teacher_steps=0, **run)
    resumed = experiment.run_experiment(out_dir=out, finetune_teacher_steps=8, **run)
    for key in ("methods", "teacher", "base_teacher"):
        assert resumed[key] == results[key], key
    assert resumed["teacher_finetune"]["train_seconds"] == results["teacher_finetune"]["train_seconds"]  # loaded
    # an interrupted fine-tune (a checkpoint, no results yet) resumes where it stopped
    half = tmp_path / "half"
    finetune(tiny_teacher(), stream(), DistillConfig(steps=3, batch_size=2, seq_len=32, lr=2e-2, precision="fp32"),
             out_dir=half / "teacher_finetuned")
    resumed_half = experiment.run_experiment(out_dir=half, finetune_teacher_steps=8, **run)
    rows = (half / "teacher_finetuned" / "log.jsonl").read_text().splitlines()
    assert resumed_half["teacher_finetune"]["steps"] == 8 and [json.loads(r)["step"] for r in rows] == list(range(1, 9))
    # another recipe for the fine-tune in the same folder: refused, naming the option and the folder
    other = tmp_path / "other"
    shutil.copytree(out / "teacher_finetuned", other / "teacher_finetuned")
    other_lr = run | {"config": DistillConfig(steps=2, batch_size=2, seq_len=32, lr=1e-2, precision="fp32")}
    with pytest.raises(ValueError, match="--finetune-teacher.*teacher_finetuned"):
        experiment.run_experiment(out_dir=other, finetune_teacher_steps=8, **other_lr)
    (out / "teacher_finetuned" / "checkpoint.pt").unlink()           # the recorded teacher's weights are gone
    with pytest.raises(ValueError, match="is gone"):
        experiment.run_experiment(out_dir=out, finetune_teacher_steps=8, **run)
    # the students at batch 4 from a teacher fine-tuned at batch 2 (the table says so)
    larger = run | {"config": DistillConfig(steps=2, batch_size=4, seq_len=32, lr=2e-2, precision="fp32")}
    wide = experiment.run_experiment(out_dir=tmp_path / "wide", finetune_teacher_steps=8, finetune_batch_size=2,
                                     **larger)
    assert wide["teacher_finetune"]["batch_size"] == 2 and wide["config"]["batch_size"] == 4
    # the same teacher as the batch-2 run's (evaluated in batches of 4: the last digits may differ)
    assert wide["teacher"]["ppl"] == pytest.approx(results["teacher"]["ppl"], rel=1e-5)
    assert "fine-tuned 8 steps of batch 2 on the train split" in (tmp_path / "wide" / "table.md").read_text()
    with pytest.raises(ValueError, match="--finetune-batch-size"):
        experiment.run_experiment(out_dir=tmp_path / "bad", finetune_teacher_steps=8, finetune_batch_size=0, **run)
    plain = experiment.run_experiment(out_dir=tmp_path / "plain", **run)
    assert "teacher_finetune" not in plain and "base teacher" not in (tmp_path / "plain" / "table.md").read_text()
    with pytest.raises(ValueError, match="fine-tuned for 8 steps in one run and 0"):
        experiment.merge_results([results, plain])
    for steps, match in ((-1, "int >= 0"), (True, "int >= 0"), (1, "warm-up")):
        config = DistillConfig(steps=4, warmup_steps=1, seq_len=32)
        with pytest.raises(ValueError, match=match):
            experiment.run_experiment(**(run | {"config": config}), out_dir=tmp_path / "bad", finetune_teacher_steps=steps)
