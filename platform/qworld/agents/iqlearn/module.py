"""IQ-Learn's RLModule: PQN's all-goals soft Q-network on one-hot finite states.

Shapes: B batch, S states, L goals, A actions.

The network is ``PQNTorchRLModule`` with the ``all_goals`` head (``[Linear -> LayerNorm ->
ReLU] * n -> Linear``, one output per goal and action): ``q_all_goals(state [B, S]) ->
[B, L, A]``, so ``obs_dim = S`` and ``qworld.agents.load_q`` serves it like any family.
A demonstration's observation is ``concat(one_hot(s) [S], one_hot(goal) [L])``
(``qworld.demonstrations``); :meth:`split_obs` separates the two parts. Acting (greedy
on the commanded goal) is PQN's; IQ-Learn never acts while it learns.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.utils.annotations import override

from qworld.agents.pqn.module import PQNTorchRLModule


class IQLearnTorchRLModule(PQNTorchRLModule):
    """Soft Q over the goal set (see module doc). ``model_config`` as ``PQNTorchRLModule``'s
    with ``head="all_goals"``, ``q_output="linear"`` (IQ-Learn's Q is unbounded)."""

    def split_obs(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[B, S + L]`` demonstration observations -> ``(state obs [B, S], goal index [B] long)``."""
        if obs.shape[-1] != self.obs_dim + self.goal_dim:
            raise ValueError(f"obs has width {obs.shape[-1]}; expected concat(one_hot(state), goal features) "
                             f"of width {self.obs_dim} + {self.goal_dim}")
        state = obs[..., : self.obs_dim].float()
        return state, self.goal_index(obs[..., self.obs_dim :].float())

    @override(RLModule)
    def _forward_train(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        # The learner needs Q at s and s' of each transition's goal (IQLearnTorchLearner).
        return {}
