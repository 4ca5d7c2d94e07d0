from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. The switch is read when a kernel
# module is first imported, so it must be set here, before any test module (or anything they
# import, e.g. the bench or HF packages) imports approxattn.kernels; a kernel compiled for the GPU
# and then called from an interpreted one fails with "Cannot call @triton.jit'd outside of the
# scope of a kernel".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Tiny models: thread start-up costs more than the work (and CI runs two workers on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def forced_kernels(monkeypatch):
    """Kernels on CPU tensors under the interpreter (on a GPU, as they are); ``torch.empty``
    poisoned with NaN so that output a kernel never writes fails the comparison."""
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("kernels were imported without TRITON_INTERPRET=1")
        monkeypatch.setenv("APPROXATTN_FORCE_KERNELS", "1")
    monkeypatch.delenv("APPROXATTN_DISABLE_KERNELS", raising=False)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
