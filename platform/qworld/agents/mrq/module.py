"""Goal-conditioned MR.Q RLModule: encoders, linear model, two all-goals value heads.

Shapes: B batch, L goals (the problem's goal set), A actions, K reward bins.

- state encoder ``f(s) -> z_s`` (MLP, ELU, AvgL1Norm output as in MR.Q);
- state-action encoder ``g(z_s, a) -> z_sa`` (action embedding + MLP, ELU);
- linear model on ``z_sa``: next ``z_s``, per-goal reward logits ``[L, K]`` and per-goal
  terminal ``[L]``;
- two value heads ``Q_j(z_sa) -> [L]`` (one output per goal), trained on targets divided
  by the buffer's mean |reward| (``reward_scale``); ``q_all_goals`` multiplies back, so
  the QFunction API gives returns.

Every per-goal output (terminal, reward logits, Q) is one row (or K rows) of a linear
layer, so it can be evaluated at a subset of goals by indexing that layer's weight rows
(``Encoder.model_at``, ``ValueHeads.at``, ``goals=`` of ``q_heads_all_actions``) at a cost
that does not grow with L. Training uses this (deviation from MR.Q, Fujimoto et al. 2025,
which has one reward and one value per transition: see ``qworld.agents.mrq.learner``):
each gradient step computes the reward, terminal and value terms at ``goals_per_step``
goals drawn from the L, not at all L. Inference and ``q_all_goals`` (``load_q``) still
give Q of every goal; the parameters are the same as with all-goals training.

Acting is the greedy argmax over actions of ``min_j Q_j`` for the commanded goal
(epsilon-greedy while exploring). MR.Q's discrete actor (Gumbel-softmax) exists for
Atari's policy learning; here Q is the object of study, and a goal-conditioned value head
with an argmax policy is enough (and keeps one Q per goal rather than one policy).

The target encoder and target value heads live in the module (plain submodules), so
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

QF_PREDS = "qf_preds"  # [B, A]: commanded goal's Q (exploration / inference)
Q_ALL_GOALS = "q_all_goals"  # [B, L, A]


def avg_l1_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """MR.Q's AvgL1Norm: ``x / mean(|x|)`` over the last dim."""
    return x / x.abs().mean(-1, keepdim=True).clamp(min=eps)


