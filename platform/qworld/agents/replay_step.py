"""What the off-policy families on RLlib's episode replay (MR.Q, D3G) share, written once:
their config's field handling (:class:`EpisodeReplayConfig`) and their ``training_step``
(:class:`EpisodeReplayStep`).

1. sample ``rollout_length`` steps of every env with RLlib's ``SingleAgentEnvRunner``;
2. add the episodes to the Algorithm's ``replay_buffer``: RLlib's ``local_replay_buffer``,
   built by RLlib from the config's ``replay_buffer_config`` (by default
   :class:`qworld.agents.replay_buffer.WindowEpisodeReplayBuffer`, an ``EpisodeReplayBuffer``
   in preallocated arrays sampling windows by array indexing; ``capacity`` <-
   ``buffer_capacity``, ``seed`` <- ``seed``), and the true transitions to the trial's
   experience log when the config's ``experience_capacity`` > 0 (states from
   ``info["state"]``, CONTRACTS.md); log ``replay/size`` (transitions held);
3. past ``learning_starts`` env steps: ``updates_per_iteration`` gradient steps of
   ``batch_size`` on a batch the family samples from the buffer (:meth:`replay_batch`);
4. sync the weights to the env runners; log ``learner/td_loss`` (the family's value loss),
   ``learner/q_mean`` and ``learner/epsilon``.

Checkpoints: the Algorithm's ``get_state`` / ``set_state`` (so ``save_to_path``,
``restore_from_path``, ``Algorithm.from_checkpoint`` and Tune's restore) carry the replay
buffer's state (unless ``checkpoint_replay_buffer`` is False), the Algorithm's
``ALGORITHM_COUNTERS`` (MR.Q: its reward statistics) and the learners' ``LEARNER_COUNTERS``
(gradient steps, next target sync), so a restored trial goes on as the uninterrupted one
would: given the same new episodes, its next iterations' losses are the same.

A family's config subclasses :class:`EpisodeReplayConfig` (its ``FIELDS``, ``ALGORITHM_NAME``
and list-valued ``LIST_FIELDS``; its ``training`` spells its keywords and hands ``locals()``
to :meth:`EpisodeReplayConfig.set_fields`). Its Algorithm lists :class:`EpisodeReplayStep` before ``QworldAlgorithmMixin`` and
``Algorithm`` and provides :meth:`replay_batch`, ``VALUE_LOSS_KEY`` and ``Q_MEAN_KEY``
(its learner's result keys); :meth:`replay_buffer_kwargs` (config), :meth:`sample_episodes`,
:meth:`after_sample` and :meth:`update_timesteps` are hooks.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    REPLAY_BUFFER_SAMPLE_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)
from ray.rllib.utils.serialization import serialize_type

from qworld import metrics as K
from qworld.agents.pqn.module import linear_epsilon
from qworld.agents.pqn.problem import ProblemInfo, jsonable, probe_problem
from qworld.agents.replay_buffer import WindowEpisodeReplayBuffer

REPLAY_BUFFER_STATE = "qworld_replay_buffer"  # the Algorithm's state keys (algorithm_state.pkl)
COUNTERS_STATE = "qworld_counters"


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
    SHARED_FIELDS: Tuple[str, ...] = ("checkpoint_replay_buffer",)  # every family's, after its FIELDS

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        # Whether a checkpoint holds the replay buffer (its arrays, ring position, sampling
        # generator), so that a restored trial (Tune's retry, `qworld resume`) goes on with
        # the data it had. A full buffer of 100k steps costs 30.8 MB on disk for MR.Q on
        # FourRooms (68 states, 4 goals; 62.8 MB at 68 goals) and 4.4 MB for D3G on
        # MountainCar (README); False leaves it out: a restored trial refills an empty buffer.
        self.checkpoint_replay_buffer: bool = True
        # RLlib's replay buffer config; "capacity" and "seed" are set from buffer_capacity and
        # seed, the observation a row keeps from the family (replay_buffer_kwargs).
        self.replay_buffer_config: Dict[str, Any] = {"type": WindowEpisodeReplayBuffer}

    @override(AlgorithmConfig)
    def training(self, *, replay_buffer_config=NotProvided, **kwargs) -> "EpisodeReplayConfig":
        """RLlib's ``training()`` plus ``replay_buffer_config`` (merged into the current one)."""
        super().training(**kwargs)
        if replay_buffer_config is not NotProvided:
            self.replay_buffer_config = {**self.replay_buffer_config, **dict(replay_buffer_config)}
        return self

    def replay_buffer_kwargs(self) -> Dict[str, Any]:
        """The family's keywords of the replay buffer (what a row's observation is)."""
        return {}

    def set_fields(self, values: Dict[str, Any]) -> None:
        """Set every family field given in ``values`` (a ``training()``'s ``locals()``)."""
        for name in self.FIELDS + self.SHARED_FIELDS:
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
        for name in self.FIELDS + self.SHARED_FIELDS:
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
        need(isinstance(self.checkpoint_replay_buffer, bool), "checkpoint_replay_buffer", "True or False")
        need(isinstance(self.replay_buffer_config, dict) and "type" in self.replay_buffer_config,
             "replay_buffer_config", "a dict with a 'type'")
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

    def _resolve_replay_buffer(self) -> None:
        """RLlib's ``replay_buffer_config`` from the family's buffer fields (families that learn
        online from a buffer; IQ-Learn, offline, has none)."""
        buffer = {**self.replay_buffer_config, **self.replay_buffer_kwargs(),
                  "capacity": int(self.buffer_capacity), "seed": self.seed}
        # RLlib's Algorithm.setup tests `"EpisodeReplayBuffer" in type` (a str); a class is
        # handed over as its import path (from_config imports it again)
        buffer["type"] = serialize_type(buffer["type"])
        self.replay_buffer_config = buffer

    def validate(self) -> None:
        """ValueError naming every bad field; then derives RLlib's settings and runs its checks."""
        self.validate_qworld_fields()
        self._resolve_replay_buffer()
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
    """``training_step`` for an Algorithm with RLlib's ``local_replay_buffer`` (see module
    doc), and the state a checkpoint adds to RLlib's."""

    VALUE_LOSS_KEY: str
    Q_MEAN_KEY: str
    ALGORITHM_COUNTERS: Tuple[str, ...] = ()  # the Algorithm's attributes a checkpoint keeps
    LEARNER_COUNTERS: Tuple[str, ...] = ()  # each learner's attributes a checkpoint keeps

    @property
    def replay_buffer(self):
        """The replay buffer (RLlib's ``local_replay_buffer``, built from ``replay_buffer_config``)."""
        return self.local_replay_buffer

    def sample_episodes(self) -> Tuple[List[Any], List[Dict[str, Any]]]:
        """One round of rollouts: ``(episodes, env runner metrics)``."""
        return synchronous_parallel_sample(
            worker_set=self.env_runner_group, concat=True, sample_timeout_s=self.config.sample_timeout_s,
            _uses_new_env_runners=True, _return_metrics=True,
        )

    # ------------------------------------------------------------------ checkpoint state
    def get_state(self, components=None, *, not_components=None, **kwargs) -> Dict[str, Any]:
        """RLlib's state, the replay buffer's (unless ``checkpoint_replay_buffer`` is False)
        and the counters (``ALGORITHM_COUNTERS``, the first learner's ``LEARNER_COUNTERS``)."""
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self.config.checkpoint_replay_buffer and self._check_component(REPLAY_BUFFER_STATE, components,
                                                                          not_components):
            state[REPLAY_BUFFER_STATE] = self.replay_buffer.get_state()
        if self._check_component(COUNTERS_STATE, components, not_components):
            names = tuple(self.LEARNER_COUNTERS)
            learners = [r.get() for r in self.learner_group.foreach_learner(
                lambda learner: {k: getattr(learner, k) for k in names})]
            state[COUNTERS_STATE] = {
                "algorithm": {k: getattr(self, k) for k in self.ALGORITHM_COUNTERS},
                "learner": learners[0],
            }
        return state

    def set_state(self, state: Dict[str, Any]) -> None:
        super().set_state(state)
        if REPLAY_BUFFER_STATE in state:
            self.replay_buffer.set_state(state[REPLAY_BUFFER_STATE])
        if COUNTERS_STATE in state:
            counters = state[COUNTERS_STATE]
            for k, v in counters["algorithm"].items():
                if k not in self.ALGORITHM_COUNTERS:
                    raise ValueError(f"checkpoint counter {k!r} is not one of {type(self).__name__}'s "
                                     f"{self.ALGORITHM_COUNTERS}")
                setattr(self, k, v)
            learner_counters = dict(counters["learner"])
            unknown = set(learner_counters) - set(self.LEARNER_COUNTERS)
            if unknown:
                raise ValueError(f"checkpoint learner counters {sorted(unknown)} are not among "
                                 f"{type(self).__name__}'s {self.LEARNER_COUNTERS}")

            def restore(learner) -> None:
                for k, v in learner_counters.items():
                    getattr(learner, k)  # AttributeError if the learner no longer has it
                    setattr(learner, k, v)

            for r in self.learner_group.foreach_learner(restore):
                r.get()

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
            episodes, runner_results = self.sample_episodes()
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
        log(K.TRAIN_REPLAY_SIZE, self.replay_buffer.get_num_timesteps())
        if env_steps < cfg.learning_starts or self.replay_buffer.get_num_timesteps() == 0:
            return
        U, B = int(cfg.updates_per_iteration), int(cfg.batch_size)
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER)):
            rows = self.replay_batch(U * B)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(rows)}, env_steps=U * B)
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
