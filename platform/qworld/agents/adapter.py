"""An agent's Q as a differentiable function of continuous states, for P-learning.

Shapes: B batch, d state dims, L goals, A actions.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from qworld.worldmodel.plearn.continuous import QFn


def agent_q_fn(qfun: Any, problem: Any) -> QFn:
    """Adapt an agent to ``q_fn(states [B, d], goal [B]) -> [B, A]`` (``goal=None``: ``[B, L, A]``).

    Accepted agents, tried in this order:

    - a ``qworld.agents.QFunction`` (or anything with a ``.module`` that has
      ``q_all_goals(obs [B, obs_dim]) -> [B, L, A]`` and ``q_goals(obs, goal [B]) -> [B, A]``,
      the ``PQNTorchRLModule``): the module is deep-copied, frozen
      (``requires_grad=False``) and put in eval mode, so P-learning's gradients flow to the
      states only and a live training module is never touched;
    - an object with ``q_values(obs [B, obs_dim + goal_dim]) -> [B, A]``, or such a
      callable itself (observation ``concat(observe(s), goal_features[g])``).

    States are observed with the problem's ``observe`` (float32), exactly as the envs do;
    outputs are on the states' device.

    Raises:
        ValueError: the module's goal count or observation size does not match the problem.
    """
    dyn, feats = problem.dynamics, problem.goals.features
    module = getattr(qfun, "module", None)
    if module is not None and hasattr(module, "q_all_goals"):
        if int(module.num_goals) != problem.goals.num_goals or int(module.obs_dim) != dyn.obs_dim:
            raise ValueError(f"agent has L={module.num_goals}, obs_dim={module.obs_dim}; the problem "
                             f"{problem.env_id} has L={problem.goals.num_goals}, obs_dim={dyn.obs_dim}")
        frozen = copy.deepcopy(module).eval().requires_grad_(False)
        param = next(frozen.parameters())

        def module_q_fn(states: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
            obs = dyn.observe(states).to(device=param.device, dtype=param.dtype)
            if goal is None:
                out = frozen.q_all_goals(obs)  # [B, L, A]
            else:
                goal = torch.as_tensor(goal, device=obs.device).long().expand(obs.shape[0])
                out = frozen.q_goals(obs, goal)  # [B, A]
            return out.to(states.device)

        return module_q_fn

    net = getattr(qfun, "q_values", qfun)

    def q_fn(states: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        obs = dyn.observe(states).float()
        f = feats.to(obs.device)
        if goal is None:  # every goal: [B, L, A]
            return torch.stack([net(torch.cat([obs, f[g].expand(len(obs), -1)], -1)) for g in range(len(f))], 1)
        goal = torch.as_tensor(goal, device=obs.device).long().expand(obs.shape[0])
        return net(torch.cat([obs, f[goal]], -1))

    return q_fn
