"""Shared benchmark harness: timing, result rows, machine description, memory floor, writers.

Method (see docs/performance.md): every op gets a *floor* first, the bytes it must move divided by the
measured copy bandwidth of this machine; every implementation is timed in the same process, so ratios
(speedup vs bitsandbytes, time / floor) compare numbers taken minutes apart on the same machine;
each time is the median of several runs, reported with its p10-p90 spread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLS = ("qkernels", "qkernels-reference", "bitsandbytes", "torch")
COPY_BYTES = 256 * 1024 * 1024  # the float32 tensor timed by measure_copy_bandwidth


@dataclass(frozen=True)
class Stats:
    """Timing summary of one callable, in seconds."""

    median: float
    p10: float
    p90: float
    runs: int
    first: float  # the first (cold) call, e.g. including bitsandbytes' one-off torch.compile


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of an ascending, non-empty sequence."""
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def measure(
    fn: Callable[[], Any], *, warmup: int = 2, min_runs: int = 5, min_time_s: float = 0.5, max_runs: int = 10_000
) -> Stats:
    """Time ``fn()``: ``warmup`` untimed calls, then timed calls until both ``min_runs`` runs and ``min_time_s``
    seconds of timed work are reached (at most ``max_runs``). Returns the median and p10/p90 in seconds.

    CUDA work is synchronized around each call when a GPU is present, so asynchronous launches are counted.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    first = 0.0
    for i in range(max(warmup, 1)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
    times: list[float] = []
    total = 0.0
    while len(times) < max_runs and (len(times) < min_runs or total < min_time_s):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    times.sort()
    return Stats(_percentile(times, 50), _percentile(times, 10), _percentile(times, 90), len(times), first)


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], *, warmup: int = 2, min_runs: int = 5, min_time_s: float = 0.5,
    max_runs: int = 10_000,
) -> dict[str, Stats]:
    """Time several callables round-robin: ``warmup`` untimed rounds, then rounds of one timed call of each, until
    every one has ``min_runs`` runs and ``min_time_s`` seconds of timed work (at most ``max_runs`` rounds).

    For ratios between implementations of one step: timed one after the other, each got its own stretch of the
    machine's state, and on the shared VM those stretches differ (the same block step's baselines moved by 20-35 %
    between processes, and one implementation's whole run could land in a slow or a fast one). Round-robin, every
    implementation sees the same drift, and each call starts with the caches the others left (as a layer's step does
    inside a network). Returns ``{name: Stats}``; ``first`` is the first warmup call's time.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    first: dict[str, float] = {}
    for i in range(max(warmup, 1)):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i == 0:
                first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < max_runs and any(len(t) < min_runs or sum(t) < min_time_s for t in times.values()):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = Stats(_percentile(ts, 50), _percentile(ts, 10), _percentile(ts, 90), len(ts), first[name])
    return out


