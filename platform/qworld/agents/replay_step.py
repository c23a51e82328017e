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

A family's config subclasses :class:`EpisodeReplayConfig` and declares its ``FIELDS`` (each
field once: name, default, doc, check; ``qworld.agents.fields``) and ``ALGORITHM_NAME``. Its Algorithm lists :class:`EpisodeReplayStep` before ``QworldAlgorithmMixin`` and
``Algorithm`` and provides :meth:`replay_batch`, ``VALUE_LOSS_KEY`` and ``Q_MEAN_KEY``
(its learner's result keys); :meth:`replay_buffer_kwargs` (config), :meth:`sample_episodes`,
:meth:`after_sample` and :meth:`update_timesteps` are hooks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
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
from qworld.agents.fields import Field, FieldsConfig, int_at_least, is_num, need, unit_interval, widths
from qworld.agents.pqn.module import linear_epsilon
from qworld.agents.pqn.problem import ProblemInfo, probe_problem
from qworld.agents.replay_buffer import WindowEpisodeReplayBuffer
from qworld.agents.rllib_private import wants_component

REPLAY_BUFFER_STATE = "qworld_replay_buffer"  # the Algorithm's state keys (algorithm_state.pkl)
COUNTERS_STATE = "qworld_counters"


# Checks the episode-replay families share (messages as ``"field=<value>: must be <allowed>"``).
INT_1 = int_at_least(1)
INT_0 = int_at_least(0)
UNIT = unit_interval()
DISCOUNT = need(lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]")
DICT = need(lambda v: isinstance(v, dict), "a dict")
BOOL = need(lambda v: isinstance(v, bool), "True or False")
WIDTHS = widths()

CHECKPOINT_REPLAY_BUFFER = Field(
    "checkpoint_replay_buffer", True,
    "whether a checkpoint holds the replay buffer (its arrays, ring position, sampling generator), so that a "
    "restored trial (Tune's retry, `qworld resume`) goes on with the data it had; a full buffer of 100k steps "
    "costs 30.8 MB on disk for MR.Q on FourRooms (68 states, 4 goals; 62.8 MB at 68 goals) and 4.4 MB for D3G "
    "on MountainCar; False leaves it out: a restored trial refills an empty buffer", BOOL)


class EpisodeReplayConfig(FieldsConfig, AlgorithmConfig):
    """The part of an episode-replay family's config that does not depend on the family: its
    fields come from the family's ``FIELDS`` (``qworld.agents.fields``), ``env_id`` /
    ``env_kwargs`` / ``num_envs`` / ``rollout_length`` stored in RLlib's ``env`` /
    ``env_config`` / ``num_envs_per_env_runner`` / ``rollout_fragment_length``."""

    CONFIG_HEAD = {"head": "all_goals"}

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
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

    def problem(self) -> ProblemInfo:
        """Sizes and goal set of ``env_id`` with ``env_kwargs`` (cached per process)."""
        return probe_problem(self.env_id, self.env_kwargs)

    def epsilon_decay_steps(self) -> float:
        return float(self.epsilon_decay_fraction) * float(self.total_env_steps)

    def more_errors(self, errors: List[str]) -> List[str]:
        """A family with a replay buffer: RLlib's ``replay_buffer_config`` names its type."""
        if "buffer_capacity" not in self.field_names():
            return []
        rb = self.replay_buffer_config
        if isinstance(rb, dict) and "type" in rb:
            return []
        return [f"replay_buffer_config={rb!r}: must be a dict with a 'type'"]

    def validate_qworld_fields(self) -> None:
        """ValueError naming every bad field, or the problem that cannot be built; then the
        learner batch from the family's fields."""
        self.validate_fields()
        self.validate_problem()
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
        """One round of rollouts: ``(episodes, env runner metrics)``: every remote env runner's
        ``sample()`` (or the local one's, without remote runners), as RLlib's
        ``synchronous_parallel_sample`` does."""
        group = self.env_runner_group
        local = group.num_remote_workers() <= 0
        results = group.foreach_env_runner(
            lambda runner: (runner.sample(), runner.get_metrics()), local_env_runner=local,
            timeout_seconds=None if local else self.config.sample_timeout_s,
        )
        return [episode for episodes, _ in results for episode in episodes], [metrics for _, metrics in results]

    # ------------------------------------------------------------------ checkpoint state
    def get_state(self, components=None, *, not_components=None, **kwargs) -> Dict[str, Any]:
        """RLlib's state, the replay buffer's (unless ``checkpoint_replay_buffer`` is False)
        and the counters (``ALGORITHM_COUNTERS``, the first learner's ``LEARNER_COUNTERS``)."""
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self.config.checkpoint_replay_buffer and wants_component(self, REPLAY_BUFFER_STATE, components,
                                                                    not_components):
            state[REPLAY_BUFFER_STATE] = self.replay_buffer.get_state()
        if wants_component(self, COUNTERS_STATE, components, not_components):
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
