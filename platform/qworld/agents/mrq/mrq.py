"""Goal-conditioned MR.Q (Fujimoto et al., ICLR 2025) on RLlib's new API stack.

One ``training_step`` =

1. sample ``rollout_length`` steps from each of ``num_envs`` copies of the gymnasium goal
   env with RLlib's own ``SingleAgentEnvRunner`` (epsilon-greedy on the commanded goal);
   the episodes keep the env's infos, so every transition carries ``rewards [L]`` /
   ``terminals [L]`` of every goal;
2. add the episodes to the replay buffer (RLlib's ``local_replay_buffer``: an
   ``EpisodeReplayBuffer`` in preallocated arrays, ``qworld.agents.replay_buffer``) and
   update the running mean |reward| (MR.Q's reward scale);
3. past ``learning_starts`` env steps: sample ``updates_per_iteration * batch_size``
   windows of ``max(enc_horizon, n_step)`` transitions from the buffer and run
   ``updates_per_iteration`` gradient steps on them (``MRQTorchLearner``);
4. sync the weights to the env runners.

Why RLlib's standard env runner: the goal env's infos reach the buffer untouched (RLlib
stores infos in its episodes), so no connector or custom runner is needed and any env
that follows CONTRACTS.md works; the batched torch envs of PQN's fast runner would be
faster but would need their outputs rebuilt as ``SingleAgentEpisode`` objects.

Why a uniform episode buffer (not LAP): MR.Q's encoder needs windows of consecutive
transitions, which only uniform episode replay samples (``batch_length_T``); RLlib's
``PrioritizedEpisodeReplayBuffer`` samples single n-step transitions. The Huber value loss
of LAP is kept (LAP with uniform sampling). A checkpoint holds the buffer, the reward
statistics and the learner's counters (``qworld.agents.replay_step``).

Example::

    config = MRQConfig().training(env_id="qworld/FourRooms-v0", total_env_steps=100_000)
    algo = config.build_algo()
    algo.train()
"""

from __future__ import annotations

from typing import Any, Dict

import qworld_envs  # noqa: F401  (registers the gymnasium envs in every process)
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.mrq import learner as LR
from qworld.agents.mrq.module import MRQTorchRLModule
from qworld.agents.mrq.replay import abs_reward_sum, sample_windows
from qworld.agents.fields import Field, as_dict, as_list, int_at_least, number_above, number_at_least
from qworld.agents.replay_step import (
    CHECKPOINT_REPLAY_BUFFER,
    DICT,
    DISCOUNT,
    INT_0,
    INT_1,
    UNIT,
    WIDTHS,
    EpisodeReplayConfig,
    EpisodeReplayStep,
)

ALGORITHM_NAME = "mrq"


quiet_new_api_stack_notice("MRQ")

