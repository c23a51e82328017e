"""The learner families a sweep can train: ``algorithm: pqn | dqn | mrq | d3g | iqlearn`` (a sweep axis).

``ALGORITHMS`` maps a family name to where its RLlib Algorithm and AlgorithmConfig live
(imported lazily: validating a sweep file builds no Algorithm). A config class of a family
provides:

- ``FIELDS``: each of its fields declared once (name, default, doc, check;
  ``qworld.agents.fields``), from which the rest derives:
- ``training(env_id=..., env_kwargs=..., total_env_steps=..., **agent)``: its keywords
  (``training_keywords()``) are the agent keywords a sweep file may set for that family;
- ``qworld_errors() -> list[str]``: every bad field as ``"field=value: must be ..."``;
- ``qworld_config() -> dict``: the resolved trial config its Algorithm writes as
  ``qworld_config.json`` into every checkpoint (with ``algorithm: <name>``), so
  ``qworld.agents.load_q`` restores any family's Q without Ray.

Adding a family is one entry in ``ALGORITHMS`` and one in ``qworld.layout.TRIAL_DIR_FAMILIES``
(its Algorithm class name, which Tune puts in trial dir names; a test keeps the two equal).
A sweep without ``algorithm`` trains ``DEFAULT_ALGORITHM``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping

ALGORITHM_KEY = "algorithm"  # the agent keyword / sweep axis / trial config key / parquet column
DEFAULT_ALGORITHM = "pqn"


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """A learner family: its name and its RLlib classes (``"module:Class"`` paths)."""

    name: str
    algo: str  # the Algorithm (a Tune trainable)
    config: str  # its AlgorithmConfig

    def algo_class(self) -> type:
        return _load(self.algo)

    def config_class(self) -> type:
        return _load(self.config)

    def keywords(self) -> tuple[str, ...]:
        """The agent keywords this family accepts (its config's ``training`` keywords: the
        fields of its table that are keywords)."""
        return self.config_class().training_keywords()

    def build_config(self, env_id: str, env_kwargs: Mapping[str, Any], agent: Mapping[str, Any],
                     total_env_steps: int | None = None):
        """The family's AlgorithmConfig for one task and agent keywords (not validated)."""
        extra = {"total_env_steps": int(total_env_steps)} if total_env_steps else {}
        return self.config_class()().training(env_id=env_id, env_kwargs=dict(env_kwargs), **extra, **agent)


ALGORITHMS: dict[str, Family] = {
    "pqn": Family("pqn", "qworld.agents.pqn:PQN", "qworld.agents.pqn:PQNConfig"),
    "dqn": Family("dqn", "qworld.agents.dqn:GoalDQN", "qworld.agents.dqn:GoalDQNConfig"),
    "mrq": Family("mrq", "qworld.agents.mrq:MRQ", "qworld.agents.mrq:MRQConfig"),
    "d3g": Family("d3g", "qworld.agents.d3g:D3G", "qworld.agents.d3g:D3GConfig"),
    "iqlearn": Family("iqlearn", "qworld.agents.iqlearn:IQLearn", "qworld.agents.iqlearn:IQLearnConfig"),
}


def family(name: Any = None) -> Family:
    """The family called ``name`` (None: the default). ValueError naming the allowed ones."""
    name = DEFAULT_ALGORITHM if name is None else name
    if not isinstance(name, str) or name.lower() not in ALGORITHMS:
        raise ValueError(f"{name!r} is not a learner family; allowed: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name.lower()]


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of a trial config / ``qworld_config.json`` (no ``algorithm``: the default)."""
    return family(config.get(ALGORITHM_KEY))


def all_keywords() -> tuple[str, ...]:
    """Every agent keyword of any family (sorted), plus ``algorithm``."""
    keys = {ALGORITHM_KEY}
    for fam in ALGORITHMS.values():
        keys.update(fam.keywords())
    return tuple(sorted(keys))


def fields_markdown() -> str:
    """``docs/AGENT_CONFIG.md``: every family's fields, from their tables."""
    from qworld.agents.fields import fields_markdown as markdown

    return markdown([(name, fam.config_class()) for name, fam in ALGORITHMS.items()])


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--docs"]:
        print(fields_markdown(), end="")
    else:
        print("usage: python -m qworld.agents.families --docs > docs/AGENT_CONFIG.md", file=sys.stderr)
        sys.exit(2)
