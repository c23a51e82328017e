"""The package installs whole without ``-e``: a wheel built from this tree holds every module of
the three source roots (platform/qworld, envs/qworld_envs, analysis/qworld_analysis), and each
imports from the installed copy.

A non-editable install is what cluster nodes, ``pip install .`` and Ray runtime envs get; a
package missing from pyproject.toml's discovery would only show there (the editable install
maps whole top-level folders and hides it). The wheel is built from a copy of the tree, so the
checkout gets no build/ folder; it is installed with ``--no-deps --target`` (a fresh venv could
not import torch or Ray offline) and imported by this interpreter in a subprocess whose cwd is
outside the repo, with the installed copy first on the path; each module's ``__file__`` proves
where it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from live import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
# source root -> top-level package (pyproject.toml's [tool.setuptools.package-dir])
SOURCE_ROOTS = {"platform": "qworld", "envs": "qworld_envs", "analysis": "qworld_analysis"}


def _skip(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo") or path.name.startswith(".")


def source_files() -> list[str]:
    """Every file of the three packages, relative to its source root (``qworld/agents/d3g/x.py``)."""
    files = []
    for root, package in SOURCE_ROOTS.items():
        base = ROOT / root
        files += [p.relative_to(base).as_posix() for p in (base / package).rglob("*")
                  if p.is_file() and not _skip(p.relative_to(base))]
    return sorted(files)


def module_name(relpath: str) -> str:
    parts = relpath[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of a copy of this tree, installed (``--no-deps --target``) into a temp dir."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")
    for root in SOURCE_ROOTS:
        shutil.copytree(ROOT / root, src / root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                           cwd=tmp, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("qworld-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if n.startswith("platform/")], "platform/ is a source root, not a package"
    target = tmp / "site"
    inst = subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                          cwd=tmp, capture_output=True, text=True)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return target


def test_the_tree_has_the_packages_we_expect():
    """Guards the guard: the file listing sees the subpackages a hand-kept list once left out."""
    modules = {module_name(f) for f in source_files() if f.endswith(".py")}
    assert {"qworld.agents.d3g", "qworld.agents.iqlearn", "qworld.sweep.spec", "qworld_envs",
            "qworld_analysis"} <= modules
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_wheel_holds_every_file_of_the_source_tree(installed):
    missing = [f for f in source_files() if not (installed / f).is_file()]
    assert missing == [], f"not in the wheel (pyproject.toml's package discovery): {missing}"
    dist_info = next(installed.glob("qworld-*.dist-info"))
    assert "qworld = qworld.cli:main" in (dist_info / "entry_points.txt").read_text()


def test_every_module_imports_from_the_installed_copy(installed, tmp_path):
    modules = sorted(module_name(f) for f in source_files() if f.endswith(".py"))
    # The venv's editable finder is a meta-path hook appended after the path finder, so the
    # installed copy (first on PYTHONPATH) wins; drop the hook anyway so a miss cannot fall back
    # to the checkout, and report any module that did.
    code = textwrap.dedent(f"""
        import importlib, json, sys, traceback
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__
                            and "editable" not in getattr(f, "__module__", "")]
        out = {{}}
        for name in {modules!r}:
            try:
                out[name] = importlib.import_module(name).__file__
            except BaseException:
                out[name] = "ERROR " + traceback.format_exc()
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = str(installed)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = {m: f for m, f in files.items() if f is None or f.startswith("ERROR ")}
    assert errors == {}, "\n".join(f"{m}: {f}" for m, f in errors.items())
    outside = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(installed.resolve())}
    assert outside == {}, f"imported from outside the installed wheel: {outside}"
    assert len(files) == len(modules)
