"""scripts/gpu_check.sh without a GPU: its dry run (every stage reached, every command well formed) and the failure
log that tests/conftest.py writes for it.

The script is what a GPU session runs in its one or two 10-minute calls; a typo in it, or a benchmark it names that
lost its ``--results-dir`` option, would cost that session its GPU time. The dry run prints each timed command
instead of running it, so this checks the script's control flow and the commands it would run, here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _dry_run(tmp_path: Path, rc: int = 0, **env) -> str:
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert proc.returncode == rc, proc.stdout + proc.stderr
    return summary


def test_script_parses():
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_reaches_every_stage_with_well_formed_commands(tmp_path):
    summary = _dry_run(tmp_path)
    commands = re.findall(r"dry run, (\d+)s: (.*)", summary)
    assert any("setup.py build_ext --inplace" in c for _, c in commands), summary
    assert any(c.endswith("-m cuda tests") for _, c in commands), summary
    assert any(c.endswith("-m not cuda tests") for _, c in commands), summary
    assert re.search(r"done, rc=0", summary)
    benches = [re.search(r"-m benchmarks\.(\w+) --results-dir (\S+)", c) for _, c in commands]
    benches = [b for b in benches if b]
    assert {b.group(1) for b in benches} >= {"bench_gemv_cuda", "bench_triton"}, summary
    for b in benches:  # each module exists and takes the option the script passes (its argparse says so)
        source = (ROOT / "benchmarks" / f"{b.group(1)}.py").read_text()
        assert '"--results-dir"' in source, b.group(1)
    # every stage runs under a bounded time that fits the default 560 s budget
    assert all(0 < int(t) <= 600 for t, _ in commands)


def test_dry_run_honours_stages(tmp_path):
    summary = _dry_run(tmp_path, STAGES="bench")
    assert "setup.py" not in summary and "-m cuda tests" not in summary
    assert "benchmarks.bench_gemv_cuda" in summary


def test_out_of_time_stages_are_skipped_not_run(tmp_path):
    """With almost no budget left every stage is skipped and the script still ends (and writes its summary); a build
    that cannot run stops the script (nothing after it could use the GPU kernels), saying so."""
    summary = _dry_run(tmp_path, 124, GPU_CHECK_BUDGET="30", STAGES="gputests bench resttests")  # GPU tests unrun
    assert "skipped (out of time)" in summary and "dry run" not in summary
    out = tmp_path / "build-only"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "30"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "build FAILED (rc=124" in (out / "summary.txt").read_text()


def test_failure_log_names_each_failure_as_it_happens(tmp_path):
    """QKERNELS_TEST_FAILURES: the conftest appends each failing test's id and report tail at once (a run killed at
    its deadline never prints pytest's summary), and nothing for passing or skipped tests."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "def test_ok():\n    assert True\n\n"
        "def test_bad():\n    assert 1 + 1 == 3, 'arithmetic'\n\n"
        "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n"
    )
    log = tmp_path / "failures.txt"
    env = {**os.environ, "QKERNELS_TEST_FAILURES": str(log)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = log.read_text()
    assert re.findall(r"^FAILED (\S+)", text, re.M) == ["test_x.py::test_bad"]
    assert "arithmetic" in text


def test_benchmark_loop_stops_at_sigterm_and_keeps_its_rows(tmp_path):
    """The stage deadline is a SIGTERM from ``timeout``: inside ``_harness.Deadline`` it ends the benchmark's loop,
    so the rows measured so far are still printed and saved (the JSON is written at the end); outside one, and for
    a Ctrl-C, nothing changes."""
    code = (
        "import os, signal, time\n"
        "from benchmarks import _harness as H\n"
        "rows = []\n"
        "with H.Deadline() as d:\n"
        "    for i in range(100):\n"
        "        rows.append(i)\n"
        "        if i == 2:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            time.sleep(30)  # the handler runs here at the latest\n"
        "print('rows', rows, 'hit', d.hit)\n"
        "try:\n"
        "    with H.Deadline() as d:\n"
        "        raise KeyboardInterrupt\n"
        "except KeyboardInterrupt:\n"
        "    print('ctrl-c passed through', d.hit)\n"
        "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "rows [0, 1, 2] hit True" in proc.stdout
    assert "ctrl-c passed through False" in proc.stdout
