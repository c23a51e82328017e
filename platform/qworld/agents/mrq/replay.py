"""Replayed windows: RLlib ``EpisodeReplayBuffer`` slices -> MR.Q's fixed-length batch.

RLlib's buffer samples episode slices starting at uniformly drawn (episode, step) pairs
(``sample(..., batch_length_T=H, sample_episodes=True)``); a slice is shorter than H
where its episode ends (terminated, truncated, or not yet continued). Each slice becomes
one window of H transitions, padded after its end with ``valid`` False (the padded
observations repeat the last one).

The env observes ``concat(state obs, goal features)``; the window keeps the state part.
Transition k's rewards / terminals of every goal are ``infos[k + 1]["rewards"]`` /
``["terminals"]`` (the info the env returned with ``s_{k+1}``; CONTRACTS.md).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from qworld.agents.mrq.learner import ACTIONS, OBS, REWARDS, TERMINALS, VALID


def abs_reward_sum(episodes: Sequence[Any]) -> tuple:
    """``(sum |r|, count)`` over every goal's reward of every transition in ``episodes``."""
    total, count = 0.0, 0
    for e in episodes:
        for info in list(e.get_infos())[1:]:
            r = np.asarray(info["rewards"], dtype=np.float64)
            total += float(np.abs(r).sum())
            count += r.size
    return total, count


def slices_to_windows(slices: Sequence[Any], horizon: int, obs_dim: int, num_goals: int) -> Dict[str, np.ndarray]:
    """Episode slices -> ``{obs [N, H+1, obs_dim], actions [N, H], rewards / terminals [N, H, L], valid [N, H]}``."""
    slices = [s for s in slices if len(s) > 0]
    N, H, L = len(slices), int(horizon), int(num_goals)
    obs = np.zeros((N, H + 1, obs_dim), np.float32)
    actions = np.zeros((N, H), np.int64)
    rewards = np.zeros((N, H, L), np.float32)
    terminals = np.zeros((N, H, L), np.float32)
    valid = np.zeros((N, H), bool)
    for i, s in enumerate(slices):
        k = min(len(s), H)
        o = np.asarray(s.get_observations(), dtype=np.float32).reshape(len(s) + 1, -1)[: k + 1, :obs_dim]
        obs[i, : k + 1] = o
        obs[i, k + 1 :] = o[-1]
        actions[i, :k] = np.asarray(s.get_actions()).reshape(-1)[:k]
        infos: List[dict] = list(s.get_infos())[1 : k + 1]
        rewards[i, :k] = np.stack([np.asarray(f["rewards"], np.float32) for f in infos])
        terminals[i, :k] = np.stack([np.asarray(f["terminals"], np.float32) for f in infos])
        valid[i, :k] = True
    return {OBS: obs, ACTIONS: actions, REWARDS: rewards, TERMINALS: terminals, VALID: valid}


def sample_windows(buffer: Any, num_windows: int, horizon: int, obs_dim: int, num_goals: int) -> Dict[str, np.ndarray]:
    """``num_windows`` windows of ``horizon`` transitions from an RLlib ``EpisodeReplayBuffer``.

    The buffer counts a slice as (its length + 1) items, so asking for
    ``num_windows * (horizon + 1)`` items gives at least ``num_windows`` slices.
    """
    out: List[Any] = []
    while len(out) < num_windows:
        got = buffer.sample(
            batch_size_B=(num_windows - len(out)) * (horizon + 1),
            batch_length_T=horizon,
            n_step=1,
            sample_episodes=True,
            include_infos=True,
            lookback=0,
        )
        out.extend(s for s in got if len(s) > 0)
    return slices_to_windows(out[:num_windows], horizon, obs_dim, num_goals)
