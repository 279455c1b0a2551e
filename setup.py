"""Build script for qkernels: pure-Python package + one native module, ``qkernels._C`` (pybind11, built by CMake).

Environment switches read by this file
======================================

    QKERNELS_CUDA
    |-- unset / "auto"   build the CUDA part when nvcc is found (PATH, $CUDACXX, $CUDA_HOME/bin, /usr/local/cuda/bin)
    |-- "1"              force the CUDA part on; the build FAILS if nvcc is missing
    `-- "0"              CPU-only native module
    QKERNELS_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES list, default "80;86;89;90"
    QKERNELS_NO_NATIVE=1 skip native code entirely: the package installs pure-Python and qkernels falls back to the
                         reference (pure torch) path.  A stale in-tree qkernels/_C*.so is removed so an editable
                         install really is pure-Python.
    QKERNELS_BUILD_TYPE  CMake build type, default "Release"
    MAX_JOBS             parallel compile jobs, default os.cpu_count()

Notes
-----
* The build never needs a GPU (only nvcc for the CUDA part); cudart is linked statically.
* Uses the Ninja generator when ninja is available (pip package or PATH), else CMake's default generator.
* The CMake build tree is persistent (``build/cmake/<config>``), so ``pip install --no-build-isolation --no-deps -e .``
  rebuilds incrementally.  Editable installs put ``_C.<EXT_SUFFIX>`` next to the sources in ``qkernels/``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;86;89;90"


def _env_flag(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home_var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(home_var):
            candidates.append(os.path.join(os.environ[home_var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _find_tool(module: str, attr: str, exe: str) -> str | None:
    """Prefer the pip-installed cmake/ninja (same environment), else PATH."""
    try:
        mod = __import__(module)
        path = os.path.join(getattr(mod, attr), exe)
        if os.path.isfile(path):
            return path
    except Exception:
        pass
    return shutil.which(exe)


def _stale_cmake_cache(build_dir: Path, ninja: str | None) -> str | None:
    """Why the CMake cache in ``build_dir`` cannot be reused, or None if it can.

    The build tree is persistent, but a ``pip install .`` with build isolation configures it with the cmake and ninja
    of a temporary environment that pip deletes afterwards: the next build (``build_ext --inplace``, another
    ``pip install .``) then failed with "Running '/tmp/pip-build-env-.../ninja' '--version' failed". A cache that
    names a tool which is gone, or the Ninja generator when no ninja is found now, is thrown away (a full rebuild).
    """
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return None
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "//")):
            entries[key.split(":")[0]] = value
    for key in ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM"):
        tool = entries.get(key, "")
        if tool and os.path.isabs(tool) and not os.path.exists(tool):
            return f"{key} {tool} no longer exists"
    if entries.get("CMAKE_GENERATOR") == "Ninja" and ninja is None:
        return "it was generated for Ninja, which is not found now"
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)

        # Where setuptools expects the module (build/lib... for wheels, the source tree for --inplace / editable).
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")

        cuda_mode = _env_flag("QKERNELS_CUDA") or "auto"
        if cuda_mode not in ("auto", "0", "1"):
            raise RuntimeError(f"QKERNELS_CUDA must be unset, 'auto', '0' or '1' (got {cuda_mode!r})")
        nvcc = _find_nvcc() if cuda_mode != "0" else None
        if cuda_mode == "1" and nvcc is None:
            raise RuntimeError(
                "QKERNELS_CUDA=1 but nvcc was not found (PATH, $CUDACXX, $CUDA_HOME/bin, /usr/local/cuda)"
            )
        with_cuda = nvcc is not None
        archs = os.environ.get("QKERNELS_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
        build_type = os.environ.get("QKERNELS_BUILD_TYPE", "").strip() or "Release"
        jobs = os.environ.get("MAX_JOBS", "").strip() or str(os.cpu_count() or 1)

        cmake = _find_tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: pip install cmake (or put cmake >= 3.18 on PATH)")
        ninja = _find_tool("ninja", "BIN_DIR", "ninja")
        pybind11_dir = subprocess.check_output([sys.executable, "-m", "pybind11", "--cmakedir"], text=True).strip()

        # One persistent build tree per configuration -> incremental rebuilds, no stale CMake cache across configs.
        tag = f"{sys.implementation.cache_tag}-{build_type.lower()}-{'cuda' if with_cuda else 'cpu'}"
        build_dir = ROOT / "build" / "cmake" / tag
        stale = _stale_cmake_cache(build_dir, ninja)
        if stale:
            print(f"qkernels: discarding the CMake cache in {build_dir}: {stale}")
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        cfg = [
            cmake,
            "-S", ext.sourcedir,
            "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DQKERNELS_OUTPUT_DIR={out_dir}",
            f"-DQKERNELS_EXT_SUFFIX={ext_suffix}",
            f"-DQKERNELS_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            cfg += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DQKERNELS_CUDA_ARCHS={archs}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"
            ]
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        print(f"qkernels: native build ({'CPU+CUDA' if with_cuda else 'CPU only'}, {build_type}) in {build_dir}")
        subprocess.run(cfg, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        if not ext_path.exists():
            raise RuntimeError(f"CMake build finished but {ext_path} was not produced")


NO_NATIVE = _env_flag("QKERNELS_NO_NATIVE") in ("1", "true", "yes", "on")
if NO_NATIVE:
    for stale in glob.glob(str(ROOT / "qkernels" / "_C*.so")) + glob.glob(str(ROOT / "qkernels" / "_C*.pyd")):
        print(f"qkernels: QKERNELS_NO_NATIVE=1, removing stale native module {stale}")
        os.remove(stale)

setup(
    ext_modules=[] if NO_NATIVE else [CMakeExtension("qkernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
