"""The layering contract: the inverse-Bellman math is one package, ``qworld.worldmodel``, that
imports no Ray, Tune, W&B and none of the orchestration (``qworld.sweep``, ``qworld.agents``,
``qworld.cli`` and qworld's other modules beside the math), and ``qworld_envs`` imports nothing
of ``qworld`` (dependencies point one way: ``qworld_envs`` <- ``qworld`` <- ``qworld_analysis``).

Checked twice: by importing every module of the package in a fresh interpreter and reading
``sys.modules`` (what actually loads, through any chain of imports), and statically over the
source (every import statement, at module level or inside a function, which an import test
only sees when the function runs).
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qworld
import qworld.worldmodel
import qworld_envs

ROOT = Path(__file__).resolve().parents[1]
MATH = "qworld.worldmodel"
MATH_DIR = Path(qworld.worldmodel.__file__).parent
ENVS_DIR = Path(qworld_envs.__file__).parent

# qworld's modules the math may import: column names and file names (no logic, no imports of
# their own beyond the standard library and pyarrow).
ALLOWED_QWORLD = {"qworld.worldmodel", "qworld.metrics", "qworld.layout"}
# Everything else directly under qworld is orchestration, found rather than listed, so a new
# module there (a command, a runner) is forbidden to the math without editing this test.
ORCHESTRATION = sorted({f"qworld.{m.name}" for m in pkgutil.iter_modules(qworld.__path__)} - ALLOWED_QWORLD)
FORBIDDEN = ("ray", "tune", "wandb", "qworld_analysis", *ORCHESTRATION)


def test_the_forbidden_list_names_the_orchestration():
    # the names the contract is about are found in the tree (a renamed package would silently
    # drop out of ORCHESTRATION otherwise)
    assert {"qworld.sweep", "qworld.agents", "qworld.cli",
            "qworld.demonstrations"} <= set(ORCHESTRATION)
    assert not set(ORCHESTRATION) & ALLOWED_QWORLD


def forbidden(name: str, prefixes=FORBIDDEN) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def math_modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(qworld.worldmodel.__path__, prefix=MATH + ".")]
    return [MATH, *sorted(found)]


def test_the_package_holds_the_math():
    modules = set(math_modules())
    for name in ("bellman", "bellman_grid", "planning", "planning_continuous", "scoring", "scoring_continuous",
                 "reward", "qss", "experience", "oracle", "plearn", "plearn.finite", "plearn.moves",
                 "plearn.diagnose", "plearn.continuous"):
        assert f"{MATH}.{name}" in modules, f"{MATH}.{name} is not in the math package"


def loaded_forbidden(module: str, extra_path: Path | None = None) -> list[str]:
    """The forbidden modules in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    code = textwrap.dedent(f"""
        import importlib, sys
        {f"sys.path.insert(0, {str(extra_path)!r})" if extra_path else ""}
        importlib.import_module({module!r})
        prefixes = {FORBIDDEN!r}
        print("\\n".join(sorted(m for m in sys.modules
                                if any(m == p or m.startswith(p + ".") for p in prefixes))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"importing {module} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout.split()


@pytest.mark.parametrize("module", math_modules())
def test_importing_a_math_module_loads_no_ray_and_no_orchestration(module):
    loaded = loaded_forbidden(module)
    assert loaded == [], f"importing {module} loads {', '.join(loaded)}"


def imported_names(source: str, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``source`` (any depth: inside functions and
    branches too), relative imports resolved against ``package``; for ``from X import y``
    both ``X`` and ``X.y`` (``y`` may be a submodule); ``importlib.import_module("X")`` and
    ``__import__("X")`` with a literal name count as imports of X."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def package_of(path: Path, top_dir: Path, top: str) -> str:
    """The package a source file's relative imports resolve against."""
    parts = [top, *path.relative_to(top_dir).with_suffix("").parts]
    return ".".join(parts[:-1])  # a module's package; for an __init__.py, its own


def violations(top_dir: Path, top: str, prefixes) -> list[str]:
    hits = []
    for path in sorted(top_dir.rglob("*.py")):
        for line, name in imported_names(path.read_text(), package_of(path, top_dir, top)):
            if forbidden(name, prefixes):
                hits.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    return hits


def test_no_import_statement_in_the_math_names_ray_or_orchestration():
    assert violations(MATH_DIR, MATH, FORBIDDEN) == []


def test_qworld_envs_imports_nothing_of_qworld():
    """Statically (lazy imports included) and at import time."""
    assert violations(ENVS_DIR, "qworld_envs", ("qworld", "qworld_analysis")) == []
    code = ("import sys, qworld_envs, qworld_envs.continuous_tasks; "
            "print(sorted(m for m in sys.modules if m == 'qworld' or m.startswith(('qworld.', 'qworld_analysis'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_checks_can_fail(tmp_path):
    # the static check sees imports at any depth, relative ones and import_module strings
    source = textwrap.dedent("""
        import numpy as np
        from qworld import metrics as K
        from qworld import sweep

        def f():
            import ray.tune
            from ..agents import load_q
            from . import bellman
            return importlib.import_module("wandb")
    """)
    names = [n for _, n in imported_names(source, "qworld.worldmodel")]
    assert [n for n in names if forbidden(n)] == ["qworld.sweep", "ray.tune", "qworld.agents", "qworld.agents.load_q",
                                                  "wandb"]
    assert "qworld.worldmodel.bellman" in names and not forbidden("qworld.worldmodel.bellman")
    assert not forbidden("qworld.metrics") and not forbidden("rayleigh")
    # the import check sees what a module loads through another one
    (tmp_path / "leaky_math.py").write_text("import qworld.worldmodel.bellman\nimport qworld.cli\n")
    assert loaded_forbidden("leaky_math", extra_path=tmp_path) == ["qworld.cli"]
