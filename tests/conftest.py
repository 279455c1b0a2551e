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
