"""The repo layout contract: platform/ is a source root, never a package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_not_a_package():
    assert (ROOT / "platform" / "qworld" / "__init__.py").is_file()
    assert not (ROOT / "platform" / "__init__.py").exists(), "it would shadow the stdlib 'platform'"


def test_stdlib_platform_still_works_from_the_repo_root():
    code = "import platform, sys; print(platform.system()); print(platform.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    system, location = proc.stdout.split()
    assert system == "Linux"
    assert str(ROOT) not in location  # the stdlib module, not our folder


def test_dependencies_point_one_way():
    """qworld_envs imports neither qworld nor qworld_analysis; qworld never imports qworld_analysis
    at module level (only the CLI command does, lazily)."""
    def imports(package_dir: Path, name: str) -> list[str]:
        hits = []
        for f in package_dir.rglob("*.py"):
            for line in f.read_text().splitlines():
                s = line.strip()
                if s.startswith((f"import {name}", f"from {name}")) and not line.startswith((" ", "\t")):
                    hits.append(f"{f.relative_to(ROOT)}: {s}")
        return hits

    assert imports(ROOT / "envs" / "qworld_envs", "qworld.") == []
    assert [h for h in imports(ROOT / "envs" / "qworld_envs", "qworld ") if h] == []
    assert imports(ROOT / "envs" / "qworld_envs", "qworld_analysis") == []
    assert imports(ROOT / "platform" / "qworld", "qworld_analysis") == []


def test_module_subdir_is_where_rllib_saves_the_module():
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    from qworld.layout import MODULE_SUBDIR

    assert MODULE_SUBDIR == (COMPONENT_LEARNER_GROUP, COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID)
