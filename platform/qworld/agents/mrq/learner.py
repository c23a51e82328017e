"""MR.Q's Learner: the unrolled model loss and the value loss on replayed windows.

One gradient step (one minibatch of B windows, see ``qworld.agents.mrq.replay``) =

- goals: G = ``goals_per_step`` goals drawn uniformly without replacement from the L
  (all L when G >= L); the reward, terminal and value terms below are computed at those
  goals only, their heads evaluated through the goals' weight rows, so a step costs the
  same whatever L (the encoder's dynamics loss has no goal);
- encoder: unroll the linear model ``enc_horizon`` steps from ``f(s_0)`` on its own
  next-z_s predictions; dynamics MSE against the target encoder's ``f(s_{t+1})``, reward
  cross-entropy against the two-hot reward of each drawn goal, terminal MSE of each drawn
  goal;
- value: both heads on the online ``z_sa`` of ``(s_0, a_0)`` (detached: the encoder
  learns from the model loss only, as in MR.Q) against the per-goal n-step target
  ``(R + gamma^n r' min_j Qbar_j(s_n, argmax)) / r`` of each drawn goal, Huber loss.

Deviation from MR.Q (Fujimoto et al. 2025): MR.Q has one task, so one reward and one value
per transition. Here every transition carries all L goals' rewards (HER-style
relabelling); training all L at every step made the reward head (L x 65 bins on every
unroll step) ~75-80% of a step at L = 68. Drawing G goals per step keeps each loss an
unbiased estimate of its mean over all goals at a cost independent of L; a goal's heads
are trained on G / L of the steps (with the whole minibatch). Q of every goal stays in the
module (``q_all_goals``, ``load_q``).

The goals of a step come from a generator seeded by (``seed``, gradient-step count), so a
run is reproducible and a restored learner with its count draws what the uninterrupted
one would.

Two optimizers (``"encoder"``, ``"value"``: MR.Q's AdamW settings), RLlib's grad-norm
clip per optimizer. Targets: before gradient steps 0, f, 2f, ... (f =
``target_update_freq``, counted in gradient steps, also inside one ``update`` call of more
than f steps): hard copy of the targets, ``r' <- r`` and ``r <-`` the buffer's mean
|reward| (handed over by the Algorithm in ``timesteps``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from qworld.agents.mrq import losses as Lz

OBS = "obs"  # [B, H+1, obs_dim] state observations of the window
ACTIONS = "actions"  # [B, H] long
REWARDS = "rewards"  # [B, H, L] every goal's reward
TERMINALS = "terminals"  # [B, H, L] every goal's termination
VALID = "valid"  # [B, H] the transition exists (prefix of True)
BATCH_KEYS = (OBS, ACTIONS, REWARDS, TERMINALS, VALID)

# Keys of the ``timesteps`` dict the Algorithm hands to ``LearnerGroup.update``.
GRAD_STEPS_KEY = "mrq_grad_steps"  # gradient steps in this update call (informational: the learner counts its own)
BUFFER_REWARD_SCALE_KEY = "mrq_buffer_reward_scale"  # mean |reward| of the replay buffer

# Metric keys (learner results, per module).
TOTAL_LOSS_KEY = "total_loss"
VALUE_LOSS_KEY = "value_loss"
DYNAMICS_LOSS_KEY = "dynamics_loss"
REWARD_LOSS_KEY = "reward_loss"
TERMINAL_LOSS_KEY = "terminal_loss"
Q_MEAN_KEY = "q_mean"  # mean Q (returns) over the step's windows, both heads and drawn goals
REWARD_SCALE_KEY = "reward_scale"


def mrq_losses(
    module, batch: Dict[str, torch.Tensor], cfg: Any, bins: torch.Tensor, goals: Optional[torch.Tensor] = None
) -> Dict[str, torch.Tensor]:
    """MR.Q's losses of ``module`` on a batch of windows (see module doc); keys as the metrics.

    ``goals [G]`` long: the goals the reward, terminal and value terms are computed at
    (their heads evaluated at those goals only); None: all L.
    """
    obs = batch[OBS].float()
    act = batch[ACTIONS].long()
    rew = batch[REWARDS].float()
    term = batch[TERMINALS].float()
    if goals is not None:
        goals = goals.to(rew.device).long()
        rew, term = rew[..., goals], term[..., goals]
    valid = batch[VALID].bool()
    H, n = int(cfg.enc_horizon), int(cfg.n_step)
    B = obs.shape[0]
    enc = module.encoder

    # --- encoder: unrolled linear model
    with torch.no_grad():
        target_zs = module.target_encoder.zs(obs[:, 1 : H + 1])
    zs = enc.zs(obs[:, 0])
    pred_zs, pred_r, pred_d = [], [], []
    params, G = enc.model_params(goals), rew.shape[-1]  # the drawn goals' rows, gathered once
    for k in range(H):
        zsa = enc.zsa(zs, act[:, k])
        d, zs, r = enc.model_out(zsa, params, G)
        pred_d.append(d), pred_zs.append(zs), pred_r.append(r)
    el = Lz.encoder_losses(
        torch.stack(pred_zs, 1), target_zs, torch.stack(pred_r, 1), rew[:, :H],
        torch.stack(pred_d, 1), term[:, :H], valid[:, :H], bins,
    )
    enc_loss = cfg.dynamics_weight * el["dynamics"] + cfg.reward_weight * el["reward"] + cfg.terminal_weight * el["terminal"]

    # --- value: per-goal n-step target from the target networks
    with torch.no_grad():
        ret, disc, m = Lz.n_step_returns(rew[:, :n], term[:, :n], valid[:, :n], float(cfg.gamma))
        s_boot = obs[torch.arange(B, device=obs.device), m]
        q_next = module.q_heads_all_actions(s_boot, target=True, goals=goals)  # [B, A, 2, G]
        q_next = Lz.greedy_target_value(q_next.permute(0, 2, 3, 1))  # [B, G]
        target = Lz.value_target(ret, disc, q_next, module.reward_scale, module.target_reward_scale)
        zsa0 = enc.zsa(enc.zs(obs[:, 0]), act[:, 0])
    q = module.value.at(zsa0, goals)  # [B, 2, G]
    v_loss = Lz.value_loss(q, target)
    return {
        TOTAL_LOSS_KEY: enc_loss + v_loss,
        VALUE_LOSS_KEY: v_loss,
        DYNAMICS_LOSS_KEY: el["dynamics"],
        REWARD_LOSS_KEY: el["reward"],
        TERMINAL_LOSS_KEY: el["terminal"],
        Q_MEAN_KEY: (q.detach() * module.reward_scale).mean(),
    }


class MRQTorchLearner(TorchLearner):
    """Learner of goal-conditioned MR.Q (see module doc).

    Counters: ``_grad_steps`` (gradient steps done), ``_next_target_update`` (the gradient
    step before which the targets are next synced).
    """

    @override(TorchLearner)
    def build(self) -> None:
        super().build()
        self._bins = Lz.reward_bins(int(self.config.num_bins)).to(self.device or "cpu")
        self._grad_steps = 0
        self._next_target_update = 0
        self._buffer_reward_scale: Optional[float] = None

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        cfg = self.config
        module = self.module[module_id].unwrapped() if hasattr(self.module[module_id], "unwrapped") else self.module[module_id]
        for name, sub, lr, wd in (
            ("encoder", module.encoder, cfg.enc_lr, cfg.enc_weight_decay),
            ("value", module.value, cfg.value_lr, cfg.value_weight_decay),
        ):
            params = list(sub.parameters())
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.AdamW(params, lr=float(lr), weight_decay=float(wd)),
                params=params,
                lr_or_lr_schedule=float(lr),
            )

    def step_goals(self, num_goals: int) -> Optional[torch.Tensor]:
        """The goals of the current gradient step (``goals_per_step`` of ``num_goals``; None:
        all), from a generator seeded by (``seed``, ``_grad_steps``)."""
        k = int(getattr(self.config, "goals_per_step", num_goals))
        if k >= num_goals:
            return None
        seed = int(self.config.seed or 0)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + self._grad_steps) % (2**63))
        return Lz.draw_goals(num_goals, k, gen)

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: Dict[str, Any], fwd_out: Dict[str, Any]) -> torch.Tensor:
        module = self.module[module_id].unwrapped()
        goals = self.step_goals(int(module.num_goals))
        out = mrq_losses(module, batch, self.config, self._bins.to(batch[OBS].device), goals)
        for key, value in out.items():
            self.metrics.log_value((module_id, key), value.detach(), window=1)
        self.metrics.log_value((module_id, REWARD_SCALE_KEY), float(module.reward_scale), window=1)
        return out[TOTAL_LOSS_KEY]

    def sync_targets_if_due(self) -> bool:
        """Before each gradient step: at steps 0, f, 2f, ... (f = ``target_update_freq``) hard-copy
        the targets, ``r' <- r``, ``r <-`` the buffer's mean |reward|. True when it synced."""
        if self._grad_steps < self._next_target_update:
            return False
        scale = self._buffer_reward_scale
        for mid in self.module.keys():
            module = self.module[mid].unwrapped()
            module.sync_targets()
            module.target_reward_scale.copy_(module.reward_scale)
            if scale is not None:
                module.reward_scale.fill_(max(float(scale), 1e-8))
        self._next_target_update = self._grad_steps + int(self.config.target_update_freq)
        return True

    @override(TorchLearner)
    def before_gradient_based_update(self, *, timesteps: Dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        scale = timesteps.get(BUFFER_REWARD_SCALE_KEY)
        if scale is not None:
            self._buffer_reward_scale = float(scale)

    @override(TorchLearner)
    def compute_losses(self, *, fwd_out: Dict[str, Any], batch: Dict[str, Any]) -> Dict[str, Any]:
        # One call per minibatch = per gradient step (Learner.update's loop), so the targets
        # are synced at their frequency whatever the number of steps per update. The target
        # networks are read in the loss only (mrq_losses), never in forward_train.
        self.sync_targets_if_due()
        losses = super().compute_losses(fwd_out=fwd_out, batch=batch)
        self._grad_steps += 1
        return losses
