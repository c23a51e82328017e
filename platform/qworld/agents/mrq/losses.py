"""MR.Q's targets and losses as pure torch functions (no Ray, no modules).

Shapes: B batch, H transitions of a replay window, L goals, A actions, K reward bins,
Z width of a state embedding.

Every transition carries the reward and the termination of all L goals of the goal set
(the goal env's ``info["rewards"]`` / ``info["terminals"]``), so one replayed window can
train the reward / terminal heads and the Q-values of any goal, as HER relabels a
transition with other goals. One gradient step trains them at G goals drawn uniformly
from the L (:func:`draw_goals`; the learner's ``goals_per_step``), not at every goal:
the goal axis ``L`` below is then those G goals, and each loss (a mean over goals) is
an unbiased estimate of its all-goals value. This is our deviation from MR.Q
(Fujimoto et al. 2025), which predicts one reward and one value per transition; with
G >= L it is exactly the all-goals loss.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def draw_goals(num_goals: int, k: int, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """``k`` distinct goals of ``num_goals``, uniformly, sorted ``[k]`` long; None (all
    goals) when ``k >= num_goals``."""
    if int(k) >= int(num_goals):
        return None
    return torch.randperm(int(num_goals), generator=generator)[: int(k)].sort().values


def symexp(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) (exp(|x|) - 1)``: the spacing of MR.Q's reward bins."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def reward_bins(num_bins: int, lower: float = -10.0, upper: float = 10.0) -> torch.Tensor:
    """``[K]`` bin locations: ``symexp`` of ``num_bins`` evenly spaced points in [lower, upper]."""
    return symexp(torch.linspace(lower, upper, num_bins))


def two_hot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Two-hot encoding of ``x [...]`` over sorted ``bins [K]`` -> ``[..., K]``.

    The mass is split between the two bins around ``x`` so that the expectation over the
    bins equals ``x`` (values outside the range go to the end bin).
    """
    x = x.clamp(float(bins[0]), float(bins[-1]))
    K = bins.shape[0]
    hi = torch.searchsorted(bins, x.contiguous(), right=False).clamp(1, K - 1)
    lo = hi - 1
    b_lo, b_hi = bins[lo], bins[hi]
    w_hi = ((x - b_lo) / (b_hi - b_lo)).clamp(0.0, 1.0)
    out = torch.zeros(*x.shape, K, dtype=x.dtype, device=x.device)
    out.scatter_(-1, lo.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, hi.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def n_step_returns(
    rewards: torch.Tensor, terminals: torch.Tensor, valid: torch.Tensor, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-goal n-step returns of windows that may end early.

    Goal g's return stops at its first terminal transition (the episode itself goes on
    for the commanded goal, so later transitions still exist); a window stops at its
    first invalid transition (the episode ended), and the bootstrap state is then the
    last valid next state.

    Args:
        rewards: ``[B, n, L]`` reward of every goal for transitions 0..n-1.
        terminals: ``[B, n, L]`` bool, goal g terminates on that transition.
        valid: ``[B, n]`` bool, the transition exists (a prefix of True; row 0 True).
        gamma: discount.

    Returns:
        ``(returns [B, L], bootstrap_discount [B, L], bootstrap_index [B] long)``:
        ``sum_k gamma^k alive_k r_k`` over valid k, ``gamma^m alive_m`` (0 where goal g
        terminated) and m, the number of valid transitions (the window's observation
        index to bootstrap from).
    """
    B, n, L = rewards.shape
    v = valid.to(rewards.dtype)  # [B, n]
    alive = torch.ones(B, L, dtype=rewards.dtype, device=rewards.device)
    ret = torch.zeros(B, L, dtype=rewards.dtype, device=rewards.device)
    disc = torch.ones(B, L, dtype=rewards.dtype, device=rewards.device)
    for k in range(n):
        vk = v[:, k : k + 1]  # [B, 1]
        ret = ret + vk * disc * alive * rewards[:, k]
        alive = torch.where(vk > 0, alive * (1.0 - terminals[:, k].to(rewards.dtype)), alive)
        disc = torch.where(vk > 0, disc * gamma, disc)
    m = valid.long().sum(-1)
    return ret, disc * alive, m


def value_target(
    returns: torch.Tensor,
    bootstrap_discount: torch.Tensor,
    next_q_target: torch.Tensor,
    reward_scale: float,
    target_reward_scale: float,
) -> torch.Tensor:
    """MR.Q's scaled value target ``(R + gamma^n Qbar r') / r``, per goal.

    Args:
        returns: ``[B, L]`` n-step returns (unscaled rewards).
        bootstrap_discount: ``[B, L]`` ``gamma^m alive_m``.
        next_q_target: ``[B, L]`` target network's value at the bootstrap state (its own
            scale: multiply by ``target_reward_scale`` to get returns).
        reward_scale: r, the mean |reward| of the buffer the online Q is trained at.
        target_reward_scale: r', the scale the target network was trained at.
    """
    return (returns + bootstrap_discount * next_q_target * target_reward_scale) / reward_scale


def greedy_target_value(q_target_all: torch.Tensor) -> torch.Tensor:
    """``[B, 2, L, A]`` two target heads -> ``[B, L]``: clipped double Q at the greedy action.

    The action is the argmax over actions of the min over the two heads (the same
    min-of-two the behaviour policy acts on), and its value is that min.
    """
    return q_target_all.min(dim=1).values.max(dim=-1).values


def huber(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Elementwise Huber loss (quadratic below ``delta``), no reduction."""
    return F.huber_loss(pred, target, reduction="none", delta=delta)


