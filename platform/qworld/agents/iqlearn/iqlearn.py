"""Offline IQ-Learn (Garg et al., "IQ-Learn: Inverse soft-Q Learning for Imitation", NeurIPS
2021) on RLlib's new API stack, goal-conditioned, for qworld's finite envs.

IQ-Learn is GIVEN expert demonstrations ``(s, a, s', terminated, goal)`` only: no rewards
(the file's reward column is never read) and no transition tensor P. It learns a soft Q
over the goal set whose inverse soft Bellman residual is the recovered reward.

One ``training_step`` =

1. ``updates_per_iteration * batch_size`` demonstration transitions from RLlib's offline
   data pipeline (``config.offline_data(input_=...)``, ``self.offline_data.sample``, as
   RLlib's BC / MARWIL / CQL; RLlib's ``OfflinePreLearner`` maps the parquet rows to
   episodes and its learner connector adds ``NEXT_OBS`` as for CQL). RLlib's iterator
   walks the (locally shuffled) data set in passes and a pass's last batch is its
   remainder, so an iteration may get fewer transitions; a set smaller than
   ``updates_per_iteration * batch_size`` is one pass per iteration;
2. ``learner_group.update`` in ``updates_per_iteration`` minibatches of ``batch_size``
   (``IQLearnTorchLearner``: the offline chi^2 IQ loss of ``losses``).

Demonstrations: ``demonstrations=None`` (default) makes the Algorithm write them at setup
into ``<its log dir>/demonstrations/`` with ``qworld.demonstrations.write_demonstrations``
(the exact solution of its own task, ``num_demonstrations`` episodes, the config's
``gamma`` and ``seed``), so a sweep file crosses variants without a pre-step; a path
(written by ``qworld demos``) is read as it is.

Steps counted: IQ-Learn never steps an env. As RLlib's offline algorithms do, the
demonstration transitions it consumes are counted as ``num_env_steps_sampled_lifetime``
(``qworld.metrics.TRAIN_ENV_STEPS``, and ``env_steps`` in ``qworld_config.json``), so
learning curves and checkpoints are labelled by data consumed; ``total_env_steps`` is
accepted (the sweep runner passes a stop budget) and ignored: sweeps stop IQ-Learn on
``training_iteration``. Per iteration it also reports ``num_demonstration_transitions``
(sampled this iteration), ``learner/td_loss`` (the IQ loss, the key every family's value
loss goes under) and ``learner/q_mean``.

Example::

    config = IQLearnConfig().training(env_id="qworld/FourRooms-v0",
                                      env_kwargs={"variant": "deterministic", "num_goals": 4})
    algo = config.build_algo()
    algo.train()
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import qworld_envs
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import AddObservationsFromEpisodesToBatch
from ray.rllib.connectors.learner.add_next_observations_from_episodes_to_train_batch import (
    AddNextObservationsFromEpisodesToTrainBatch,
)
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    OFFLINE_SAMPLING_TIMER,
    TIMERS,
)

from qworld import metrics as K
from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.iqlearn import learner as LR
from qworld.agents.iqlearn import losses as Lz
from qworld.agents.iqlearn.module import IQLearnTorchRLModule
from qworld.agents.fields import Field, Message, as_dict, as_list, is_int, is_num, need, number_above
from qworld.agents.replay_step import CHECKPOINT_REPLAY_BUFFER, DICT, INT_1, WIDTHS, EpisodeReplayConfig
from qworld.layout import DEMONSTRATIONS_DIR, VALUE_TEMPERATURE

ALGORITHM_NAME = "iqlearn"

DEMONSTRATIONS_SUBDIR = "demonstrations"  # under the Algorithm's log dir (demonstrations=None)
NUM_DEMONSTRATION_TRANSITIONS = "num_demonstration_transitions"  # sampled this iteration

quiet_new_api_stack_notice("IQLearn")

def _check_env_id(value, config) -> Optional[Message]:
    finite = sorted(getattr(qworld_envs, "FINITE_ENVS", {}))
    if value in finite:
        return None
    kind = "continuous" if value in qworld_envs.CONTINUOUS_ENVS else "unknown"
    return Message(f"env_id={value!r}: {kind}; iqlearn runs on finite envs: {finite}")


class IQLearnConfig(EpisodeReplayConfig):
    """Configuration of offline goal-conditioned IQ-Learn; set fields with ``training(...)``.

    Defaults: alpha 0.5 (the public code's chi^2 weight), Adam; the soft-Q temperature,
    lr, batch and network are qworld's choices for its small finite envs (measured on
    FourRooms, see ``tune_configs/iqlearn_fourrooms.yaml``). Every field is declared once,
    in ``FIELDS`` (``docs/AGENT_CONFIG.md`` lists them).

    Only finite envs (``qworld_envs.FINITE_ENVS``): the demonstrator is the exact solution
    of the finite task. RLlib settings that store IQ-Learn fields: ``env`` (``env_id``),
    ``env_config`` (``env_kwargs``); derived in ``validate()``: ``input_`` <-
    ``demonstrations``, ``train_batch_size_per_learner`` <- ``batch_size *
    updates_per_iteration``. ``gamma``, ``lr`` and ``seed`` are RLlib's own fields.
    """

    ALGORITHM_NAME = ALGORITHM_NAME
    FIELDS = (
        # --- problem and data
        Field("env_id", qworld_envs.FOUR_ROOMS_ID, "a finite gymnasium goal env id", _check_env_id, alias="env"),
        Field("env_kwargs", {}, "env kwargs (variant, goal_type, num_goals, ...)", DICT, alias="env_config",
              store=as_dict),
        Field("demonstrations", None, "dir (or parquet file) of `qworld demos`; None: written at setup into the "
              "Algorithm's log dir (the exact solution of its own task)",
              need(lambda d: d is None or (isinstance(d, str) and Path(d).exists()),
                   "None (written at setup) or an existing dir / parquet file of `qworld demos`")),
        Field("num_demonstrations", 200, "episodes written when demonstrations is None", INT_1),
        Field("total_env_steps", None, "accepted and ignored (offline; sweeps stop IQ-Learn on training_iteration)",
              need(lambda v: v is None or (is_int(v) and v >= 1),
                   "None or an int >= 1 (ignored: IQ-Learn is offline)")),
        # --- loss and optimisation
        Field("gamma", 0.99, "discount (also the demonstrator's, when written at setup)",
              need(lambda v: is_num(v) and 0 < v < 1, "a number in (0, 1)"), rllib=True),
        Field("lr", 1e-3, "Adam lr", number_above(0), rllib=True),
        Field("alpha", 0.5, "chi^2 regulariser weight 1 / (4 alpha) (public code: 0.5)", number_above(0)),
        Field("temperature", 0.5, "soft-Q temperature T: V = T logsumexp(Q / T)", number_above(0)),
        Field("batch_size", 256, "transitions per gradient step", INT_1),
        Field("updates_per_iteration", 16, "gradient steps per training_step", INT_1),
        # --- network (PQN's all-goals MLP with LayerNorm)
        Field("hidden_sizes", [256, 256], "MLP widths", WIDTHS, store=as_list),
        Field("seed", None, "RLlib's seed (set with .debugging(seed=...); a sweep's trial axis)", keyword=False),
        replace(CHECKPOINT_REPLAY_BUFFER, check=None, keyword=False,
                doc="no replay buffer (offline); kept in the trial config as the other episode families have it"),
    )
    RLLIB_DEFAULTS = {
        "grad_clip": None,
        # RLlib: offline data, no env runners sampling
        "num_env_runners": 0,
        "materialize_data": False,  # read and mapped in one pass (materialize_mapped_data)
        "materialize_mapped_data": True,  # the pre-learner is stateless: map once
        # Ray Data's read tasks and mapping actor ask for no CPU (they run outside the Tune
        # trial's placement group, and a trial's CPUs are taken); its file listing task asks for
        # one CPU (not configurable), so a node running IQ-Learn trials needs one CPU free.
        "input_read_method_kwargs": {"num_cpus": 0},
        "map_batches_kwargs": {"concurrency": 1, "num_cpus": 0},  # one mapping actor (small data)
        "iter_batches_kwargs": {"local_shuffle_buffer_size": 8192},  # rows are in episode order
    }

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or IQLearn)

    def iqlearn_model_config(self) -> Dict[str, Any]:
        p = self.problem()
        return dict(
            obs_dim=p.obs_dim, goal_dim=p.goal_dim, num_goals=p.num_goals, num_actions=p.num_actions,
            goal_features=p.goal_features, env_id=self.env_id, env_kwargs=p.env_kwargs,
            hidden_sizes=list(self.hidden_sizes), head="all_goals", q_output="linear",
        )

    def qworld_config(self) -> Dict[str, Any]:
        """The episode-replay families' trial config, plus what the scorer needs of a soft,
        offline learner: its V's temperature (M is built with the soft V its Q satisfies) and
        where its demonstrations are (the rewards it recovers are read off them)."""
        out = super().qworld_config()
        out[VALUE_TEMPERATURE] = float(self.temperature)
        out[DEMONSTRATIONS_DIR] = str(Path(self.input_).absolute()) if isinstance(self.input_, str) and self.input_ else None
        return out

    @override(AlgorithmConfig)
    def validate(self) -> None:
        """ValueError naming every bad field; then derives RLlib's settings and runs its checks.

        (Not the episode-replay families' ``validate``: that one derives env-runner sampling
        settings, and IQ-Learn samples no env.)
        """
        self.validate_qworld_fields()
        # offline: its batches come from the demonstrations, RLlib builds it no replay buffer
        self.replay_buffer_config = {**self.replay_buffer_config, "no_local_replay_buffer": True}
        if self.demonstrations is not None:
            self.input_ = str(Path(self.demonstrations).absolute())
        # Ray Data's local shuffle draws from the trial's seed, not from nowhere (unseeded, one
        # config's recovered-reward correlation ranged 0.47-0.60 run to run; seeded, two runs
        # gave 0.60 and 0.62: the pipeline's block order still varies).
        if self.seed is not None and "local_shuffle_seed" not in self.iter_batches_kwargs:
            self.iter_batches_kwargs = {**self.iter_batches_kwargs, "local_shuffle_seed": int(self.seed)}
        AlgorithmConfig.validate(self)

    @override(AlgorithmConfig)
    def build_learner_connector(self, input_observation_space, input_action_space, device=None):
        """RLlib's default learner pipeline plus ``NEXT_OBS`` (as RLlib's CQL / SAC add it)."""
        pipeline = super().build_learner_connector(
            input_observation_space=input_observation_space, input_action_space=input_action_space, device=device,
        )
        pipeline.insert_after(AddObservationsFromEpisodesToBatch, AddNextObservationsFromEpisodesToTrainBatch())
        return pipeline

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=IQLearnTorchRLModule, model_config=self.iqlearn_model_config())

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        return LR.IQLearnTorchLearner


class IQLearn(QworldAlgorithmMixin, Algorithm):
    """Offline goal-conditioned IQ-Learn on RLlib's new API stack (see module doc)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> IQLearnConfig:
        return IQLearnConfig()

    @override(Algorithm)
    def setup(self, config) -> None:
        import ray.data

        # Ray Data prints its execution plan and progress for every pass over the data; a sweep's
        # console is one line per event (sweep.callbacks), so the pipeline runs quietly.
        context = ray.data.DataContext.get_current()
        context.print_on_execution_start = False
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if self.config.demonstrations is None:
            # RLlib builds its OfflineData from `input_` inside setup, so the file must exist
            # (and `input_` point at it) before that; the log dir exists only from here on.
            from qworld.demonstrations import write_demonstrations

            cfg = self.config
            out = Path(self.logdir) / DEMONSTRATIONS_SUBDIR
            write_demonstrations(out, cfg.env_id, cfg.env_kwargs, num_episodes=int(cfg.num_demonstrations),
                                 gamma=float(cfg.gamma), seed=int(cfg.seed or 0))
            cfg = cfg.copy(copy_frozen=False)
            cfg.input_ = str(out.absolute())
            cfg.validate()
            cfg.freeze()
            self.config = config = cfg
        super().setup(config)

    @override(Algorithm)
    def training_step(self) -> None:
        cfg = self.config
        U, B = int(cfg.updates_per_iteration), int(cfg.batch_size)
        with self.metrics.log_time((TIMERS, OFFLINE_SAMPLING_TIMER)):
            batch = self.offline_data.sample(num_samples=U * B, num_shards=cfg.num_learners, return_iterator=False)
        num = int(batch.env_steps())
        self.metrics.log_value((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), num, reduce="lifetime_sum")
        self.metrics.log_value(NUM_DEMONSTRATION_TRANSITIONS, num, window=1)
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                batch=batch,
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self.env_steps_sampled()},
                num_epochs=1,
                minibatch_size=B,
                shuffle_batch_per_epoch=False,
            )
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        for key, name in ((Lz.LOSS, K.TRAIN_LOSS), (LR.Q_MEAN_KEY, K.TRAIN_Q_MEAN)):
            value = self.metrics.peek((LEARNER_RESULTS, DEFAULT_MODULE_ID, key), default=None)
            if value is not None:
                self.metrics.log_value(tuple(name.split("/")), value, window=1)