@dataclass
class Result:
    """One row of a benchmark table: one op, shape, dtype and implementation.

    ``gbps`` is ``nbytes`` (the bytes the op must move) / median time. ``floor_ms`` is ``nbytes`` / the measured
    copy bandwidth, and ``vs_floor`` = median / floor (1.0 = at the memory floor; higher is slower).
    ``vs_bnb`` = bitsandbytes' median / this median (the speedup over bitsandbytes; > 1 is faster), or None.
    """

    op: str
    shape: str
    dtype: str
    impl: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    nbytes: int
    gbps: float
    floor_ms: float
    vs_floor: float
    vs_bnb: float | None = None
    first_call_ms: float | None = None
    note: str = ""

    @classmethod
    def from_stats(
        cls,
        op: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        impl: str,
        stats: Stats,
        nbytes: int,
        bandwidth: float,
        note: str = "",
    ) -> Result:
        """Build a row from ``measure``'s stats, the bytes the op moves and the copy bandwidth (bytes/s)."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        floor_s = nbytes / bandwidth
        return cls(
            op=op,
            shape="x".join(str(int(s)) for s in shape),
            dtype=str(dtype).replace("torch.", ""),
            impl=impl,
            median_ms=stats.median * 1e3,
            p10_ms=stats.p10 * 1e3,
            p90_ms=stats.p90 * 1e3,
            runs=stats.runs,
            nbytes=int(nbytes),
            gbps=nbytes / stats.median / 1e9,
            floor_ms=floor_s * 1e3,
            vs_floor=stats.median / floor_s,
            first_call_ms=stats.first * 1e3,
            note=note,
        )


def fill_vs_bnb(results: Sequence[Result]) -> None:
    """Set ``vs_bnb`` on every row whose (op, shape, dtype) group has a bitsandbytes row."""
    bnb = {(r.op, r.shape, r.dtype): r.median_ms for r in results if r.impl == "bitsandbytes"}
    for r in results:
        ref = bnb.get((r.op, r.shape, r.dtype))
        r.vs_bnb = None if ref is None else ref / r.median_ms


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere), or ``"unknown"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_tag() -> str:
    """A short file-name tag for this machine: ``cuda-<gpu>`` or ``cpu-<model-short>-<nproc>c``."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return "cuda-" + _slug(name.replace("NVIDIA", ""))
    model = re.sub(r"\((R|TM|tm)\)|\bCPU\b|\bProcessor\b|@.*$|\b\d+-Core\b", " ", cpu_model())
    return f"cpu-{_slug(model) or 'unknown'}-{os.cpu_count() or 0}c"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def machine_info() -> dict[str, Any]:
    """Describe the machine and software: CPU model, core count, threads, versions, ``qkernels.native_info()``."""
    import qkernels

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except Exception as exc:  # the benchmarks still run qkernels' rows without it
        bnb_version = f"unavailable ({type(exc).__name__}: {exc})"
    info: dict[str, Any] = {
        "tag": machine_tag(),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # benchmarks/__init__.py sets "active"
        # > ~0 on an otherwise idle machine means something else shares the cores: the numbers are suspect.
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": bnb_version,
        "qkernels": qkernels.__version__,
        "native_info": qkernels.native_info(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class ForeignLoad:
    """Average CPU cores used by *other* processes between ``start()`` and ``stop()`` (Linux ``/proc``; None elsewhere).

    The benchmarks run on shared machines: anything above ~0.1 core means another process competed for the cores
    and the times are suspect. Measured as all-CPU busy time minus this process's own CPU time, over wall time.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._busy0 = self._self0 = 0

    @staticmethod
    def _busy_ticks() -> int:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait

    @staticmethod
    def _self_ticks() -> int:
        with open("/proc/self/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime

    def start(self) -> ForeignLoad:
        """Begin the interval; returns self."""
        try:
            self._busy0, self._self0 = self._busy_ticks(), self._self_ticks()
            self._t0 = time.perf_counter()
        except (OSError, ValueError, IndexError):
            self._t0 = None
        return self

    def stop(self) -> float | None:
        """End the interval: average cores used by other processes, or None where /proc is unavailable."""
        if self._t0 is None:
            return None
        try:
            other = (self._busy_ticks() - self._busy0) - (self._self_ticks() - self._self0)
        except (OSError, ValueError, IndexError):
            return None
        wall = time.perf_counter() - self._t0
        return max(other, 0) / os.sysconf("SC_CLK_TCK") / wall if wall > 0 else None


class Deadline:
    """``with Deadline() as d:`` around a benchmark's loop over its cases: a SIGTERM (``timeout``'s signal, which
    scripts/gpu_check.sh sends at a stage's deadline, with 10 s to go before its SIGKILL) ends the loop instead of the
    process, so the cases measured so far are still printed and saved; ``d.hit`` says whether it came. Without this
    a benchmark cut at its deadline lost every row it had measured (the JSON is written at the end)."""

    def __init__(self) -> None:
        self.hit = False
        self._previous: Any = None

    def __enter__(self) -> Deadline:
        def handler(signum, frame):
            self.hit = True
            raise KeyboardInterrupt

        with contextlib.suppress(ValueError):  # not the main thread: no handler, the default behaviour stays
            self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if exc_type is KeyboardInterrupt and self.hit:
            print("\nSIGTERM (deadline): stopped; the cases measured so far follow")
            return True
        return False


def measure_copy_bandwidth(nbytes: int = COPY_BYTES, *, min_runs: int = 5, min_time_s: float = 0.5,
                           device: str = "cpu") -> float:
    """Memory bandwidth of ``device`` (this machine's RAM by default) in bytes/s: ``dst.copy_(src)`` on a float32
    tensor of ``nbytes`` (256 MiB by default, well past the caches), counted as read + write (``2 * nbytes`` per
    copy), median time.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), warmup=2, min_runs=min_runs, min_time_s=min_time_s)
    return 2 * nbytes / stats.median


@functools.cache
def copy_bandwidth(device: str = "cpu") -> float:
    """``measure_copy_bandwidth(device=device)``, measured once per process and shared by all benchmarks."""
    return measure_copy_bandwidth(device=device)


def markdown_table(results: Sequence[Result]) -> str:
    """The rows as a Markdown table (times in ms, p10-p90 spread, GB/s, time / floor, speedup vs bitsandbytes)."""
    lines = [
        "| op | shape | dtype | impl | median ms | p10-p90 ms | runs | GB/s | floor ms | time/floor | vs bnb | note |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        vs_bnb = "-" if r.vs_bnb is None else f"{r.vs_bnb:.2f}x"
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.impl} | {r.median_ms:.2f} | {r.p10_ms:.2f}-{r.p90_ms:.2f} | "
            f"{r.runs} | {r.gbps:.1f} | {r.floor_ms:.2f} | {r.vs_floor:.2f} | {vs_bnb} | {r.note} |"
        )
    return "\n".join(lines)


def print_results(title: str, results: Sequence[Result], machine: dict[str, Any], bandwidth: float) -> None:
    """Print a header naming the machine and copy bandwidth, then the Markdown table."""
    print(f"\n## {title}\n")
    print(
        f"machine: {machine['cpu_model']}, {machine['nproc']} cores ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, bitsandbytes {machine['bitsandbytes']}, qkernels {machine['qkernels']}, "
        f"load average {machine['loadavg_1m_at_start']}"
    )
    print(f"copy bandwidth (read+write): {bandwidth / 1e9:.1f} GB/s\n")
    print(markdown_table(results))


def write_json(
    name: str,
    results: Sequence[Result],
    machine: dict[str, Any],
    bandwidth: float,
    *,
    summary: dict[str, Any] | None = None,
    results_dir: Path | str | None = None,
) -> Path:
    """Append one run to ``<results_dir>/<name>-<machine tag>.json`` (``{"runs": [...]}``) and return its path.

    Each run holds the UTC time, the machine description, the copy bandwidth, the rows and an optional summary.
    The file is rewritten through a ``.tmp`` file and renamed, so an interrupted write never corrupts it.
    """
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{machine['tag']}.json"
    data: dict[str, Any] = {"runs": []}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data.get("runs"), list):
                data = {"runs": []}
        except (OSError, ValueError):
            data = {"runs": []}
    data["runs"].append(
        {
            "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "copy_bandwidth_gbps": bandwidth / 1e9,
            "results": [dataclasses.asdict(r) for r in results],
            "summary": summary or {},
        }
    )
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