class MRQConfig(EpisodeReplayConfig):
    """Configuration of goal-conditioned MR.Q; set fields with ``training(...)``.

    Defaults are MR.Q's public hyperparameters except the sizes and the update schedule,
    scaled for CPU and small finite envs: embeddings and MLPs 128 wide (MR.Q: 512;
    FourRooms has 68 one-hot states, so 128 features already exceed the state count and
    a training step costs ~16x less), one gradient step per env step over 4-env
    rollouts, 1 000 learning-start steps and 100k capacity (MR.Q: 1e6), epsilon-greedy
    exploration 1 -> 0.05 (MR.Q's discrete actor explores through its Gumbel policy).
    Not in MR.Q (one task): ``goals_per_step`` goals of the L drawn per gradient step for
    the reward, terminal and value losses (``qworld.agents.mrq.learner``). Every field is
    declared once, in ``FIELDS`` (``docs/AGENT_CONFIG.md`` lists them).

    RLlib settings that store MR.Q fields: ``env`` (``env_id``), ``env_config``
    (``env_kwargs``), ``num_envs_per_env_runner`` (``num_envs``), ``rollout_fragment_length``
    (``rollout_length``); ``gamma``, ``grad_clip`` and ``seed`` are RLlib's own; the
    module's ``model_config`` is derived from the network fields.
    """

    ALGORITHM_NAME = ALGORITHM_NAME
    FIELDS = (
        # --- problem
        Field("env_id", qworld_envs.FOUR_ROOMS_ID, "gymnasium goal env id", alias="env"),
        Field("env_kwargs", {}, "env kwargs (variant, goal_type, num_goals, ...)", DICT, alias="env_config",
              store=as_dict),
        # --- sampling
        Field("num_envs", 4, "gymnasium env copies per env runner", INT_1, alias="num_envs_per_env_runner"),
        Field("rollout_length", 16, "steps per env per training_step", INT_1, alias="rollout_fragment_length"),
        Field("total_env_steps", 1_000_000, "budget: the epsilon schedule refers to it", INT_1),
        # --- targets
        Field("gamma", 0.99, "discount", DISCOUNT, rllib=True),
        Field("n_step", 3, "n of the value target (MR.Q: 3)", INT_1),
        Field("enc_horizon", 5, "unroll length of the model loss (MR.Q: 5)", INT_1),
        Field("goals_per_step", 4, "goals each gradient step trains the reward, terminal and value heads at, drawn "
              "uniformly without replacement from the L goals (shared by the step's windows; >= L: every goal, "
              "exact all-goals training). Not in MR.Q (one task): a step's cost is then independent of L; each "
              "loss is an unbiased estimate of its all-goals mean", INT_1),
        # --- replay and updates
        Field("batch_size", 256, "windows per gradient step (MR.Q: 256)", INT_1),
        Field("updates_per_iteration", 64, "gradient steps per training_step (= env steps: replay ratio 1)", INT_1),
        Field("learning_starts", 1_000, "env steps before the first update (MR.Q: 10k)", INT_0),
        Field("buffer_capacity", 100_000, "env steps the EpisodeReplayBuffer holds (MR.Q: 1e6)", INT_1),
        Field("target_update_freq", 250, "gradient steps between hard target copies (MR.Q: 250)", INT_1),
        # --- optimisation (MR.Q: AdamW)
        Field("enc_lr", 1e-4, "encoder + model lr", number_above(0)),
        Field("enc_weight_decay", 1e-4, "encoder + model AdamW weight decay", number_at_least(0)),
        Field("value_lr", 3e-4, "value heads lr", number_above(0)),
        Field("value_weight_decay", 1e-4, "value heads AdamW weight decay", number_at_least(0)),
        Field("grad_clip", 20.0, "max grad norm per optimizer (RLlib's setting)", rllib=True),
        Field("dynamics_weight", 1.0, "loss weight of the dynamics term (MR.Q: 1)", number_at_least(0)),
        Field("reward_weight", 0.1, "loss weight of the reward term (MR.Q: 0.1)", number_at_least(0)),
        Field("terminal_weight", 0.1, "loss weight of the terminal term (MR.Q: 0.1)", number_at_least(0)),
        Field("num_bins", 65, "two-hot reward bins, symexp-spaced over [-10, 10]", int_at_least(2)),
        # --- network widths (MR.Q: zs = zsa = 512, za = 256, hidden 512)
        Field("zs_dim", 128, "state embedding z_s", INT_1),
        Field("za_dim", 32, "action embedding", INT_1),
        Field("zsa_dim", 128, "state-action embedding z_sa", INT_1),
        Field("enc_hidden", [128, 128], "hidden widths of f and g (ELU)", WIDTHS, store=as_list),
        Field("value_hidden", [128, 128], "hidden widths of each value head (LayerNorm + ELU)", WIDTHS,
              store=as_list),
        # --- exploration (epsilon-greedy on the commanded goal, over env steps)
        Field("epsilon_start", 1.0, "exploration rate at step 0", UNIT),
        Field("epsilon_end", 0.05, "exploration rate after the decay", UNIT),
        Field("epsilon_decay_fraction", 0.1, "fraction of total_env_steps over which epsilon decays", UNIT),
        # --- the trial's experience log (qworld.worldmodel.experience: the `supervised` / `qss` methods)
        Field("experience_capacity", 65536, "continuous envs: reservoir size of the experience log; 0: record "
              "nothing", INT_0),
        Field("seed", None, "RLlib's seed (set with .debugging(seed=...); a sweep's trial axis)", keyword=False),
        CHECKPOINT_REPLAY_BUFFER,
    )
    RLLIB_DEFAULTS = {"grad_clip_by": "global_norm", "num_env_runners": 0}

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or MRQ)

    @property
    def horizon(self) -> int:
        """Transitions per replayed window."""
        return max(int(self.enc_horizon), int(self.n_step))

    def replay_buffer_kwargs(self) -> Dict[str, Any]:
        """A buffer row keeps the state part of the observation (not the goal features)."""
        return {"observation": "obs", "obs_dim": int(self.problem().obs_dim)}

    def mrq_model_config(self) -> Dict[str, Any]:
        p = self.problem()
        return dict(
            obs_dim=p.obs_dim, goal_dim=p.goal_dim, num_goals=p.num_goals, num_actions=p.num_actions,
            goal_features=p.goal_features, zs_dim=int(self.zs_dim), za_dim=int(self.za_dim),
            zsa_dim=int(self.zsa_dim), enc_hidden=list(self.enc_hidden), value_hidden=list(self.value_hidden),
            num_bins=int(self.num_bins), epsilon_start=float(self.epsilon_start),
            epsilon_end=float(self.epsilon_end), epsilon_decay_steps=self.epsilon_decay_steps(),
            env_id=self.env_id, env_kwargs=p.env_kwargs,
        )

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=MRQTorchRLModule, model_config=self.mrq_model_config())

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        return LR.MRQTorchLearner


