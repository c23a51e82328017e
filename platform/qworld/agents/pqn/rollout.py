"""The rollout batch PQN learns from, and RLlib episodes -> that batch.

Shapes: T steps, N columns (one env each for the fast runner; one episode chunk each
for the standard runner), L goals.

A rollout is a dict of torch tensors, time-major:

========================  ==================  =============================================
key                       shape, dtype        meaning
========================  ==================  =============================================
``obs``                   [T, N, obs_dim] f   state observation s_t (no goal features)
``next_obs``              [T, N, obs_dim] f   true next observation s_{t+1} (before reset)
``actions``               [T, N] long         action taken
``goal``                  [T, N] long         commanded goal index at step t
``rewards``               [T, N, L] f         every goal's reward for the transition
``terminals``             [T, N, L] bool      every goal's termination for the transition
``reward``                [T, N] f            commanded goal's reward
``terminated``            [T, N] bool         commanded goal's termination
``truncated``             [T, N] bool         the column is cut after t without termination
                                              (time limit, or end of a sampled chunk)
``mask``                  [T, N] bool         valid rows (optional; padding is False)
``next_q_max``            [T, N, L] f         max_a Q_g(s_{t+1}, a) of every goal under the
                                              weights that sampled the rollout (optional;
                                              the fast runner's all-goals rollouts)
``next_q_argmax``         [T, N, L] long      its argmax (optional, with ``next_q_max``;
                                              by default only for ``lambda_ > 0``)
``state``                 [T, N, ...]         the env's true state s_t (optional: the fast
                                              runner when experience is recorded; finite:
                                              long indices, continuous: [T, N, d] float)
``next_state``            [T, N, ...]         the true next state (before reset); the PQN
                                              Algorithm takes both out into its
                                              ``qworld.worldmodel.experience.ExperienceLog``
========================  ==================  =============================================

The fast runner already evaluates Q at every s_{t+1} that is the next step's s_t, with the
weights the learner holds before its update (weights are synced after every update), so
it hands those values over and the learner's target pass is skipped (about a fifth of
the compute of a training step).

To travel through RLlib's ``LearnerGroup.update(batch=...)`` the rollout is wrapped in a
``MultiAgentBatch`` env-major (``[N, T, ...]``, transposed views), so that sharding over
several Learners splits whole columns and never cuts a lambda-return chain.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

OBS = "obs"
NEXT_OBS = "next_obs"
ACTIONS = "actions"
GOAL = "goal"
REWARDS = "rewards"
TERMINALS = "terminals"
REWARD = "reward"
TERMINATED = "terminated"
TRUNCATED = "truncated"
MASK = "mask"
NEXT_Q_MAX = "next_q_max"
NEXT_Q_ARGMAX = "next_q_argmax"
STATE = "state"
NEXT_STATE = "next_state"
ROLLOUT_KEYS = (OBS, NEXT_OBS, ACTIONS, GOAL, REWARDS, TERMINALS, REWARD, TERMINATED, TRUNCATED,
                NEXT_Q_MAX, NEXT_Q_ARGMAX)


def num_steps(rollout: Dict[str, torch.Tensor]) -> int:
    """Number of env steps (valid rows) in a rollout."""
    if MASK in rollout:
        return int(rollout[MASK].sum())
    return int(rollout[ACTIONS].numel())


def concat_columns(rollouts: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Join rollouts of several env runners along N (padding T with invalid rows)."""
    rollouts = [r for r in rollouts if r]
    if len(rollouts) == 1:
        return rollouts[0]
    T = max(r[ACTIONS].shape[0] for r in rollouts)
    any_mask = any(MASK in r or r[ACTIONS].shape[0] != T for r in rollouts)
    out: Dict[str, List[torch.Tensor]] = {}
    for r in rollouts:
        t = r[ACTIONS].shape[0]
        r = dict(r)
        if any_mask and MASK not in r:
            r[MASK] = torch.ones(r[ACTIONS].shape, dtype=torch.bool, device=r[ACTIONS].device)
        for k, v in r.items():
            if t < T:
                pad = torch.zeros((T - t,) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device)
                if k == TRUNCATED:
                    pad = pad | True
                v = torch.cat([v, pad], 0)
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v, 1) for k, v in out.items()}


