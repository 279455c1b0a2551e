"""Shared pytest configuration: tests marked ``@pytest.mark.cuda`` are skipped, with a reason, when there is no GPU."""

from __future__ import annotations

import pytest
import torch

NO_GPU_REASON = "needs a CUDA GPU; this machine has none"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def triton_interpreter():
    """For tests that run qkernels' Triton kernels in Triton's CPU interpreter: skips, saying why, where it cannot
    (triton not installed, or ``qkernels.triton_kernels.interpreter_unusable_reason``: e.g. triton 3.6's interpreter
    with numpy >= 2.4). With the triton the project pins (Makefile) they run: test_triton.py checks that."""
    pytest.importorskip("triton", reason="Triton is not installed")
    from qkernels.triton_kernels import interpreter_unusable_reason

    why = interpreter_unusable_reason()
    if why is not None:
        pytest.skip(f"{why}; the project's pinned triton (Makefile) runs these tests")
