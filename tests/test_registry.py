"""The registry: metadata, documented cost formulas, the `list` command."""

from __future__ import annotations

import json

import pytest

import approxattn
from approxattn.cli import main


def test_every_method_is_listed_with_its_metadata(capsys):
    assert main(["list", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(approxattn.available_methods())
    assert listed["linformer"]["supports_causal"] is False
    assert listed["performer"]["options"]["num_features"]["default"] == 256
    assert listed["sea"]["kv_cache_decoding"] is False and listed["performer"]["kv_cache_decoding"] is True
    assert main(["list", "--width", "160"]) == 0
    table = capsys.readouterr().out
    assert "flurka-performer" in table and "yes (KV-cache step: hf.cached_decoding)" in table


def test_softmax_cost_formula_by_hand():
    cost = approxattn.get_method("softmax").cost(2, 4, 128, 256, 16, element_size=2)
    assert cost.flops == 2 * (2 * 4 * 128 * 256) * (16 + 16)
    assert cost.exps == 2 * 4 * 128 * 256
    assert cost.bytes_moved == 2 * (2 * 4 * 128 * 32 + 2 * 4 * 256 * 32)
    causal = approxattn.get_method("softmax").cost(2, 4, 128, 128, 16, causal=True)
    full = approxattn.get_method("softmax").cost(2, 4, 128, 128, 16)
    assert causal.flops == full.flops / 2


def test_performer_cost_formula_by_hand():
    b, h, n, d, m = 1, 2, 100, 8, 16
    cost = approxattn.get_method("performer").cost(b, h, n, n, d, num_features=m)
    projection = 2 * (b * h * n + b * h * n) * d * m
    sums = 2 * b * h * n * m * (d + 1) * 2
    assert cost.flops == projection + sums
    assert cost.exps == 2 * b * h * n * m
    hyperbolic = approxattn.get_method("performer").cost(b, h, n, n, d, num_features=m, kernel="softmax-hyperbolic")
    assert hyperbolic.exps == 2 * cost.exps
    assert approxattn.get_method("performer").cost(b, h, n, n, d, kernel="relu").exps == 0


def test_flurka_is_cheaper_than_linformer_when_m_below_r_and_than_performer_when_r_below_m():
    """The MAC conditions of the FLuRKA speed model: m(N + r) < N·r and r(N + m) < N·m."""
    n, d = 65536, 64
    flurka = approxattn.get_method("flurka-performer").cost(1, 16, n, n, d, rank=256, num_features=64, max_len=n)
    linformer = approxattn.get_method("linformer").cost(1, 16, n, n, d, rank=256, max_len=n)
    assert flurka.flops < linformer.flops
    flurka = approxattn.get_method("flurka-performer").cost(1, 16, n, n, d, rank=64, num_features=256, max_len=n)
    performer = approxattn.get_method("performer").cost(1, 16, n, n, d, num_features=256)
    assert flurka.flops < performer.flops


def test_duplicate_registration_is_refused():
    spec = approxattn.get_method("softmax")
    with pytest.raises(ValueError, match="registered twice"):
        approxattn.registry.register(spec)
