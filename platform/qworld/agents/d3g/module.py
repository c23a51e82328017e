"""Goal-conditioned D3G RLModule: forward model, inverse model, proposal net, twin critic.

Shapes: B batch, L goals (the problem's goal set), A actions, d state dims, o obs dims,
k goal-feature dims.

All networks work in the env's world-model *state* space; their inputs are featurised
with the env's own ``observe(s)`` (the features every other agent sees) and, for pairs of
states, the wrapped difference ``(s' - s) / delta_scale``:

- forward model ``f(s, a) -> Delta s = delta_scale * MLP(observe(s), one_hot(a))``; the
  predicted next state is ``s + Delta s`` wrapped to ``[-pi, pi)`` on the periodic dims
  (as ``qworld.worldmodel.plearn.continuous.SuccessorNet``), goal-free;
- inverse model ``I(s, s') -> [A]`` action logits, goal-free;
- proposal ``tau(s, g) -> Delta s`` (same scaling), the next state the agent wants:
  ``s + tau(s, g)``; goal-conditioned on the goal's features;
- twin critic ``Q_i(s, s', g)`` (a QSS value: the return of moving from s to s').

``delta_scale = delta_fraction * (high - low)`` of the state box, per dim.

The QFunction API (``q_all_goals`` / ``q_goals`` / ``q_features``) takes *observations*
``observe(s)`` like every family's, recovers the state with the env's inverse observation
(``qworld.agents.d3g.unobserve``) and gives ``Q(s, a, g) = min_i Q_i(s, s + f(s, a), g)``
(the min of the twins, as in the critic's target). The scorer uses
``forward_model_states(states, actions)``: the forward model as a state-space step function.

Acting: ``a = argmax_a I(s, s + tau(s, g))`` for the commanded goal, epsilon-greedy while
exploring.

The target critic and target proposal net live in the module (plain submodules), so
checkpoints and ``RLModule.from_checkpoint`` restore them without a Learner.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from qworld.agents.pqn.module import linear_epsilon
from qworld.agents.pqn.problem import setup_problem_attributes
from qworld_envs.continuous import wrap_periodic

REQUIRED_KEYS = ("obs_dim", "goal_dim", "num_goals", "num_actions", "goal_features", "env_id", "env_kwargs",
                 "state_low", "state_high", "periodic")


def relu_mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """``[Linear -> ReLU] * len(hidden) -> Linear`` (D3G: 2 x 256)."""
    layers: list = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU()]
        d = int(h)
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class TwinCritic(nn.Module):
    """``Q_1, Q_2 (pair features, goal features) -> [..., 2]``."""

    def __init__(self, in_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.q1 = relu_mlp(in_dim, hidden, 1)
        self.q2 = relu_mlp(in_dim, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q1(x), self.q2(x)], -1)


class D3GTorchRLModule(TorchRLModule):
    """Goal-conditioned D3G networks with the QFunction API (see module doc).

    ``model_config``:
        obs_dim, goal_dim, num_goals (L), num_actions (A), goal_features ``[L][k]``: the
            problem (goal features kept as a buffer, so checkpoints hold them);
        env_id, env_kwargs: the continuous env (its ``observe`` and inverse observation);
        state_low, state_high, periodic: ``[d]`` the state box and angle dims;
        hidden_sizes: MLP widths of every network; delta_fraction: ``delta_scale`` as a
            fraction of the box; epsilon_start, epsilon_end, epsilon_decay_steps:
            exploration schedule over env steps.
    """

    @override(RLModule)
    def setup(self):
        import qworld_envs

        from qworld.agents.d3g.unobserve import unobserve_fn

        mc = self.model_config
        setup_problem_attributes(self, mc, REQUIRED_KEYS)
        self.env_id = str(mc["env_id"])
        low = torch.as_tensor(mc["state_low"], dtype=torch.float32)
        high = torch.as_tensor(mc["state_high"], dtype=torch.float32)
        self.state_dim = int(low.shape[0])
        self.register_buffer("periodic", torch.as_tensor(mc["periodic"], dtype=torch.bool).reshape(self.state_dim))
        self.register_buffer("delta_scale", float(mc.get("delta_fraction", 0.05)) * (high - low))
        problem = qworld_envs.make_continuous_problem(self.env_id, **dict(mc["env_kwargs"]))
        self._observe = problem.dynamics.observe_fn
        self._unobserve = unobserve_fn(self.env_id)
        if self._unobserve is None:
            raise ValueError(f"D3G has no inverse observation for {self.env_id!r} (qworld.agents.d3g.unobserve)")
        hidden = [int(h) for h in mc.get("hidden_sizes", (256, 256))]
        o, d, k, A = self.obs_dim, self.state_dim, self.goal_dim, self.num_actions
        self.forward_model = relu_mlp(o + A, hidden, d)
        self.inverse_model = relu_mlp(2 * o + d, hidden, A)
        self.tau = relu_mlp(o + k, hidden, d)
        self.critic = TwinCritic(2 * o + d + k, hidden)
        self.target_tau = copy.deepcopy(self.tau).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.epsilon_start = float(mc.get("epsilon_start", 1.0))
        self.epsilon_end = float(mc.get("epsilon_end", 0.05))
        self.epsilon_decay_steps = float(mc.get("epsilon_decay_steps", 0))

    # ------------------------------------------------------------------ features
    def observe(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` states -> ``[..., o]`` the env's observation features (float32)."""
        s = states.float()
        return self._observe(s.reshape(-1, self.state_dim)).reshape(*s.shape[:-1], self.obs_dim)

    def unobserve(self, obs: torch.Tensor) -> torch.Tensor:
        """``[B, o]`` observations ``observe(s)`` -> ``[B, d]`` states s (float32)."""
        return self._unobserve(obs.float())

    def state_delta(self, next_states: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """``s' - s`` wrapped on the periodic dims, in state units."""
        return wrap_periodic(next_states - states, self.periodic)

    def step(self, states: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``s + delta`` wrapped on the periodic dims."""
        return wrap_periodic(states + delta, self.periodic)

    def pair_features(self, states: torch.Tensor, next_states: torch.Tensor) -> torch.Tensor:
        """``[..., 2 o + d]``: ``observe(s), observe(s'), (s' - s) / delta_scale``."""
        return torch.cat([self.observe(states), self.observe(next_states),
                          self.state_delta(next_states, states) / self.delta_scale], -1)

    # ------------------------------------------------------------------ the four networks
    def forward_delta(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``f(s, a)``: ``[..., d]`` predicted ``s' - s`` in state units."""
        a1 = F.one_hot(actions.long(), self.num_actions).float()
        return self.forward_model(torch.cat([self.observe(states), a1], -1)) * self.delta_scale

    def forward_delta_all_actions(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., A, d]`` ``f(s, a)`` for every action."""
        A = self.num_actions
        s = states.unsqueeze(-2).expand(*states.shape[:-1], A, self.state_dim)
        a = torch.arange(A, device=states.device).expand(*states.shape[:-1], A)
        return self.forward_delta(s, a)

    def inverse_logits(self, states: torch.Tensor, next_states: torch.Tensor) -> torch.Tensor:
        """``I(s, s')``: ``[..., A]`` logits of the action that moves s to s'."""
        return self.inverse_model(self.pair_features(states, next_states))

    def propose(self, states: torch.Tensor, goal_features: torch.Tensor, target: bool = False) -> torch.Tensor:
        """``s + tau(s, g)`` (wrapped): ``[..., d]`` the next state wanted for goal features ``[..., k]``."""
        net = self.target_tau if target else self.tau
        delta = net(torch.cat([self.observe(states), goal_features.float()], -1)) * self.delta_scale
        return self.step(states.float(), delta)

    def critic_values(self, states: torch.Tensor, next_states: torch.Tensor, goal_features: torch.Tensor,
                      target: bool = False) -> torch.Tensor:
        """``[..., 2]`` both critics ``Q_i(s, s', g)``."""
        net = self.target_critic if target else self.critic
        return net(torch.cat([self.pair_features(states, next_states), goal_features.float()], -1))

    # ------------------------------------------------------------------ the world model
    @torch.no_grad()
    def forward_model_states(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The forward model as a state-space step: ``[B, d]`` states, ``[B]`` long actions ->
        ``[B, d]`` predicted next states ``s + f(s, a)`` (wrapped on the periodic dims), in
        the dtype of ``states``."""
        s = states.float()
        return self.step(s, self.forward_delta(s, actions)).to(states.dtype)

    def act_states(self, states: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Greedy D3G action ``argmax I(s, s + tau(s, g))``: ``[B, d]``, ``[B]`` long -> ``[B]``."""
        g = self.goal_features[goal.long()]
        s = states.float()
        return self.inverse_logits(s, self.propose(s, g)).argmax(-1)

    # ------------------------------------------------------------------ Q-values (QFunction API)
    def q_all_goals_states(self, states: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` states -> ``[B, L, A]``: ``min_i Q_i(s, s + f(s, a), g)``."""
        s = states.float()
        B, L, A = s.shape[0], self.num_goals, self.num_actions
        nxt = self.step(s[:, None], self.forward_delta_all_actions(s))  # [B, A, d]
        s_e = s[:, None, None].expand(B, L, A, self.state_dim)
        n_e = nxt[:, None].expand(B, L, A, self.state_dim)
        g_e = self.goal_features[None, :, None].expand(B, L, A, self.goal_dim)
        return self.critic_values(s_e, n_e, g_e).min(-1).values

    def q_features_states(self, states: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` states, ``[B, k]`` goal features (any goal) -> ``[B, A]``."""
        s = states.float()
        B, A = s.shape[0], self.num_actions
        nxt = self.step(s[:, None], self.forward_delta_all_actions(s))  # [B, A, d]
        g = goal_features.float()[:, None].expand(B, A, self.goal_dim)
        return self.critic_values(s[:, None].expand(B, A, self.state_dim), nxt, g).min(-1).values

    def q_all_goals(self, obs: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim]`` observations ``observe(s)`` -> ``[B, L, A]`` (see ``q_all_goals_states``)."""
        return self.q_all_goals_states(self.unobserve(obs))

    def q_goals(self, obs: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim]`` observations, ``[B]`` long goal indices -> ``[B, A]``."""
        return self.q_features(obs, self.goal_features[goal.long()])

    def q_features(self, obs: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim]`` observations, ``[B, k]`` goal features -> ``[B, A]`` (the critic
        takes the goal's features, so any goal works, not only the goal set)."""
        return self.q_features_states(self.unobserve(obs), goal_features)

    def goal_index(self, goal_features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest goal of the goal set, ``[B, k] -> [B]`` long."""
        return torch.cdist(goal_features.to(self.goal_features.dtype), self.goal_features).argmin(-1)

    def _commanded(self, batch: Dict[str, Any]):
        obs = batch[Columns.OBS].float()
        if obs.shape[-1] != self.obs_dim + self.goal_dim:
            raise ValueError(f"obs must be concat(observe(state), goal features) of width {self.obs_dim + self.goal_dim}")
        return self.unobserve(obs[..., : self.obs_dim]), self.goal_index(obs[..., self.obs_dim :])

    # ------------------------------------------------------------------ forward passes
    @override(RLModule)
    def _forward_inference(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTIONS: self.act_states(*self._commanded(batch))}

    @override(RLModule)
    def _forward_exploration(self, batch: Dict[str, Any], t: Optional[int] = None, **kwargs) -> Dict[str, Any]:
        with torch.no_grad():
            greedy = self.act_states(*self._commanded(batch))
            eps = linear_epsilon(t or 0, self.epsilon_start, self.epsilon_end, self.epsilon_decay_steps)
            B = greedy.shape[0]
            explore = torch.rand(B, device=greedy.device) < eps
            random_actions = torch.randint(self.num_actions, (B,), device=greedy.device)
            return {Columns.ACTIONS: torch.where(explore, random_actions, greedy)}

    @override(RLModule)
    def _forward_train(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        # The learner computes D3G's losses itself (D3GTorchLearner).
        return {}
