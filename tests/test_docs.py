"""The docs name files that exist: every path README.md and docs/*.md quote in backticks
(a module, a sweep file, a benchmark, a test, a folder of the code) is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# PAPER_NOTES.md quotes the papers' own repositories (``MRQ/MRQ.py``), not this one
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "PAPER_NOTES.md")]
# where a quoted path may be rooted: the repo, the three source roots, the qworld package, its
# agents (the module table names `dqn.py`-style paths inside the agents row) and its math
# package (`plearn/finite.py`)
BASES = [ROOT, ROOT / "platform", ROOT / "envs", ROOT / "analysis", ROOT / "platform" / "qworld",
         ROOT / "platform" / "qworld" / "agents", ROOT / "platform" / "qworld" / "worldmodel", ROOT / "tune_configs"]
FILE = re.compile(r"^[\w./-]+\.(py|yaml|yml|md|toml)$")
# folders of the code (a column prefix such as `interior/` or an experiment folder such as
# `wandb/` is not a path in the repository)
CODE_DIRS = ("qworld/", "qworld_envs/", "qworld_analysis/", "agents/", "plearn/", "sweep/", "tests/",
             "tune_configs/", "benchmarks/", "cluster/", "docs/", "platform/", "envs/", "analysis/")


def quoted_paths(text: str) -> list[str]:
    """Backticked tokens that name a repository file or a code folder."""
    out = []
    for token in re.findall(r"`([^`\s]+)`", text):
        if any(c in token for c in "<>*~:(") or token.startswith(("..", "/")):
            if token.startswith(".."):
                out.append(token)  # outside the repository: always reported
            continue
        if FILE.match(token) or (token.endswith("/") and token.startswith(CODE_DIRS)):
            out.append(token)
    return out


def exists(path: str) -> bool:
    from qworld.layout import SPEC_FILE

    if path == SPEC_FILE:  # the file an experiment keeps (qworld.layout), not a repository file
        return True
    return any((base / path).exists() for base in BASES)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_quoted_path_exists(doc):
    missing = [p for p in quoted_paths(doc.read_text()) if p.startswith("..") or not exists(p)]
    assert not missing, f"{doc.name} names paths that are not in the repository: {missing}"


def test_the_check_sees_a_missing_module_and_a_path_outside():
    # the test can fail: a renamed module and a link outside the clone are both caught
    text = "see `qworld/sweep/score.py` and `qworld/sweep/scoring_gone.py`, `../shared/DESIGN.md`, `interior/`"
    found = quoted_paths(text)
    assert found == ["qworld/sweep/score.py", "qworld/sweep/scoring_gone.py", "../shared/DESIGN.md"]
    assert [p for p in found if p.startswith("..") or not exists(p)] == found[1:]
