"""PQN Learner: Q(lambda) targets once per rollout, then epochs of minibatch MSE updates.

Shapes: T steps, N columns, L goals, A actions, K HER relabels, M training rows.

Per ``update`` call (one rollout, see ``rollout.py``):

1. targets with the *current* network at s' (no target network, as PQN), computed once
   before the epochs:
   - all_goals head: every transition trains every goal, each with its own reward
     ``rewards[..., g]`` and termination ``terminals[..., g]``; the lambda chain is also
     cut where the commanded episode ended (the env reset) and, with ``lambda_ > 0``,
     where the next action taken is not greedy for goal g (Watkins' Q(lambda): the
     behaviour policy follows the commanded goal, so Peng's uncut traces would bias the
     other goals' Q towards the behaviour policy);
   - goal_input head: the commanded goal (Peng's Q(lambda), as PQN) plus ``her_k`` relabelled copies
     per transition (1-step targets: a relabelled goal changes from step to step, so
     there is no chain to follow), ``random_goal``: uniform goals of the goal set;
     ``future``: a goal achieved later in the same episode (terminal, or positive reward,
     at some step >= t before the episode ends), else a uniform goal;
2. ``num_epochs`` passes of shuffled minibatches of ``minibatch_size`` rows through
   RLlib's ``TorchLearner._update`` (forward_train -> loss -> grads -> global-norm clip
   -> RAdam/Adam step); the rows that do not fill a last minibatch are dropped;
3. the learning rate follows RLlib's schedule ``[[0, lr], [total_env_steps, 0]]``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ray.rllib.algorithms.dqn.dqn_learner import QF_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, TensorType

from qworld.agents.pqn import rollout as R
from qworld.agents.pqn.module import GOAL, Q_ALL_GOALS, PQNTorchRLModule
from qworld.agents.pqn.targets import q_lambda_targets

TARGETS = "targets"  # [M, L] (all_goals) or [M] (goal_input)
TD_LOSS_KEY = "td_loss"
Q_MEAN_KEY = "q_mean"
TARGET_MEAN_KEY = "target_mean"
NUM_TRAIN_ROWS_KEY = "num_train_rows"

# Rows per forward pass when computing targets (bounds memory for big rollouts).
TARGET_CHUNK = 65536


def _chunked(fn, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """``fn`` over row chunks of ``x`` (and matching ``rest``), concatenated."""
    if x.shape[0] <= TARGET_CHUNK:
        return fn(x, *rest)
    return torch.cat(
        [fn(x[i : i + TARGET_CHUNK], *(r[i : i + TARGET_CHUNK] for r in rest)) for i in range(0, x.shape[0], TARGET_CHUNK)]
    )


def her_goals(
    rollout: Dict[str, torch.Tensor],
    her_k: int,
    strategy: str,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Relabelled goal indices for HER, ``[K, T, N]`` long.

    Args:
        rollout: time-major rollout with ``rewards``/``terminals`` ``[T, N, L]`` and
            ``terminated``/``truncated`` ``[T, N]``.
        her_k: K relabelled copies per transition.
        strategy: ``"random_goal"`` (uniform over the goal set) or ``"future"`` (uniform
            over the goals achieved at this or a later step of the same episode, falling
            back to a uniform goal when none is).
    """
    rewards = rollout[R.REWARDS]
    T, N, L = rewards.shape
    dev = rewards.device
    uniform = torch.randint(L, (her_k, T, N), device=dev, generator=generator)
    if strategy == "random_goal":
        return uniform
    if strategy != "future":
        raise ValueError(f"her_strategy must be 'future' or 'random_goal', got {strategy!r}")
    achieved = rollout[R.TERMINALS] | (rewards > 0)
    ended = (rollout[R.TERMINATED] | rollout[R.TRUNCATED]).unsqueeze(-1)
    future = torch.empty_like(achieved)
    acc = torch.zeros_like(achieved[0])
    for t in range(T - 1, -1, -1):
        acc = achieved[t] | (acc & ~ended[t])
        future[t] = acc
    scores = torch.rand((her_k, T, N, L), device=dev, generator=generator)
    scores = torch.where(future.unsqueeze(0), scores, torch.full_like(scores, -1.0))
    pick = scores.argmax(-1)
    return torch.where(future.any(-1).unsqueeze(0), pick, uniform)


