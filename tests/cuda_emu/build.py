"""Build the host emulation of csrc/cuda/*.cu (see cuda_runtime.h here) into a shared library; returns its path.

The kernel sources are used as they are, except that each launch ``k<<<grid, block, smem, stream>>>(args)`` is
rewritten to ``qk_emu::launcher(&k, grid, block, smem, stream)(args)``. The library is cached by a hash of every
input file, so an edit of a .cu file rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
_LAUNCH = re.compile(r"(\b\w+_kernel(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def rewrite_launches(src: str) -> tuple[str, int]:
    """``k<<<cfg>>>(`` -> ``qk_emu::launcher(&k, cfg)(``; returns the new text and the number of launches."""
    return _LAUNCH.subn(lambda m: f"qk_emu::launcher(&{m.group(1)}, {m.group(2)})(", src)


def build(cache_dir: Path | None = None) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    inputs = sorted(CSRC.glob("cuda/*")) + [CSRC / "common.h"] + sorted(HERE.glob("*.h")) + [HERE / "harness.cpp",
                                                                                              Path(__file__)]
    digest = hashlib.sha256()
    for p in inputs:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / f"qkernels_cuda_emu_{os.getuid()}")
    lib = cache_dir / f"emu_{digest.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix="qk_emu_"))
    (work / "csrc" / "cuda").mkdir(parents=True)
    shutil.copy(CSRC / "common.h", work / "csrc" / "common.h")
    sources = []
    for p in sorted(CSRC.glob("cuda/*")):
        text = p.read_text()
        if p.suffix == ".cu":
            text, count = rewrite_launches(text)
            if count == 0 or "<<<" in text:
                raise RuntimeError(f"{p.name}: could not rewrite its kernel launches for the emulation")
            dst = work / "csrc" / "cuda" / (p.stem + ".cpp")
            sources.append(dst)
        else:
            dst = work / "csrc" / "cuda" / p.name
        dst.write_text(text)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_lib = work / lib.name
    cmd = [cxx, "-std=c++20", "-O1", "-g0", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math",
           "-w", f"-I{HERE}", f"-I{work / 'csrc'}", *map(str, sources), str(HERE / "harness.cpp"), "-o", str(tmp_lib)]
    subprocess.run(["nice", "-n", "19", *cmd] if shutil.which("nice") else cmd, check=True)
    os.replace(tmp_lib, lib)
    shutil.rmtree(work, ignore_errors=True)
    return lib


if __name__ == "__main__":
    print(build())