def elu_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, layer_norm: bool = False) -> nn.Sequential:
    layers: list = []
    d = in_dim
    for h in hidden:
        layers.append(nn.Linear(d, int(h)))
        if layer_norm:
            layers.append(nn.LayerNorm(int(h)))
        layers.append(nn.ELU())
        d = int(h)
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """``f`` (state) and ``g`` (state-action) encoders plus MR.Q's linear model."""

    def __init__(self, obs_dim, num_actions, num_goals, zs_dim, za_dim, zsa_dim, hidden, num_bins):
        super().__init__()
        self.num_actions, self.num_goals, self.zs_dim, self.num_bins = num_actions, num_goals, zs_dim, num_bins
        self.zs_mlp = elu_mlp(obs_dim, hidden, zs_dim)
        self.za = nn.Linear(num_actions, za_dim)
        self.zsa_mlp = elu_mlp(zs_dim + za_dim, hidden, zsa_dim)
        # Linear model on z_sa: [terminal L | next z_s | reward logits L*K]
        self.model = nn.Linear(zsa_dim, num_goals + zs_dim + num_goals * num_bins)

    def zs(self, s: torch.Tensor) -> torch.Tensor:
        return avg_l1_norm(self.zs_mlp(s))

    def zsa(self, zs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        a1 = F.one_hot(a.long(), self.num_actions).to(zs.dtype)
        return self.zsa_mlp(torch.cat([zs, F.elu(self.za(a1))], dim=-1))

    def model_all(self, zsa: torch.Tensor):
        """-> (terminal [.., L], next z_s [.., Z], reward logits [.., L, K])."""
        out = self.model(zsa)
        L, Z = self.num_goals, self.zs_dim
        return out[..., :L], out[..., L : L + Z], out[..., L + Z :].reshape(*out.shape[:-1], L, self.num_bins)

    def model_rows(self, goals: torch.Tensor) -> torch.Tensor:
        """Rows of ``model`` for ``goals [G]``: ``[terminal G | next z_s Z | reward G*K]``."""
        L, Z, K = self.num_goals, self.zs_dim, self.num_bins
        dev = self.model.weight.device
        goals = goals.to(dev).long()
        reward = L + Z + (goals[:, None] * K + torch.arange(K, device=dev)).reshape(-1)
        return torch.cat([goals, torch.arange(L, L + Z, device=dev), reward])

    def model_params(self, goals: Optional[torch.Tensor] = None):
        """``(weight, bias)`` of the linear model restricted to ``goals [G]`` (None: all L),
        for :meth:`model_out`; gather them once per gradient step, not per unroll step."""
        if goals is None:
            return self.model.weight, self.model.bias
        rows = self.model_rows(goals)
        return self.model.weight[rows], self.model.bias[rows]

    def model_out(self, zsa: torch.Tensor, params, num: int):
        """The linear model with ``params`` of ``num`` goals -> (terminal [.., num], next z_s
        [.., Z], reward logits [.., num, K])."""
        out = F.linear(zsa, *params)
        Z = self.zs_dim
        return out[..., :num], out[..., num : num + Z], out[..., num + Z :].reshape(*out.shape[:-1], num, self.num_bins)

    def model_at(self, zsa: torch.Tensor, goals: Optional[torch.Tensor] = None):
        """``model_all`` at ``goals [G]`` only (None: all L) -> (terminal [.., G], next z_s [.., Z],
        reward logits [.., G, K]); the cost grows with G, not L."""
        if goals is None:
            return self.model_all(zsa)
        return self.model_out(zsa, self.model_params(goals), goals.shape[0])


class ValueHeads(nn.Module):
    """Two Q heads ``z_sa -> [L]`` (MR.Q: Linear -> LayerNorm -> ELU MLPs)."""

    def __init__(self, zsa_dim, hidden, num_goals):
        super().__init__()
        self.q1 = elu_mlp(zsa_dim, hidden, num_goals, layer_norm=True)
        self.q2 = elu_mlp(zsa_dim, hidden, num_goals, layer_norm=True)

    def forward(self, zsa: torch.Tensor) -> torch.Tensor:
        """``[..., zsa_dim] -> [..., 2, L]``."""
        return torch.stack([self.q1(zsa), self.q2(zsa)], dim=-2)

    def at(self, zsa: torch.Tensor, goals: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[..., zsa_dim], goals [G] -> [..., 2, G]``: the heads' outputs of ``goals`` only
        (rows of their last layer; None: all L, as ``forward``)."""
        if goals is None:
            return self(zsa)
        out = []
        for head in (self.q1, self.q2):
            last = head[-1]
            g = goals.to(last.weight.device).long()
            out.append(F.linear(head[:-1](zsa), last.weight[g], last.bias[g]))
        return torch.stack(out, dim=-2)


class MRQTorchRLModule(TorchRLModule):
    """Goal-conditioned MR.Q networks with the QFunction API (see module doc).

    ``model_config``:
        obs_dim, goal_dim, num_goals (L), num_actions (A), goal_features ``[L][goal_dim]``:
            the problem (goal features kept as a buffer, so checkpoints hold them);
        zs_dim, za_dim, zsa_dim: embedding widths; enc_hidden, value_hidden: MLP widths;
        num_bins: reward bins; epsilon_start, epsilon_end, epsilon_decay_steps:
            exploration schedule over env steps.
    """

    @override(RLModule)
    def setup(self):
        mc = self.model_config
        setup_problem_attributes(self, mc)
        zs, za, zsa = int(mc.get("zs_dim", 128)), int(mc.get("za_dim", 32)), int(mc.get("zsa_dim", 128))
        enc_hidden = [int(h) for h in mc.get("enc_hidden", (128, 128))]
        value_hidden = [int(h) for h in mc.get("value_hidden", (128, 128))]
        self.num_bins = int(mc.get("num_bins", 65))
        self.encoder = Encoder(self.obs_dim, self.num_actions, self.num_goals, zs, za, zsa, enc_hidden, self.num_bins)
        self.value = ValueHeads(zsa, value_hidden, self.num_goals)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_value = copy.deepcopy(self.value).requires_grad_(False)
        # r (online value's scale) and r' (target value's scale): mean |reward| of the buffer
        self.register_buffer("reward_scale", torch.ones(()))
        self.register_buffer("target_reward_scale", torch.ones(()))
        self.epsilon_start = float(mc.get("epsilon_start", 1.0))
        self.epsilon_end = float(mc.get("epsilon_end", 0.1))
        self.epsilon_decay_steps = float(mc.get("epsilon_decay_steps", 0))

    def sync_targets(self) -> None:
        """Hard copy of the online encoder and value heads into the targets."""
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_value.load_state_dict(self.value.state_dict())

    # ------------------------------------------------------------------ Q-values
    def q_heads_all_actions(
        self, state: torch.Tensor, target: bool = False, goals: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``[B, obs_dim] -> [B, A, 2, L]`` both heads (own scale) for every action; with
        ``goals [G]`` only those goals' outputs, ``[B, A, 2, G]``."""
        enc = self.target_encoder if target else self.encoder
        val = self.target_value if target else self.value
        B, A = state.shape[0], self.num_actions
        zs = enc.zs(state)
        actions = torch.arange(A, device=state.device).repeat(B)
        zsa = enc.zsa(zs.repeat_interleave(A, dim=0), actions)
        q = val.at(zsa, goals)
        return q.reshape(B, A, 2, q.shape[-1])

    def q_all_goals(self, state: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim] -> [B, L, A]``: ``reward_scale * min_j Q_j`` (returns)."""
        q = self.q_heads_all_actions(state).min(dim=2).values  # [B, A, L]
        return (q * self.reward_scale).transpose(1, 2)

    def q_goals(self, state: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim], [B] long -> [B, A]``."""
        q = self.q_all_goals(state)
        return q[torch.arange(q.shape[0], device=q.device), goal.long()]

    def q_features(self, state: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        raise ValueError("q_features needs a goal-input head; MR.Q's all-goals head only knows its goal set")

    def goal_index(self, goal_features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest goal of the goal set, ``[B, goal_dim] -> [B]`` long."""
        return torch.cdist(goal_features.to(self.goal_features.dtype), self.goal_features).argmin(-1)

    def _commanded_q(self, batch: Dict[str, Any]) -> torch.Tensor:
        obs = batch[Columns.OBS].float()
        if obs.shape[-1] != self.obs_dim + self.goal_dim:
            raise ValueError(f"obs must be concat(state, goal features) of width {self.obs_dim + self.goal_dim}")
        state, feats = obs[..., : self.obs_dim], obs[..., self.obs_dim :]
        return self.q_goals(state, self.goal_index(feats))

    # ------------------------------------------------------------------ forward passes
    @override(RLModule)
    def _forward_inference(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        with torch.no_grad():
            return {Columns.ACTIONS: self._commanded_q(batch).argmax(-1)}

    @override(RLModule)
    def _forward_exploration(self, batch: Dict[str, Any], t: Optional[int] = None, **kwargs) -> Dict[str, Any]:
        with torch.no_grad():
            q = self._commanded_q(batch)
            eps = linear_epsilon(t or 0, self.epsilon_start, self.epsilon_end, self.epsilon_decay_steps)
            B = q.shape[0]
            explore = torch.rand(B, device=q.device) < eps
            random_actions = torch.randint(self.num_actions, (B,), device=q.device)
            return {Columns.ACTIONS: torch.where(explore, random_actions, q.argmax(-1))}

    @override(RLModule)
    def _forward_train(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        # The learner computes MR.Q's unrolled losses itself (MRQTorchLearner).
        return {}