@torch.no_grad()
def build_train_rows(
    module: PQNTorchRLModule,
    rollout: Dict[str, torch.Tensor],
    *,
    gamma: float,
    lam: float,
    her_k: int = 0,
    her_strategy: str = "future",
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """Rollout -> flat training rows with their (fixed) targets.

    Returns:
        all_goals head: ``obs [M, obs_dim]``, ``actions [M]``, ``targets [M, L]``;
        goal_input head: additionally ``goal [M]`` and ``targets [M]``, with
        ``M = T * N * (1 + her_k)`` (before dropping padding rows).
    """
    obs, next_obs = rollout[R.OBS], rollout[R.NEXT_OBS]
    T, N, D = obs.shape
    flat_next = next_obs.reshape(T * N, D)
    mask = rollout.get(R.MASK)
    if module.head == "all_goals":
        L = module.num_goals
        cut = rollout[R.TERMINATED] | rollout[R.TRUNCATED]
        if R.NEXT_Q_MAX in rollout:  # the fast runner's Q at s_{t+1}, same weights (see rollout.py)
            next_q_max, greedy_next = rollout[R.NEXT_Q_MAX], rollout[R.NEXT_Q_ARGMAX].long()
        elif lam > 0.0:
            # max and argmax in one pass; argmax travels as float through the chunking
            both = _chunked(lambda s: torch.stack([t.float() for t in module.q_all_goals(s).max(-1)], -1), flat_next)
            next_q_max, greedy_next = both[..., 0].reshape(T, N, L), both[..., 1].long().reshape(T, N, L)
        else:
            next_q_max = _chunked(lambda s: module.q_all_goals(s).amax(-1), flat_next).reshape(T, N, L)
        if lam > 0.0:
            # Watkins-style: the behaviour follows the commanded goal, so goal g's trace
            # continues past t only while the next action taken is greedy for g.
            off_policy = torch.ones((T, N, L), dtype=torch.bool, device=obs.device)
            off_policy[:-1] = rollout[R.ACTIONS][1:].unsqueeze(-1) != greedy_next[:-1]
            cut = cut.unsqueeze(-1) | off_policy
        targets = q_lambda_targets(rollout[R.REWARDS], rollout[R.TERMINALS], cut, next_q_max, gamma, lam)
        rows = {
            Columns.OBS: obs.reshape(T * N, D),
            Columns.ACTIONS: rollout[R.ACTIONS].reshape(T * N),
            TARGETS: targets.reshape(T * N, L),
        }
    else:
        goal = rollout[R.GOAL]
        next_q_max = _chunked(lambda s, g: module.q_goals(s, g).amax(-1), flat_next, goal.reshape(-1)).reshape(T, N)
        targets = q_lambda_targets(
            rollout[R.REWARD], rollout[R.TERMINATED], rollout[R.TRUNCATED], next_q_max, gamma, lam
        )
        goals, tgts = [goal], [targets]
        if her_k > 0:
            relabel = her_goals(rollout, her_k, her_strategy, generator)  # [K, T, N]
            idx = relabel.unsqueeze(-1)
            r = rollout[R.REWARDS].unsqueeze(0).expand(her_k, -1, -1, -1).gather(-1, idx).squeeze(-1)
            d = rollout[R.TERMINALS].unsqueeze(0).expand(her_k, -1, -1, -1).gather(-1, idx).squeeze(-1)
            nq = _chunked(
                lambda s, g: module.q_goals(s, g).amax(-1),
                flat_next.repeat(her_k, 1),
                relabel.reshape(-1),
            ).reshape(her_k, T, N)
            her_targets = r + gamma * (~d).to(r.dtype) * nq
            goals += list(relabel)
            tgts += list(her_targets)
        copies = 1 + max(her_k, 0)
        rows = {
            Columns.OBS: obs.reshape(T * N, D).repeat(copies, 1),
            GOAL: torch.stack(goals).reshape(-1),
            Columns.ACTIONS: rollout[R.ACTIONS].reshape(T * N).repeat(copies),
            TARGETS: torch.stack(tgts).reshape(-1),
        }
        if mask is not None:
            mask = mask.unsqueeze(0).expand(copies, -1, -1)
    if mask is not None:
        keep = mask.reshape(-1)
        rows = {k: v[keep] for k, v in rows.items()}
    return rows


class PQNTorchLearner(TorchLearner):
    """Torch Learner of PQN (see module doc); one rollout per ``update`` call."""

    @override(TorchLearner)
    def build(self) -> None:
        super().build()
        seed = self.config.seed if self.config.seed is not None else 0
        self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(int(seed) + 7919)

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config: Any = None) -> None:
        module = self._module[module_id]
        params = self.get_parameters(module)
        optim_cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[config.optimizer]
        # foreach: one fused kernel per step instead of a Python loop over the parameters.
        optimizer = optim_cls(params, lr=config.lr_schedule()[0][1], eps=config.adam_eps, foreach=True)
        self.register_optimizer(
            module_id=module_id,
            optimizer=optimizer,
            params=params,
            lr_or_lr_schedule=config.lr_schedule(),
        )

    @override(Learner)
    def update(
        self,
        batch=None,
        batches=None,
        batch_refs=None,
        episodes=None,
        episodes_refs=None,
        data_iterators=None,
        training_data: Optional[TrainingData] = None,
        *,
        timesteps: Optional[Dict[str, Any]] = None,
        num_epochs: int = 1,
        minibatch_size: Optional[int] = None,
        shuffle_batch_per_epoch: bool = True,
        _no_metrics_reduce: bool = False,
        **kwargs,
    ):
        """One PQN update on one rollout: targets once, then epochs of minibatches.

        ``batch`` is a ``MultiAgentBatch`` made by ``rollout.to_train_batch``.
        """
        self._check_is_built()
        timesteps = timesteps or {}
        self.before_gradient_based_update(timesteps=timesteps)
        if training_data is None:
            training_data = TrainingData(batch=batch, batch_refs=batch_refs)
        training_data.validate()
        training_data.solve_refs()
        ma_batch = training_data.batch
        if ma_batch is None or episodes is not None:
            raise ValueError("PQNTorchLearner.update needs a rollout batch (rollout.to_train_batch)")
        self._weights_seq_no += 1
        for module_id, module_batch in ma_batch.policy_batches.items():
            if not self.should_module_be_updated(module_id, ma_batch):
                continue
            self._update_module_on_rollout(
                module_id,
                R.from_train_batch(module_batch, self._device),
                num_epochs=num_epochs,
                minibatch_size=minibatch_size,
                shuffle=shuffle_batch_per_epoch,
            )
        self.after_gradient_based_update(timesteps=timesteps)
        if not _no_metrics_reduce:
            return self.metrics.reduce()

    def _update_module_on_rollout(self, module_id, rollout, *, num_epochs, minibatch_size, shuffle):
        config = self.config.get_config_for_module(module_id)
        module = self.module[module_id].unwrapped()
        rows = build_train_rows(
            module,
            rollout,
            gamma=config.gamma,
            lam=config.lambda_,
            her_k=config.her_k if module.head == "goal_input" else 0,
            her_strategy=config.her_strategy,
            generator=self._generator,
        )
        M = rows[Columns.ACTIONS].shape[0]
        if M == 0:
            return
        mb = min(int(minibatch_size or M), M)
        num_minibatches = M // mb
        if config.num_learners > 1:
            # DDP: every Learner must take the same number of steps, whatever its shard
            # holds (the standard runner's columns differ in length): a fixed count from
            # the config, minibatches drawn cyclically from this shard's rows.
            mb = int(minibatch_size or M)
            num_minibatches = config.minibatches_per_learner()
        self._loss_sum = torch.zeros((), device=self._device)
        self._q_sum = torch.zeros((), device=self._device)
        for _ in range(num_epochs):
            perm = torch.randperm(M, device=self._device, generator=self._generator) if shuffle else None
            for i in range(num_minibatches):
                if (i + 1) * mb > M:  # only with several learners: wrap around
                    idx = torch.arange(i * mb, (i + 1) * mb, device=self._device) % M
                    minibatch = {k: v[idx if perm is None else perm[idx]] for k, v in rows.items()}
                elif perm is None:
                    minibatch = {k: v[i * mb : (i + 1) * mb] for k, v in rows.items()}
                else:
                    idx = perm[i * mb : (i + 1) * mb]
                    minibatch = {k: v[idx] for k, v in rows.items()}
                self._update({module_id: minibatch})
        n = max(num_epochs * num_minibatches, 1)
        self.metrics.log_value((module_id, TD_LOSS_KEY), (self._loss_sum / n).item(), window=1)
        self.metrics.log_value((module_id, Q_MEAN_KEY), (self._q_sum / n).item(), window=1)
        self.metrics.log_value((module_id, TARGET_MEAN_KEY), rows[TARGETS].mean().item(), window=1)
        self.metrics.log_value((module_id, NUM_TRAIN_ROWS_KEY), M, window=1)

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict: Dict[Any, torch.Tensor]) -> None:
        """Set the (clipped) gradients and step every optimizer.

        Unlike ``TorchLearner.apply_gradients`` there is no per-parameter ``isfinite``
        test (two device syncs per parameter and step, ~7% of a CPU update); as in PQN's
        reference code a non-finite gradient is not special-cased.
        """
        for pid, grad in gradients_dict.items():
            self._params[pid].grad = grad
        for optimizer_names in self._module_optimizers.values():
            for optimizer_name in optimizer_names:
                self._named_optimizers[optimizer_name].step()

    @override(Learner)
    def compute_loss_for_module(
        self,
        *,
        module_id: ModuleID,
        config: Any,
        batch: Dict[str, Any],
        fwd_out: Dict[str, TensorType],
    ) -> TensorType:
        actions = batch[Columns.ACTIONS].long()
        targets = batch[TARGETS]
        if Q_ALL_GOALS in fwd_out and targets.dim() == 2:
            q = fwd_out[Q_ALL_GOALS]  # [B, L, A]
            q_sa = q.gather(-1, actions.view(-1, 1, 1).expand(-1, q.shape[1], 1)).squeeze(-1)  # [B, L]
        else:
            q_sa = fwd_out[QF_PREDS].gather(-1, actions.view(-1, 1)).squeeze(-1)  # [B]
        loss = torch.mean((q_sa - targets) ** 2)
        self._loss_sum = self._loss_sum + loss.detach()
        self._q_sum = self._q_sum + q_sa.detach().mean()
        return loss
