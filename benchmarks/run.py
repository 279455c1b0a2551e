"""Run every ``benchmarks/bench_*.py`` and write their results under ``benchmarks/results/``.

``python -m benchmarks.run [--quick] [--results-dir DIR]`` (``make bench``). Each benchmark module exposes
``main(argv) -> int`` and writes ``<name>-<machine tag>.json``, e.g. ``quant-cpu-amd-epyc-2c.json``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

from . import _harness as H


def bench_modules() -> list[str]:
    """Names of the benchmark modules (``benchmarks.bench_*``), sorted."""
    here = str(Path(__file__).resolve().parent)
    return sorted(f"benchmarks.{m.name}" for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    """Run all benchmarks in one process (the copy bandwidth is measured once and shared); return an exit code."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke test, noisier numbers)")
    ap.add_argument("--results-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    load = H.ForeignLoad().start()
    print(f"machine tag: {H.machine_tag()}")
    print(f"copy bandwidth (read+write, 256 MiB float32 copy_): {H.copy_bandwidth() / 1e9:.1f} GB/s")
    sub_argv = (["--quick"] if args.quick else []) + (["--results-dir", args.results_dir] if args.results_dir else [])
    failed = []
    for name in bench_modules():
        print(f"\n# {name}")
        rc = importlib.import_module(name).main(list(sub_argv))
        if rc:
            failed.append(name)
    foreign = load.stop()
    print(f"\nall benchmarks done in {time.perf_counter() - t0:.1f} s" + (f"; FAILED: {failed}" if failed else ""))
    if foreign is not None:
        print(f"other processes used {foreign:.2f} cores on average during the whole run")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
