"""What the off-policy families on RLlib's episode replay (MR.Q, D3G) share, written once:
their config's field handling (:class:`EpisodeReplayConfig`) and their ``training_step``
(:class:`EpisodeReplayStep`).

1. sample ``rollout_length`` steps of every env with RLlib's ``SingleAgentEnvRunner``;
2. add the episodes to the Algorithm's ``replay_buffer`` (RLlib's ``EpisodeReplayBuffer``),
   and the true transitions to the trial's experience log when the config's
   ``experience_capacity`` > 0 (states from ``info["state"]``, CONTRACTS.md);
3. past ``learning_starts`` env steps: ``updates_per_iteration`` gradient steps of
   ``batch_size`` on a batch the family samples from the buffer (:meth:`replay_batch`);
4. sync the weights to the env runners; log ``learner/td_loss`` (the family's value loss),
   ``learner/q_mean`` and ``learner/epsilon``.

A family's config subclasses :class:`EpisodeReplayConfig` (its ``FIELDS``, ``ALGORITHM_NAME``
and list-valued ``LIST_FIELDS``; its ``training`` spells its keywords and hands ``locals()``
to :meth:`EpisodeReplayConfig.set_fields`). Its Algorithm lists :class:`EpisodeReplayStep` before ``QworldAlgorithmMixin`` and
``Algorithm`` and provides :meth:`replay_batch`, ``VALUE_LOSS_KEY`` and ``Q_MEAN_KEY``
(its learner's result keys); :meth:`after_sample` and :meth:`update_timesteps` are hooks.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from qworld import metrics as K
from qworld.agents.pqn.module import linear_epsilon
from qworld.agents.pqn.problem import ProblemInfo, jsonable, probe_problem


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


class EpisodeReplayConfig(AlgorithmConfig):
    """The part of an episode-replay family's config that does not depend on the family."""

    ALGORITHM_NAME: str = ""  # the family (qworld.agents.families)
    FIELDS: Tuple[str, ...] = ()  # the family's fields, as qworld_config.json lists them
    RLLIB_FIELDS: Tuple[str, ...] = ("gamma", "lr", "grad_clip", "seed")  # RLlib's own: set by super().training
    LIST_FIELDS: Tuple[str, ...] = ()  # fields stored as lists (network widths)

    def set_fields(self, values: Dict[str, Any]) -> None:
        """Set every family field given in ``values`` (a ``training()``'s ``locals()``)."""
        for name in self.FIELDS:
            value = values.get(name, NotProvided)
            if name in self.RLLIB_FIELDS or value is NotProvided:
                continue
            if name in self.LIST_FIELDS and isinstance(value, (list, tuple)):
                value = list(value)
            if name == "env_kwargs" and value is not None:
                value = dict(value)
            setattr(self, name, value)
        if values.get("env_id", NotProvided) is not NotProvided:
            self.env = values["env_id"]

    def problem(self) -> ProblemInfo:
        """Sizes and goal set of ``env_id`` with ``env_kwargs`` (cached per process)."""
        return probe_problem(self.env_id, self.env_kwargs)

    def epsilon_decay_steps(self) -> float:
        return float(self.epsilon_decay_fraction) * float(self.total_env_steps)

    def qworld_config(self) -> Dict[str, Any]:
        """The resolved trial config (JSON-able): the family's fields, problem, goal set, sizes."""
        out: Dict[str, Any] = {"algorithm": self.ALGORITHM_NAME, "head": "all_goals"}
        for name in self.FIELDS:
            out[name] = jsonable(getattr(self, name))
        out.update(self.problem().trial_config())
        return out

    def qworld_errors(self) -> List[str]:
        """Every bad field the episode-replay families share, one message each; a family's
        ``qworld_errors`` adds its own checks to this list (via :meth:`need`)."""
        errors: List[str] = []
        need = self.need(errors)
        for f in ("num_envs", "rollout_length", "total_env_steps", "batch_size", "updates_per_iteration",
                  "buffer_capacity"):
            need(is_int(getattr(self, f)) and getattr(self, f) >= 1, f, "an int >= 1")
        for f in ("learning_starts", "experience_capacity"):
            need(is_int(getattr(self, f)) and getattr(self, f) >= 0, f, "an int >= 0")
        need(is_num(self.gamma) and 0 < self.gamma <= 1, "gamma", "a number in (0, 1]")
        for f in ("epsilon_start", "epsilon_end", "epsilon_decay_fraction"):
            need(is_num(getattr(self, f)) and 0 <= getattr(self, f) <= 1, f, "a number in [0, 1]")
        for f in self.LIST_FIELDS:
            v = getattr(self, f)
            need(isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(h) and h >= 1 for h in v), f,
                 "a non-empty list of ints >= 1")
        need(isinstance(self.env_kwargs, dict), "env_kwargs", "a dict")
        return errors

    def need(self, errors: List[str]) -> Callable[[bool, str, str], None]:
        """``need(ok, field, allowed)``: append ``"field=<value>: must be <allowed>"`` unless ok."""

        def check(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                errors.append(f"{field}={getattr(self, field)!r}: must be {allowed}")

        return check

    def validate_qworld_fields(self) -> None:
        """ValueError naming every bad field, or the problem that cannot be built; then RLlib's
        ``env`` / ``env_config`` and the learner batch from the family's fields."""
        name = type(self).__name__
        errors = self.qworld_errors()
        if errors:
            raise ValueError(f"invalid {name}:\n  - " + "\n  - ".join(errors))
        try:
            self.problem()
        except Exception as e:
            raise ValueError(f"invalid {name}: env_id={self.env_id!r} with env_kwargs={self.env_kwargs!r} "
                             f"cannot be built: {type(e).__name__}: {e}") from e
        self.env = self.env_id
        self.env_config = dict(self.env_kwargs)
        self.train_batch_size_per_learner = int(self.batch_size) * int(self.updates_per_iteration)

    def validate(self) -> None:
        """ValueError naming every bad field; then derives RLlib's settings and runs its checks."""
        self.validate_qworld_fields()
        self.num_envs_per_env_runner = int(self.num_envs)
        self.rollout_fragment_length = int(self.rollout_length)
        self.env_runner_cls = SingleAgentEnvRunner
        super().validate()


def episode_transitions(episodes: Sequence[Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(states [n, d], actions [n], next_states [n, d])`` of sampled episode chunks, states
    read from the env's ``info["state"]`` (the dynamics' coordinates, CONTRACTS.md)."""
    s, a, s2 = [], [], []
    for ep in episodes:
        if len(ep) == 0:
            continue
        states = np.asarray([info["state"] for info in ep.get_infos()], dtype=np.float64)  # [len + 1, d]
        s.append(states[:-1])
        s2.append(states[1:])
        a.append(np.asarray(ep.get_actions(), dtype=np.int64).reshape(-1))
    if not s:
        return np.zeros((0, 0)), np.zeros((0,), np.int64), np.zeros((0, 0))
    return np.concatenate(s), np.concatenate(a), np.concatenate(s2)


class EpisodeReplayStep:
    """``training_step`` for an Algorithm with ``self.replay_buffer`` (see module doc)."""

    VALUE_LOSS_KEY: str
    Q_MEAN_KEY: str

    def replay_batch(self, num: int) -> Dict[str, Any]:
        """``num`` training rows sampled from ``self.replay_buffer`` (the family's columns)."""
        raise NotImplementedError

    def after_sample(self, episodes: Sequence[Any]) -> None:
        """Called with every sampled batch of episodes, before they enter the buffer."""

    def update_timesteps(self, env_steps: int) -> Dict[str, Any]:
        """The ``timesteps`` dict handed to ``LearnerGroup.update``."""
        return {NUM_ENV_STEPS_SAMPLED_LIFETIME: env_steps}

    def training_step(self) -> None:
        cfg = self.config
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, runner_results = synchronous_parallel_sample(
                worker_set=self.env_runner_group, concat=True, sample_timeout_s=cfg.sample_timeout_s,
                _uses_new_env_runners=True, _return_metrics=True,
            )
        self.metrics.aggregate(runner_results, key=ENV_RUNNER_RESULTS)
        self.after_sample(episodes)
        self.replay_buffer.add(episodes)
        if int(getattr(cfg, "experience_capacity", 0) or 0) > 0:
            self.record_experience(*episode_transitions(episodes))
        env_steps = self.env_steps_sampled()

        def log(name: str, value: Any) -> None:
            if value is not None:
                self.metrics.log_value(tuple(name.split("/")), value, window=1)

        log(K.TRAIN_EPSILON, linear_epsilon(env_steps, cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps()))
        if env_steps < cfg.learning_starts or self.replay_buffer.get_num_timesteps() == 0:
            return
        U, B = int(cfg.updates_per_iteration), int(cfg.batch_size)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(self.replay_batch(U * B))}, env_steps=U * B)
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                batch=batch,
                timesteps=self.update_timesteps(env_steps),
                num_epochs=1,
                minibatch_size=B,
                shuffle_batch_per_epoch=False,
            )
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)

        def learner_value(key: str) -> Any:
            try:
                return self.metrics.peek((LEARNER_RESULTS, DEFAULT_MODULE_ID, key))
            except KeyError:
                return None

        log(K.TRAIN_LOSS, learner_value(self.VALUE_LOSS_KEY))
        log(K.TRAIN_Q_MEAN, learner_value(self.Q_MEAN_KEY))
