"""Q(lambda) targets of PQN as one small pure function (torch only, no Ray).

Shapes: T steps, N envs, then any trailing dims (e.g. L goals) shared by every input.
"""

from __future__ import annotations

import torch


def q_lambda_targets(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    truncs: torch.Tensor,
    next_q_max: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Peng's Q(lambda) returns over one rollout, reward on arrival.

    With ``c_t = gamma * (1 - dones[t])``::

        G[t] = rewards[t] + c_t * next_q_max[t]                                  if cut at t
        G[t] = rewards[t] + c_t * ((1 - lam) * next_q_max[t] + lam * G[t + 1])   otherwise

    The chain is cut at the last step of the rollout, at terminations (``dones``: no
    bootstrap at all, ``c_t = 0``) and at ``truncs`` (time limit, end of a sampled
    chunk, or the env reset after another goal's episode ended): there the target
    bootstraps from ``next_q_max[t]`` only, never from the next row, which belongs
    to a new episode. ``lam = 0`` gives 1-step targets ``rewards + c * next_q_max``.

    Args:
        rewards: ``[T, N, ...]`` reward of the transition ``s_t -> s_{t+1}``.
        dones: ``[T, N, ...]`` bool (or 0/1), ``s_{t+1}`` is terminal.
        truncs: ``[T, N]`` or ``[T, N, ...]`` bool, the episode is cut after step t
            without termination; broadcast over the trailing dims of ``rewards``.
        next_q_max: ``[T, N, ...]`` ``max_a Q(s_{t+1}, a)`` of the true next state
            (before any env reset).
        gamma: discount in [0, 1].
        lam: lambda in [0, 1].

    Returns:
        ``[T, N, ...]`` targets, dtype of ``rewards``; no gradient flows through.
    """
    if rewards.shape != next_q_max.shape or rewards.shape != dones.shape:
        raise ValueError(
            "rewards, dones and next_q_max must share one shape [T, N, ...], got "
            f"{tuple(rewards.shape)}, {tuple(dones.shape)}, {tuple(next_q_max.shape)}"
        )
    if rewards.dim() < 2:
        raise ValueError(f"inputs need at least the dims [T, N], got shape {tuple(rewards.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    truncs = truncs.bool()
    while truncs.dim() < rewards.dim():
        truncs = truncs.unsqueeze(-1)
    dones = dones.bool()
    next_q_max = next_q_max.detach().to(rewards.dtype)
    discount = gamma * (~dones).to(rewards.dtype)
    if lam == 0.0:
        return rewards + discount * next_q_max

    cut = dones | truncs  # broadcast to the shape of rewards
    targets = torch.empty_like(rewards)
    g = rewards[-1] + discount[-1] * next_q_max[-1]
    targets[-1] = g
    for t in range(rewards.shape[0] - 2, -1, -1):
        mixed = (1.0 - lam) * next_q_max[t] + lam * g
        g = rewards[t] + discount[t] * torch.where(cut[t], next_q_max[t], mixed)
        targets[t] = g
    return targets
