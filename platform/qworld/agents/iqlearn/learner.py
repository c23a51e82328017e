"""IQ-Learn's Learner: the offline chi^2 IQ loss (``losses.iq_learn_loss``) on expert batches.

What IQ-Learn is GIVEN: demonstration transitions ``(s, a, s', terminated, goal)`` read by
RLlib's offline pipeline (``Columns.OBS`` / ``NEXT_OBS`` hold ``concat(one_hot(s),
one_hot(goal))``, ``ACTIONS``, ``TERMINATEDS``). It never reads ``Columns.REWARDS`` (the
file carries the true reward only because RLlib's schema requires the column) and never
sees the transition tensor P.

One gradient step per minibatch of B transitions: Q(s, ., g) and Q(s', ., g) of each
transition's own goal g from the all-goals network, then the loss. One Adam optimizer
(RLlib's default ``configure_optimizers_for_module``, ``config.lr``); no target network.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from qworld.agents.iqlearn import losses as Lz

Q_MEAN_KEY = "q_mean"  # mean Q(s, a, g) of the expert's actions
LOSS_KEYS = (Lz.LOSS, Lz.EXPERT_REWARD, Lz.VALUE_TERM, Lz.CHI2)


def iq_learn_losses(module, batch: Dict[str, Any], gamma: float, alpha: float, temperature: float) -> Dict[str, torch.Tensor]:
    """IQ-Learn's loss terms of ``module`` on a batch of demonstration transitions."""
    state, goal = module.split_obs(batch[Columns.OBS])
    next_state, next_goal = module.split_obs(batch[Columns.NEXT_OBS])
    q = module.q_goals(state, goal)  # [B, A]
    q_next = module.q_goals(next_state, next_goal)  # [B, A]
    actions = batch[Columns.ACTIONS].long()
    out = Lz.iq_learn_loss(q, q_next, actions, batch[Columns.TERMINATEDS], gamma, alpha, temperature)
    out[Q_MEAN_KEY] = q.detach().gather(-1, actions.unsqueeze(-1)).mean()
    return out


class IQLearnTorchLearner(TorchLearner):
    """Learner of offline IQ-Learn (see module doc)."""

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: Dict[str, Any], fwd_out: Dict[str, Any]) -> torch.Tensor:
        module = self.module[module_id].unwrapped()
        out = iq_learn_losses(module, batch, float(self.config.gamma), float(self.config.alpha),
                              float(self.config.temperature))
        for key, value in out.items():
            self.metrics.log_value((module_id, key), value.detach(), window=1)
        return out[Lz.LOSS]
