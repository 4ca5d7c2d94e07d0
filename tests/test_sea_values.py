"""SEA's augmented values [P, v] from one Triton kernel (interpreter on CPU) against torch.cat."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_triton

from approxattn.kernels.sea_values import augmented_values, augmented_values_reference


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_equals_the_concatenation(forced_kernels, dtype, strided):
    gen = torch.Generator().manual_seed(3)
    probe = torch.rand(2, 37, 12, generator=gen)
    values = torch.randn(2, 37, 3, 12, generator=gen).to(dtype).transpose(1, 2) if strided \
        else torch.randn(2, 3, 37, 12, generator=gen).to(dtype)
    out = augmented_values(probe.to(dtype), values)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, augmented_values_reference(probe, values))


def test_declines_off_the_kernel_path_and_checks_the_probe(monkeypatch):
    monkeypatch.setenv("APPROXATTN_DISABLE_KERNELS", "1")
    values = torch.randn(1, 2, 5, 4)
    assert augmented_values(torch.rand(1, 5, 4), values) is None
    with pytest.raises(ValueError, match="probe"):
        augmented_values(torch.rand(1, 6, 4), values)
