"""Goal-conditioned Q-network RLModule for PQN.

Shapes: B batch, L goals (the problem's goal set), A actions.

Two heads (``model_config["head"]``):

- ``"all_goals"`` (LEO-style): input the state observation only, output Q for every goal
  of the goal set at once, ``[B, L, A]``. One forward pass serves all L goals.
- ``"goal_input"``: input ``concat(state obs, goal features)``, output ``[B, A]`` for that
  goal (works for goals outside the training set, and with HER).

Batch conventions (keys of the dict given to ``forward_*`` / ``compute_q_values``):

- ``Columns.OBS`` either ``[B, obs_dim + goal_dim]`` = ``concat(state obs, goal features)``
  (what the gymnasium env observes; RLlib's standard runner) or ``[B, obs_dim]`` state
  only, then ``GOAL`` is required;
- ``GOAL`` (optional) ``[B]`` long: index of the commanded goal in the goal set; when
  absent with a concatenated OBS, the all-goals head finds it by matching the goal
  features against the goal set;
- ``EPSILON`` (optional, exploration only) scalar or ``[B]``: exploration rate; otherwise
  the module's linear schedule at ``t`` (env steps), else ``self.epsilon``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ray.rllib.algorithms.dqn.dqn_learner import QF_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import QNetAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from qworld.agents.pqn.problem import setup_problem_attributes

GOAL = "goal"  # [B] long: commanded goal index
EPSILON = "epsilon"  # scalar or [B]: exploration rate for this forward pass
Q_ALL_GOALS = "q_all_goals"  # [B, L, A]: Q of every goal of the goal set (all_goals head)
RETURN_Q_ALL_GOALS = "return_q_all_goals"  # batch flag: exploration also returns Q_ALL_GOALS

HEADS = ("all_goals", "goal_input")
Q_OUTPUTS = ("linear", "sigmoid")  # what the module builds (PQNConfig also takes "auto")

def linear_epsilon(t: float, start: float, end: float, decay_steps: float) -> float:
    """Epsilon decayed linearly from ``start`` to ``end`` over ``decay_steps`` env steps."""
    if decay_steps <= 0:
        return float(end)
    frac = min(max(float(t) / float(decay_steps), 0.0), 1.0)
    return float(start + frac * (end - start))


def mlp(in_dim: int, hidden_sizes: Sequence[int], out_dim: int) -> nn.Sequential:
    """``[Linear -> LayerNorm -> ReLU] * len(hidden_sizes) -> Linear``."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden_sizes:
        layers += [nn.Linear(d, int(h)), nn.LayerNorm(int(h)), nn.ReLU()]
        d = int(h)
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class FourierEncoder(nn.Module):
    """``x -> concat(x, sin(2 pi x B), cos(2 pi x B))`` with a fixed random ``B``.

    Random Fourier features (Tancik et al. 2020): a ReLU MLP on raw low-dimensional states
    fits smooth functions first and sharp ones (the goal-reaching value's edges) last, and
    P-learning needs Q Bellman-consistent to about 1e-3 at the true next state. ``B`` is a
    buffer, so checkpoints hold it.

    Args:
        in_dim: width of ``x`` (state observation, scaled to about [-1, 1]).
        num_features: F, columns of ``B`` (output width ``in_dim + 2 F``).
        scale: standard deviation of ``B``'s entries, in cycles per unit of ``x``.
        seed: seed of ``B``.
    """

    def __init__(self, in_dim: int, num_features: int, scale: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("B", torch.randn(in_dim, num_features, generator=g) * float(scale))
        self.out_dim = in_dim + 2 * num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 2.0 * torch.pi * (x @ self.B)
        return torch.cat([x, torch.sin(z), torch.cos(z)], dim=-1)


class PQNTorchRLModule(TorchRLModule, QNetAPI):
    """Goal-conditioned Q-network (MLP with LayerNorm + ReLU), epsilon-greedy acting.

    ``model_config`` (all required except the problem and epsilon entries):
        obs_dim, goal_dim, num_goals (L), num_actions (A): sizes of the problem;
        goal_features: ``[L][goal_dim]`` the goal set (kept as a buffer, so the
            checkpoint holds it);
        hidden_sizes: widths of the hidden layers;
        fourier_features, fourier_scale: random Fourier features of the state before
            the MLP (0 = the raw state; see FourierEncoder);
        head: "all_goals" | "goal_input";
        q_output: "linear" | "sigmoid" (sigmoid when returns lie in [0, 1]; a config's
            "auto" is resolved by ``PQNConfig.resolved_q_output`` before it gets here);
        q_scale: factor on the linear head's output (default 1; see
            ``PQNConfig.resolved_q_scale``);
        epsilon_start, epsilon_end, epsilon_decay_steps: exploration schedule;
        env_id, env_kwargs: the problem this module is trained on (informational).
    """

    @override(RLModule)
    def setup(self):
        mc = self.model_config
        setup_problem_attributes(self, mc)
        self.head = mc.get("head", "all_goals")
        self.q_output = mc.get("q_output", "linear")
        self.q_scale = float(mc.get("q_scale", 1.0))
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.q_output not in Q_OUTPUTS:
            raise ValueError(f"q_output must be one of {Q_OUTPUTS}, got {self.q_output!r}")
        self.hidden_sizes = tuple(int(h) for h in mc.get("hidden_sizes", (256, 256)))
        self.fourier_features = int(mc.get("fourier_features", 0))
        if self.fourier_features > 0:
            self.encoder: nn.Module = FourierEncoder(self.obs_dim, self.fourier_features, float(mc.get("fourier_scale", 1.0)))
            state_width = self.encoder.out_dim
        else:
            self.encoder = nn.Identity()
            state_width = self.obs_dim
        if self.head == "all_goals":
            self.q_net = mlp(state_width, self.hidden_sizes, self.num_goals * self.num_actions)
        else:
            self.q_net = mlp(state_width + self.goal_dim, self.hidden_sizes, self.num_actions)
        self.epsilon_start = float(mc.get("epsilon_start", 1.0))
        self.epsilon_end = float(mc.get("epsilon_end", 0.1))
        self.epsilon_decay_steps = float(mc.get("epsilon_decay_steps", 0))
        # Used when neither the batch nor `t` gives an exploration rate.
        self.epsilon = self.epsilon_start

    # ------------------------------------------------------------------ Q-values
    def _squash(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) if self.q_output == "sigmoid" else self.q_scale * x

    def q_all_goals(self, state: torch.Tensor) -> torch.Tensor:
        """Q of every goal of the goal set.

        Args:
            state: ``[B, obs_dim]`` state observations.

        Returns:
            ``[B, L, A]``.
        """
        B = state.shape[0]
        if self.head == "all_goals":
            return self._squash(self.q_net(self.encoder(state))).reshape(B, self.num_goals, self.num_actions)
        L = self.num_goals
        state = self.encoder(state)
        x = torch.cat(
            [
                state.unsqueeze(1).expand(B, L, state.shape[-1]),
                self.goal_features.unsqueeze(0).expand(B, L, self.goal_dim),
            ],
            dim=-1,
        )
        return self._squash(self.q_net(x.reshape(B * L, -1))).reshape(B, L, self.num_actions)

    def q_goals(self, state: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Q of one goal of the goal set per row.

        Args:
            state: ``[B, obs_dim]``.
            goal: ``[B]`` long goal indices.

        Returns:
            ``[B, A]``.
        """
        goal = goal.long()
        if self.head == "all_goals":
            q = self.q_all_goals(state)
            return q[torch.arange(q.shape[0], device=q.device), goal]
        return self.q_features(state, self.goal_features[goal])

    def q_features(self, state: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        """Q for arbitrary goal features (goal_input head only).

        Args:
            state: ``[B, obs_dim]``.
            goal_features: ``[B, goal_dim]``.

        Returns:
            ``[B, A]``.
        """
        if self.head != "goal_input":
            raise ValueError("q_features needs head='goal_input'; the all_goals head only knows its goal set")
        return self._squash(self.q_net(torch.cat([self.encoder(state), goal_features.to(state.dtype)], dim=-1)))

    def goal_index(self, goal_features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest goal of the goal set, ``[B, goal_dim] -> [B]`` long."""
        return torch.cdist(goal_features.to(self.goal_features.dtype), self.goal_features).argmin(-1)

    def _split(self, batch: Dict[str, Any]):
        """-> (state [B, obs_dim], goal index [B] or None, goal features [B, goal_dim] or None)."""
        obs = batch[Columns.OBS]
        goal = batch.get(GOAL)
        width = obs.shape[-1]
        if width == self.obs_dim + self.goal_dim and self.goal_dim > 0:
            return obs[..., : self.obs_dim], goal, obs[..., self.obs_dim :]
        if width == self.obs_dim:
            return obs, goal, None
        raise ValueError(
            f"obs has width {width}; expected obs_dim={self.obs_dim} (with a '{GOAL}' column) "
            f"or obs_dim + goal_dim = {self.obs_dim + self.goal_dim}"
        )

    @override(QNetAPI)
    def compute_q_values(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Q-values of the commanded goal, and of all goals for the all_goals head.

        Returns:
            ``{QF_PREDS: [B, A]}`` (the commanded goal; absent when the batch names no
            goal, e.g. a state-only all-goals training batch) and, for the all_goals
            head, ``{Q_ALL_GOALS: [B, L, A]}``.
        """
        state, goal, feats = self._split(batch)
        out: Dict[str, Any] = {}
        if self.head == "all_goals":
            q_all = self.q_all_goals(state)
            out[Q_ALL_GOALS] = q_all
            if goal is None and feats is not None:
                goal = self.goal_index(feats)
            if goal is not None:  # the commanded goal's row: [B, L, A] -> [B, A]
                idx = goal.long().view(-1, 1, 1).expand(-1, 1, q_all.shape[-1])
                out[QF_PREDS] = q_all.gather(1, idx).squeeze(1)
            return out
        if feats is None:
            if goal is None:
                raise ValueError(f"goal_input head needs goal features in obs or a '{GOAL}' column")
            feats = self.goal_features[goal.long()]
        out[QF_PREDS] = self.q_features(state, feats)
        return out

    # ------------------------------------------------------------------ forward passes
    def train(self, mode: bool = True) -> "PQNTorchRLModule":
        """``nn.Module.train``, skipped when the module is in that mode already.

        RLlib's ``forward_train`` / ``forward_exploration`` set the mode on every call, and
        each set walks every submodule (a fifth of a millisecond here, ~5% of a CPU
        training step). Nothing in this network depends on the mode (LayerNorm, no
        dropout or batch norm), and only these calls change it.
        """
        if self.training == mode:
            return self
        return super().train(mode)

    def current_epsilon(self, t: Optional[float] = None) -> float:
        """Exploration rate from the linear schedule at env step ``t`` (or ``self.epsilon``)."""
        if t is None:
            return float(self.epsilon)
        return linear_epsilon(t, self.epsilon_start, self.epsilon_end, self.epsilon_decay_steps)

    @override(RLModule)
    def _forward_inference(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        with torch.no_grad():
            q = self.compute_q_values(batch)[QF_PREDS]
        return {Columns.ACTIONS: q.argmax(-1)}

    @override(RLModule)
    def _forward_exploration(self, batch: Dict[str, Any], t: Optional[int] = None, **kwargs) -> Dict[str, Any]:
        with torch.no_grad():
            out = self.compute_q_values(batch)
            q = out[QF_PREDS]
            greedy = q.argmax(-1)
            eps = batch.get(EPSILON)
            if eps is None:
                eps = self.current_epsilon(t)
            B = q.shape[0]
            random_actions = torch.randint(self.num_actions, (B,), device=q.device)
            explore = torch.rand(B, device=q.device) < eps
            actions = {Columns.ACTIONS: torch.where(explore, random_actions, greedy)}
            if batch.get(RETURN_Q_ALL_GOALS) and Q_ALL_GOALS in out:
                actions[Q_ALL_GOALS] = out[Q_ALL_GOALS]
            return actions

    @override(RLModule)
    def _forward_train(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        return self.compute_q_values(batch)