class MRQ(EpisodeReplayStep, QworldAlgorithmMixin, Algorithm):
    """Goal-conditioned MR.Q on RLlib's new API stack (see module doc)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> MRQConfig:
        return MRQConfig()

    @override(Algorithm)
    def setup(self, config) -> None:
        super().setup(config)  # builds the replay buffer (RLlib's local_replay_buffer)
        self._abs_reward_total = 0.0  # running sum of |r| over every goal of every added transition
        self._reward_count = 0

    def buffer_reward_scale(self) -> float:
        """MR.Q's reward scale: mean |reward| of the data added so far (every goal)."""
        return self._abs_reward_total / self._reward_count if self._reward_count else 1.0

    VALUE_LOSS_KEY = LR.VALUE_LOSS_KEY
    Q_MEAN_KEY = LR.Q_MEAN_KEY

    def after_sample(self, episodes) -> None:
        total, count = abs_reward_sum(episodes)
        self._abs_reward_total += total
        self._reward_count += count

    def replay_batch(self, num: int) -> Dict[str, Any]:
        """Windows of ``horizon`` consecutive transitions (the encoder's unroll)."""
        p = self.config.problem()
        return sample_windows(self.replay_buffer, num, self.config.horizon, p.obs_dim, p.num_goals)

    def update_timesteps(self, env_steps: int) -> Dict[str, Any]:
        U = int(self.config.updates_per_iteration)
        return {
            NUM_ENV_STEPS_SAMPLED_LIFETIME: env_steps,
            # gradient steps of each learner (the batch is split over them)
            LR.GRAD_STEPS_KEY: -(-U // max(1, int(self.config.num_learners or 0))),
            LR.BUFFER_REWARD_SCALE_KEY: self.buffer_reward_scale(),
        }

    # ------------------------------------------------------------------ checkpoints
    # kept in every checkpoint beside the replay buffer (EpisodeReplayStep.get_state)
    ALGORITHM_COUNTERS = ("_abs_reward_total", "_reward_count")  # the reward statistics
    LEARNER_COUNTERS = ("_grad_steps", "_next_target_update")  # gradient steps, next target sync
