"""Shared pytest configuration.

- Tests marked ``@pytest.mark.cuda`` are skipped, with a reason, when there is no GPU.
- ``triton_interpreter``: a fixture for tests that run the Triton kernels in Triton's CPU interpreter (skips where
  it cannot run, saying why).
- ``QKERNELS_TEST_FAILURES=path``: each failing test's id and the last lines of its report are appended to ``path``
  the moment it fails (scripts/gpu_check.sh sets it). The GPU run is cut at a deadline by ``timeout``, which kills
  pytest before its end-of-run summary: without this file a killed run said how many tests failed, not which.
"""

from __future__ import annotations

import os

import pytest
import torch

NO_GPU_REASON = "needs a CUDA GPU; this machine has none"
FAILURE_LOG_ENV = "QKERNELS_TEST_FAILURES"
_TAIL_LINES = 25  # enough for the assertion and the frame that raised it


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


_failure_log: str | None = None  # set by pytest_configure


def pytest_configure(config: pytest.Config) -> None:
    global _failure_log
    # On an xdist worker: nothing (the controller logs every worker's reports; both logging doubled each entry).
    worker = hasattr(config, "workerinput")
    _failure_log = None if worker else os.environ.get(FAILURE_LOG_ENV) or None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _failure_log is None or not report.failed:
        return
    text = str(report.longrepr) if report.longrepr is not None else ""
    tail = "\n".join(text.splitlines()[-_TAIL_LINES:])
    with open(_failure_log, "a", encoding="utf-8") as f:
        f.write(f"FAILED {report.nodeid} ({report.when})\n{tail}\n\n")


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
