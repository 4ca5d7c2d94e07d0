"""Launch overrides from the environment (a tuned config timed without editing DEFAULTS)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _overrides(value: str) -> subprocess.CompletedProcess:
    code = "from approxattn.kernels import _launch; print(_launch.OVERRIDES)"
    env = {"APPROXATTN_LAUNCH_OVERRIDES": value, "PATH": "", "PYTHONPATH": ":".join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_overrides_are_read_from_the_environment():
    done = _overrides('{"q_bwd": {"BN": 64, "num_warps": 8, "num_stages": 1}}')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'q_bwd': {'BN': 64, 'num_warps': 8, 'num_stages': 1}}"


@pytest.mark.parametrize("value", ['{"q_bwd": {"BN": 64}}', "not json", '{"q_bwd": {"BN": 0, "num_warps": 8, '
                                                                       '"num_stages": 1}}'])
def test_bad_overrides_name_the_variable(value):
    done = _overrides(value)
    assert done.returncode != 0
    assert "ValueError: APPROXATTN_LAUNCH_OVERRIDES" in done.stderr


class _FakeKernel:
    """Stands in for a jitted kernel: ``fn[grid](*args, **meta)`` fails for more than ``fits`` stages
    as Triton does when the pipelined tiles exceed the device's shared memory."""

    arg_names = ("x", "n", "BN")

    def __init__(self, fits: int, resource: str = "shared memory"):
        self.fits, self.tried, self.resource = fits, [], resource

    def __getitem__(self, grid):
        def launch(*args, **meta):
            from approxattn.kernels._launch import OutOfResources

            self.tried.append(meta.get("num_stages", 3))
            if meta.get("num_stages", 3) > self.fits:
                raise OutOfResources(245760, 232448, self.resource)
            return "compiled"
        return launch


@pytest.mark.parametrize("fits, tried", [(3, [3]), (2, [3, 2]), (1, [3, 2, 1])])
def test_launch_retries_with_fewer_stages_when_shared_memory_runs_out(fits, tried):
    import torch

    from approxattn.kernels._launch import Launch

    fake = _FakeKernel(fits)
    launch = Launch(fake, (1,), (4,), {"BN": 16, "num_warps": 4, "num_stages": 3}, torch.device("cpu"))
    launch(torch.zeros(4))
    assert fake.tried == tried
    assert launch.meta["num_stages"] == fits   # later launches keep the config that fitted
    launch(torch.zeros(4))
    assert fake.tried[-1] == fits


def test_launch_raises_when_one_stage_does_not_fit():
    import torch

    from approxattn.kernels._launch import Launch, OutOfResources

    launch = Launch(_FakeKernel(0), (1,), (4,), {"BN": 16, "num_warps": 4, "num_stages": 2}, torch.device("cpu"))
    with pytest.raises(OutOfResources):
        launch(torch.zeros(4))


def test_launch_retries_only_what_fewer_stages_can_fix(monkeypatch):
    import torch

    from approxattn.kernels import _launch
    from approxattn.kernels._launch import Launch, OutOfResources

    threads = _FakeKernel(0, resource="threads")
    with pytest.raises(OutOfResources):
        Launch(threads, (1,), (4,), {"BN": 16, "num_stages": 3}, torch.device("cpu"))(torch.zeros(4))
    assert threads.tried == [3]
    unnamed = _FakeKernel(2)                                   # no num_stages: Triton's default, 3
    Launch(unnamed, (1,), (4,), {"BN": 16}, torch.device("cpu"))(torch.zeros(4))
    assert unnamed.tried == [3, 2]
    monkeypatch.setattr(_launch, "OVERRIDES", {"state": {"BN": 16, "num_warps": 4, "num_stages": 3}})
    tuned = _FakeKernel(2)                                     # a tuning run sees its config fail
    with pytest.raises(OutOfResources):
        Launch(tuned, (1,), (4,), {"BN": 16, "num_stages": 3}, torch.device("cpu"))(torch.zeros(4))


@pytest.mark.parametrize("value,expected", [("exact", "exact"), ("fast", "fast"), (None, "exact"), ("", None),
                                                   ("precise", None)])
def test_causal_dq_mode_is_read_from_the_environment(value, expected):
    """``APPROXATTN_CAUSAL_DQ`` picks the segment scan's dq; anything but fast / exact names the variable."""
    pytest.importorskip("triton")
    code = "from approxattn.kernels import causal_linear_attn; print(causal_linear_attn.CAUSAL_DQ)"
    env = {"PATH": "", "PYTHONPATH": ":".join(sys.path)}
    if value is not None:   # None: unset, the default
        env["APPROXATTN_CAUSAL_DQ"] = value
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if expected is None:
        assert done.returncode != 0 and "ValueError: APPROXATTN_CAUSAL_DQ" in done.stderr, done.stderr
    else:
        assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr
