"""Env kwargs: the one resolver every env (finite and continuous) runs its kwargs through."""

from __future__ import annotations

from typing import Any

import numpy as np

REWARD_KINDS = ("sparse", "gaussian")
START_STATES = ("reset", "uniform")  # env kwarg start_states: the reset distribution | uniform over the box


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def resolve_kwargs(env_id: str, defaults: dict[str, Any], env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every kwarg of ``env_id`` with its default filled in.

    ``num_goals=None`` means the default. The kwargs shared by several envs are checked
    here when the env has them: ``max_episode_steps`` and ``num_goals`` (positive ints or,
    for ``num_goals``, None), ``reward`` (None or one of ``REWARD_KINDS``),
    ``start_states`` (one of ``START_STATES``).

    Args:
        env_id: named in the messages.
        defaults: every kwarg the env takes, with its default.
        env_kwargs: the kwargs given.

    Raises:
        TypeError: an unknown kwarg (the message names it and lists the allowed ones).
        ValueError: a bad value of a shared kwarg.
    """
    unknown = sorted(set(env_kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"{env_id} got unknown kwargs {unknown}; allowed: {sorted(defaults)}")
    kw = {**defaults, **{k: v for k, v in env_kwargs.items() if not (k == "num_goals" and v is None)}}
    steps = kw["max_episode_steps"]
    if not _positive_int(steps):
        raise ValueError(f"max_episode_steps must be a positive int, got {steps!r}")
    num_goals = kw.get("num_goals")
    if num_goals is not None and not _positive_int(num_goals):
        raise ValueError(f"num_goals must be a positive int, got {num_goals!r}")
    if kw.get("reward") is not None and kw["reward"] not in REWARD_KINDS:
        raise ValueError(f"reward must be one of {REWARD_KINDS}, got {kw['reward']!r}")
    if kw.get("start_states", "reset") not in START_STATES:
        raise ValueError(f"start_states must be one of {START_STATES}, got {kw['start_states']!r}")
    return kw