def to_train_batch(rollout: Dict[str, torch.Tensor]) -> MultiAgentBatch:
    """Wrap a time-major rollout env-major into a MultiAgentBatch for ``LearnerGroup.update``."""
    env_major = {k: v.transpose(0, 1) for k, v in rollout.items()}
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(env_major)}, env_steps=num_steps(rollout))


def from_train_batch(batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`to_train_batch` (module batch -> time-major tensors on ``device``)."""
    out = {}
    for k in list(ROLLOUT_KEYS) + [MASK]:
        if k in batch:
            v = batch[k]
            v = torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
            out[k] = v.to(device, non_blocking=True).transpose(0, 1)
    return out


def episodes_to_rollout(
    episodes: Sequence[Any],
    obs_dim: int,
    goal_features: np.ndarray,
) -> Dict[str, torch.Tensor]:
    """RLlib ``SingleAgentEpisode`` chunks -> one padded rollout, one column per chunk.

    The env observes ``concat(state obs, goal features)`` and its step infos carry
    ``rewards [L]`` and ``terminals [L]`` (CONTRACTS.md); the commanded goal is
    ``info["goal"]`` when present, else the goal whose features match the observation.
    A chunk that ends neither terminated nor truncated (the sample ended) is marked
    ``truncated`` at its last step: its target bootstraps from the true next state.

    Args:
        episodes: episode chunks (numpy or list-backed) from ``SingleAgentEnvRunner.sample``.
        obs_dim: size of the state part of the observation.
        goal_features: ``[L, goal_dim]``.

    Returns:
        A rollout (see module doc) with ``mask``; T = longest chunk, N = number of chunks.
    """
    episodes = [e for e in episodes if len(e) > 0]
    if not episodes:
        return {}
    goal_features = np.asarray(goal_features, dtype=np.float32)
    L = goal_features.shape[0]
    T, N = max(len(e) for e in episodes), len(episodes)
    D = obs_dim
    obs = np.zeros((T, N, D), np.float32)
    next_obs = np.zeros((T, N, D), np.float32)
    actions = np.zeros((T, N), np.int64)
    goal = np.zeros((T, N), np.int64)
    rewards = np.zeros((T, N, L), np.float32)
    terminals = np.zeros((T, N, L), bool)
    reward = np.zeros((T, N), np.float32)
    terminated = np.zeros((T, N), bool)
    truncated = np.ones((T, N), bool)  # padding rows count as cut
    mask = np.zeros((T, N), bool)
    for n, e in enumerate(episodes):
        k = len(e)
        o = np.asarray(e.get_observations(), dtype=np.float32).reshape(k + 1, -1)
        infos = list(e.get_infos())[1:]
        obs[:k, n] = o[:k, :D]
        next_obs[:k, n] = o[1:, :D]
        actions[:k, n] = np.asarray(e.get_actions()).reshape(k)
        reward[:k, n] = np.asarray(e.get_rewards(), dtype=np.float32).reshape(k)
        rewards[:k, n] = np.stack([np.asarray(i["rewards"], dtype=np.float32) for i in infos])
        terminals[:k, n] = np.stack([np.asarray(i["terminals"], dtype=bool) for i in infos])
        if all("goal" in i for i in infos):
            goal[:k, n] = [int(i["goal"]) for i in infos]
        else:
            feats = o[:k, D:]
            goal[:k, n] = ((feats[:, None, :] - goal_features[None]) ** 2).sum(-1).argmin(-1)
        truncated[: k - 1, n] = False
        truncated[k - 1, n] = not e.is_terminated
        terminated[k - 1, n] = bool(e.is_terminated)
        mask[:k, n] = True
    arrays = dict(
        obs=obs,
        next_obs=next_obs,
        actions=actions,
        goal=goal,
        rewards=rewards,
        terminals=terminals,
        reward=reward,
        terminated=terminated,
        truncated=truncated,
        mask=mask,
    )
    return {k: torch.from_numpy(v) for k, v in arrays.items()}
