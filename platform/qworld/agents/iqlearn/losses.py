"""IQ-Learn's offline loss as pure torch functions (no Ray, no modules).

Shapes: B batch, A actions. All Q-values are those of each transition's own goal.

IQ-Learn (Garg et al., NeurIPS 2021) learns a soft Q-function from expert transitions
only; the reward it implies is the inverse soft Bellman residual

    r(s, a, s') = Q(s, a) - gamma (1 - done) V(s'),   V(s) = T logsumexp(Q(s, .) / T)

with T the soft-Q (entropy) temperature. The offline objective minimised here is the one
of the public code (``Div99/IQ-Learn``, ``method.loss=value_expert`` with the chi^2
divergence), every expectation over expert transitions (offline, all data is expert):

    loss = -E[Q(s, a) - gamma (1 - d) V(s')]             (expert reward up)
           + E[V(s) - gamma (1 - d) V(s')]                (value term over expert states;
                                                           the offline stand-in for
                                                           (1 - gamma) E_{rho_0}[V(s_0)])
           + 1 / (4 alpha) E[(Q(s, a) - gamma (1 - d) V(s'))^2]   (chi^2 regulariser)

alpha = 0.5 as in the public code. ``d`` is ``terminated`` only: a transition cut by the
time limit still bootstraps from V(s'). Gradients flow through V(s') (no target network,
the public code's default ``use_target=False``).
"""

from __future__ import annotations

from typing import Dict

import torch

LOSS = "iq_loss"  # the total loss
EXPERT_REWARD = "expert_reward"  # E[Q(s, a) - gamma (1 - d) V(s')]: the recovered reward's mean
VALUE_TERM = "value_term"  # E[V(s) - gamma (1 - d) V(s')]
CHI2 = "chi2_regulariser"  # 1 / (4 alpha) E[r^2]


def soft_value(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """``V = T logsumexp(Q / T)`` over the last (action) axis: ``[..., A] -> [...]``."""
    return temperature * torch.logsumexp(q / temperature, dim=-1)


def recovered_reward(q_taken: torch.Tensor, v_next: torch.Tensor, terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """``r(s, a, s') = Q(s, a) - gamma (1 - d) V(s')``: ``[B]`` (the reward IQ-Learn recovers)."""
    return q_taken - gamma * (1.0 - terminated.to(q_taken.dtype)) * v_next


def iq_learn_loss(q: torch.Tensor, q_next: torch.Tensor, actions: torch.Tensor, terminated: torch.Tensor,
                  gamma: float, alpha: float, temperature: float) -> Dict[str, torch.Tensor]:
    """IQ-Learn's offline chi^2 loss on a batch of expert transitions (see module doc).

    Args:
        q: ``[B, A]`` Q(s, ., g) of each transition's state and goal.
        q_next: ``[B, A]`` Q(s', ., g).
        actions: ``[B]`` the expert's actions.
        terminated: ``[B]`` s' is terminal for g (bool or 0/1).
        gamma: discount.
        alpha: chi^2 regulariser weight ``1 / (4 alpha)``.
        temperature: soft-Q temperature T of ``V = T logsumexp(Q / T)``.

    Returns:
        ``{LOSS, EXPERT_REWARD, VALUE_TERM, CHI2}`` scalars; ``LOSS`` carries the gradient.
    """
    q_taken = q.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    v = soft_value(q, temperature)
    v_next = soft_value(q_next, temperature)
    keep = gamma * (1.0 - terminated.to(q.dtype))
    reward = q_taken - keep * v_next
    expert_reward = reward.mean()
    value_term = (v - keep * v_next).mean()
    chi2 = reward.square().mean() / (4.0 * alpha)
    return {LOSS: -expert_reward + value_term + chi2, EXPERT_REWARD: expert_reward, VALUE_TERM: value_term, CHI2: chi2}
