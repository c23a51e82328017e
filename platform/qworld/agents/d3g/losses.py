"""D3G's targets and losses as pure torch functions (no Ray, no modules).

Shapes: B batch, L goals, A actions, d state dims.

Every transition carries the reward and the termination of all L goals of the goal set
(the goal env's ``info["rewards"]`` / ``info["terminals"]``), so one replayed transition
trains the critic and the proposal network ``tau`` of every goal at once. State
differences are measured in units of the module's per-dim ``delta_scale`` (so that
MountainCar's velocity, ~25x smaller than its position, weighs as much), wrapped on the
periodic dims by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def critic_target(rewards: torch.Tensor, terminals: torch.Tensor, q_next: torch.Tensor, gamma: float) -> torch.Tensor:
    """Clipped double-Q target of every goal: ``r + gamma (1 - done) min_i Qbar_i``.

    Args:
        rewards: ``[B, L]`` every goal's reward on arriving in s'.
        terminals: ``[B, L]`` every goal's termination at s' (bool or 0/1).
        q_next: ``[B, L, 2]`` both target critics at ``(s', s' + f(s', I(s', s' + taubar(s', g))), g)``.
        gamma: discount.

    Returns:
        ``[B, L]`` targets (no gradient needed; the caller computes them under no_grad).
    """
    return rewards + gamma * (1.0 - terminals.to(rewards.dtype)) * q_next.min(dim=-1).values


def critic_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the twin critics of the mean squared error (TD3 / D3G).

    Args:
        q: ``[B, L, 2]`` both critics at ``(s, s', g)``.
        target: ``[B, L]``.
    """
    return (q - target.detach().unsqueeze(-1)).square().mean(dim=(0, 1)).sum()


def inverse_loss(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the inverse model ``I(s, s') [B, A]`` on the taken actions ``[B]``
    (the discrete analogue of D3G's MSE on continuous actions)."""
    return F.cross_entropy(logits, actions.long())


def forward_loss(pred_delta: torch.Tensor, true_delta: torch.Tensor, delta_scale: torch.Tensor) -> torch.Tensor:
    """MSE of the forward model's ``f(s, a) [B, d]`` against ``s' - s [B, d]`` (wrapped),
    per dim in units of ``delta_scale [d]``; 0 exactly when ``f`` is perfect."""
    return ((pred_delta - true_delta) / delta_scale).square().mean()


def tau_loss(q1_cycle: torch.Tensor, cycle_gap: torch.Tensor) -> torch.Tensor:
    """D3G's proposal loss ``-Q1(s, cycle, g) + ||cycle - (s + tau(s, g))||^2``.

    Args:
        q1_cycle: ``[B, L]`` the first critic at the cycle-consistent next state
            ``cycle = s + f(s, I(s, s + tau(s, g)))`` (critic weights frozen).
        cycle_gap: ``[B, L, d]`` ``cycle - (s + tau(s, g))`` (wrapped, in units of
            ``delta_scale``): the proposal should be reachable by one action.
    """
    return -q1_cycle.mean() + cycle_gap.square().sum(-1).mean()


def soft_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """Polyak averaging ``target <- tau online + (1 - tau) target`` (in place)."""
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.lerp_(o, tau)
