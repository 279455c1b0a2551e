"""The batch driver shared by the fuzz scripts (tests/fuzz_public_api.py, tests/fuzz_vs_peft.py; not collected).

A fuzz script runs its cases ``[start, stop)`` in a child process (``script --child --seed S --start A --stop B``)
that prints one JSON line per case: ``{"start": i}`` before case i, then the case's result (with ``"i"``). A child
that dies (a signal, a timeout) is charged with the case it had started, and the next batch resumes after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable


def run_batches(script: str, seed: int, cases: int, batch: int, extra: list[str], env: dict[str, str],
                timeout: float, record: Callable[[dict], dict], crash: Callable[[int, str], dict]) -> list[dict]:
    """Runs cases ``0 .. cases-1`` of ``script`` in child processes of ``batch`` cases each; returns the results.

    ``extra``: more child arguments; ``record(rec)``: a child's result as kept (e.g. with the ISA added);
    ``crash(i, detail)``: the result charged to case ``i`` when its child died (``detail``: exit status, stderr)."""
    results: list[dict] = []
    i = 0
    while i < cases:
        stop = min(cases, i + batch)
        cmd = [sys.executable, script, "--child", "--seed", str(seed), "--start", str(i), "--stop", str(stop), *extra]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "timeout", "timeout"
        last, done = None, set()
        for line in out.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "start" in rec:
                last = rec["start"]
            else:
                results.append(record(rec))
                done.add(rec["i"])
        if rc == 0:
            i = stop
            continue
        bad = last if last is not None and last not in done else i
        results.append(crash(bad, f"child exit {rc}; stderr tail: {err[-600:]}"))
        i = bad + 1
    return results
