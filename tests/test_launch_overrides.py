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
