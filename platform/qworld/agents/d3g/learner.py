"""D3G's Learner: critic, forward, inverse and (every ``policy_delay`` steps) proposal losses.

One gradient step on a minibatch of B replayed transitions ``(s, a, s', r [L], done [L])``
(world-model states, every goal's reward and termination), for every goal g of the set:

- forward model: MSE of ``f(s, a)`` against ``s' - s`` (per dim in units of delta_scale);
- inverse model: cross-entropy of ``I(s, s')`` on a;
- critic: both ``Q_i(s, s', g)`` against ``r_g + gamma (1 - done_g) min_i Qbar_i(s', s'')``
  with ``s'' = s' + f(s', argmax I(s', s' + taubar(s', g)))`` (online f and I, target tau
  and critics; no gradient);
- proposal (steps 0, policy_delay, 2 policy_delay, ...):
  ``-Q_1(s, c, g) + ||c - (s + tau(s, g))||^2`` with the cycle state
  ``c = s + sum_a softmax(I(s, s + tau(s, g)))_a f(s, a)``. D3G takes ``f(s, argmax I)``;
  the argmax is made differentiable by the expectation of f over I's softmax (exact when
  I is confident, and it passes gradients to tau through I). The critic, f and I are
  frozen in this term (their parameters get no gradient from it; the gradient reaches
  tau's parameters only, as D3G's separate actor optimizer does).

Four Adam optimizers (``"critic"``, ``"forward"``, ``"inverse"``, ``"tau"``; lr 3e-4).
The losses are summed into one backward: each term only reaches its own network, so this
equals separate updates. On the non-proposal steps tau gets no gradient and its
optimizer skips it. After each proposal step both targets (critic, tau) move by Polyak
averaging ``tau_polyak`` (TD3, on whose code D3G is built, updates targets on the delayed
steps).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict

import torch

from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from qworld.agents.d3g import losses as Lz

STATES = "states"  # [B, d] world-model states s
NEXT_STATES = "next_states"  # [B, d] s'
ACTIONS = "actions"  # [B] long
REWARDS = "rewards"  # [B, L] every goal's reward on arriving in s'
TERMINALS = "terminals"  # [B, L] every goal's termination at s'
BATCH_KEYS = (STATES, NEXT_STATES, ACTIONS, REWARDS, TERMINALS)

# Metric keys (learner results, per module).
TOTAL_LOSS_KEY = "total_loss"
CRITIC_LOSS_KEY = "critic_loss"
FORWARD_LOSS_KEY = "forward_loss"
INVERSE_LOSS_KEY = "inverse_loss"
TAU_LOSS_KEY = "tau_loss"
Q_MEAN_KEY = "q_mean"

# optimizer name -> the module attribute it trains
OPTIMIZERS = {"critic": "critic", "forward": "forward_model", "inverse": "inverse_model", "tau": "tau"}


@contextlib.contextmanager
def frozen(*nets: torch.nn.Module):
    """Parameters of ``nets`` need no gradient inside the block (inputs still get one)."""
    params = [(p, p.requires_grad) for n in nets for p in n.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in params:
            p.requires_grad_(r)


def d3g_losses(module, batch: Dict[str, torch.Tensor], gamma: float, update_tau: bool) -> Dict[str, torch.Tensor]:
    """D3G's losses of ``module`` on a batch of transitions (see module doc); keys as the metrics."""
    s = batch[STATES].float()
    s2 = batch[NEXT_STATES].float()
    a = batch[ACTIONS].long()
    r = batch[REWARDS].float()
    done = batch[TERMINALS].float()
    B, L, d, k = s.shape[0], module.num_goals, module.state_dim, module.goal_dim
    goals = module.goal_features[None].expand(B, L, k)
    s_e = s[:, None].expand(B, L, d)
    s2_e = s2[:, None].expand(B, L, d)

    # --- models (goal-free)
    f_loss = Lz.forward_loss(module.forward_delta(s, a), module.state_delta(s2, s), module.delta_scale)
    i_loss = Lz.inverse_loss(module.inverse_logits(s, s2), a)

    # --- critic: every goal, clipped double-Q target through the target proposal
    with torch.no_grad():
        wanted = module.propose(s2_e, goals, target=True)  # [B, L, d]
        a_next = module.inverse_logits(s2_e, wanted).argmax(-1)  # [B, L]
        s3 = module.step(s2_e, module.forward_delta(s2_e, a_next))
        target = Lz.critic_target(r, done, module.critic_values(s2_e, s3, goals, target=True), gamma)
    q = module.critic_values(s_e, s2_e, goals)  # [B, L, 2]
    c_loss = Lz.critic_loss(q, target)
    out = {
        CRITIC_LOSS_KEY: c_loss,
        FORWARD_LOSS_KEY: f_loss,
        INVERSE_LOSS_KEY: i_loss,
        Q_MEAN_KEY: q.detach().mean(),
    }
    total = c_loss + f_loss + i_loss

    # --- proposal: reachable and valuable next states
    if update_tau:
        wanted = module.propose(s_e, goals)  # [B, L, d], grads to tau
        with frozen(module.critic, module.forward_model, module.inverse_model):
            probs = torch.softmax(module.inverse_logits(s_e, wanted), -1)  # [B, L, A]
            with torch.no_grad():
                deltas = module.forward_delta_all_actions(s)  # [B, A, d]
            cycle = module.step(s_e, torch.einsum("bla,bad->bld", probs, deltas))
            q1 = module.critic_values(s_e, cycle, goals)[..., 0]  # [B, L]
            gap = module.state_delta(cycle, wanted) / module.delta_scale
        t_loss = Lz.tau_loss(q1, gap)
        out[TAU_LOSS_KEY] = t_loss
        total = total + t_loss
    out[TOTAL_LOSS_KEY] = total
    return out


class D3GTorchLearner(TorchLearner):
    """Learner of goal-conditioned D3G (see module doc)."""

    @override(TorchLearner)
    def build(self) -> None:
        super().build()
        self._grad_steps = 0

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id]
        module = module.unwrapped() if hasattr(module, "unwrapped") else module
        lr = float(self.config.lr)
        for name, attr in OPTIMIZERS.items():
            params = list(getattr(module, attr).parameters())
            self.register_optimizer(module_id=module_id, optimizer_name=name,
                                    optimizer=torch.optim.Adam(params, lr=lr), params=params, lr_or_lr_schedule=lr)

    def _is_tau_step(self) -> bool:
        return self._grad_steps % int(self.config.policy_delay) == 0

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: Dict[str, Any], fwd_out: Dict[str, Any]) -> torch.Tensor:
        module = self.module[module_id].unwrapped()
        out = d3g_losses(module, batch, float(self.config.gamma), self._is_tau_step())
        for key, value in out.items():
            self.metrics.log_value((module_id, key), value.detach(), window=1)
        return out[TOTAL_LOSS_KEY]

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict) -> None:
        """The optimizer steps, then (after a proposal step) the soft target updates."""
        super().apply_gradients(gradients_dict)
        if self._is_tau_step():
            tau = float(self.config.tau_polyak)
            for mid in self.module.keys():
                module = self.module[mid].unwrapped()
                Lz.soft_update(module.target_critic, module.critic, tau)
                Lz.soft_update(module.target_tau, module.tau, tau)
        self._grad_steps += 1