def value_loss(q_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber loss of both heads ``q_pred [B, 2, L]`` against ``target [B, L]``, mean."""
    return huber(q_pred, target.unsqueeze(1).expand_as(q_pred).detach()).mean()


def encoder_losses(
    pred_zs: torch.Tensor,
    target_zs: torch.Tensor,
    reward_logits: torch.Tensor,
    rewards: torch.Tensor,
    pred_terminal: torch.Tensor,
    terminals: torch.Tensor,
    valid: torch.Tensor,
    bins: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """MR.Q's model losses over an unroll of H steps, averaged over valid steps.

    Args:
        pred_zs: ``[B, H, Z]`` the linear model's next-state embedding, unrolled on its
            own predictions from ``f(s_0)``.
        target_zs: ``[B, H, Z]`` target encoder's ``f(s_{t+1})``.
        reward_logits: ``[B, H, L, K]`` reward logits of every goal.
        rewards: ``[B, H, L]`` every goal's reward.
        pred_terminal: ``[B, H, L]`` predicted termination of every goal.
        terminals: ``[B, H, L]`` every goal's termination (bool or float).
        valid: ``[B, H]`` bool, the transition exists.
        bins: ``[K]`` reward bin locations.

    Returns:
        ``{"dynamics", "reward", "terminal"}``: per-step MSE over the embedding, soft
        cross-entropy against the two-hot reward (mean over goals), MSE of the
        terminal prediction (mean over goals), each summed over the unroll and divided
        by the number of windows (MR.Q sums its unroll), masked by ``valid``.
    """
    m = valid.to(pred_zs.dtype)  # [B, H]
    B = pred_zs.shape[0]
    dyn = ((pred_zs - target_zs.detach()) ** 2).mean(-1)  # [B, H]
    ce = -(two_hot(rewards, bins) * F.log_softmax(reward_logits, dim=-1)).sum(-1).mean(-1)  # [B, H]
    term = ((pred_terminal - terminals.to(pred_zs.dtype)) ** 2).mean(-1)  # [B, H]
    return {
        "dynamics": (dyn * m).sum() / B,
        "reward": (ce * m).sum() / B,
        "terminal": (term * m).sum() / B,
    }
