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

from typing import Any, Dict, List

import qworld_envs  # noqa: F401  (registers the gymnasium envs in every process)
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.mrq import learner as LR
from qworld.agents.mrq.module import MRQTorchRLModule
from qworld.agents.mrq.replay import abs_reward_sum, sample_windows
from qworld.agents.replay_step import EpisodeReplayConfig, EpisodeReplayStep, is_int, is_num

ALGORITHM_NAME = "mrq"


quiet_new_api_stack_notice("MRQ")

# The MR.Q fields of the config, in the order the JSON config lists them.
MRQ_FIELDS = (
    "env_id", "env_kwargs", "num_envs", "rollout_length", "total_env_steps",
    "gamma", "n_step", "enc_horizon", "goals_per_step", "batch_size", "updates_per_iteration",
    "learning_starts", "buffer_capacity", "target_update_freq", "enc_lr", "enc_weight_decay", "value_lr",
    "value_weight_decay", "grad_clip", "dynamics_weight", "reward_weight", "terminal_weight",
    "num_bins", "zs_dim", "za_dim", "zsa_dim", "enc_hidden", "value_hidden",
    "epsilon_start", "epsilon_end", "epsilon_decay_fraction", "experience_capacity", "seed",
)


class MRQConfig(EpisodeReplayConfig):
    """Configuration of goal-conditioned MR.Q; set fields with ``training(...)``.

    Defaults are MR.Q's public hyperparameters except the sizes and the update schedule,
    scaled for CPU and small finite envs: embeddings and MLPs 128 wide (MR.Q: 512;
    FourRooms has 68 one-hot states, so 128 features already exceed the state count and
    a training step costs ~16x less), one gradient step per env step over 4-env
    rollouts, 1 000 learning-start steps and 100k capacity (MR.Q: 1e6), epsilon-greedy
    exploration 1 -> 0.05 (MR.Q's discrete actor explores through its Gumbel policy).
    Not in MR.Q (one task): ``goals_per_step`` goals of the L drawn per gradient step for
    the reward, terminal and value losses (``qworld.agents.mrq.learner``).

    RLlib settings derived from MR.Q fields (``env`` <- ``env_id``, ``env_config`` <-
    ``env_kwargs``, ``num_envs_per_env_runner`` <- ``num_envs``,
    ``rollout_fragment_length`` <- ``rollout_length``, ``model_config`` <- the network
    fields) are overwritten in ``validate()``; set the MR.Q fields instead.
    """

    ALGORITHM_NAME = ALGORITHM_NAME
    FIELDS = MRQ_FIELDS
    LIST_FIELDS = ("enc_hidden", "value_hidden")
    RLLIB_FIELDS = ("gamma", "grad_clip", "seed")

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or MRQ)
        # --- problem
        self.env_id: str = qworld_envs.FOUR_ROOMS_ID  # gymnasium goal env id
        self.env_kwargs: Dict[str, Any] = {}  # env kwargs (variant, goal_type, num_goals, ...)
        # --- sampling
        self.num_envs: int = 4  # gymnasium env copies per env runner
        self.rollout_length: int = 16  # steps per env per training_step
        self.total_env_steps: int = 1_000_000  # budget: the epsilon schedule refers to it
        # --- targets
        self.gamma = 0.99  # discount
        self.n_step: int = 3  # n of the value target (MR.Q: 3)
        self.enc_horizon: int = 5  # unroll length of the model loss (MR.Q: 5)
        # Goals each gradient step trains the reward, terminal and value heads at, drawn
        # uniformly without replacement from the L goals (shared by the step's windows;
        # >= L: every goal, exact all-goals training). Not in MR.Q (one task): a step's cost
        # is then independent of L; each loss is an unbiased estimate of its all-goals mean.
        self.goals_per_step: int = 4
        # --- replay and updates
        self.batch_size: int = 256  # windows per gradient step (MR.Q: 256)
        self.updates_per_iteration: int = 64  # gradient steps per training_step (= env steps: replay ratio 1)
        self.learning_starts: int = 1_000  # env steps before the first update (MR.Q: 10k)
        self.buffer_capacity: int = 100_000  # env steps the EpisodeReplayBuffer holds (MR.Q: 1e6)
        self.target_update_freq: int = 250  # gradient steps between hard target copies (MR.Q: 250)
        # --- optimisation (MR.Q: AdamW)
        self.enc_lr: float = 1e-4  # encoder + model lr
        self.enc_weight_decay: float = 1e-4
        self.value_lr: float = 3e-4  # value heads lr
        self.value_weight_decay: float = 1e-4
        self.grad_clip = 20.0  # max grad norm per optimizer (RLlib's setting)
        self.grad_clip_by = "global_norm"
        self.dynamics_weight: float = 1.0  # loss weights of the model terms (MR.Q: 1, 0.1, 0.1)
        self.reward_weight: float = 0.1
        self.terminal_weight: float = 0.1
        self.num_bins: int = 65  # two-hot reward bins, symexp-spaced over [-10, 10]
        # --- network widths (MR.Q: zs = zsa = 512, za = 256, hidden 512)
        self.zs_dim: int = 128  # state embedding z_s
        self.za_dim: int = 32  # action embedding
        self.zsa_dim: int = 128  # state-action embedding z_sa
        self.enc_hidden: List[int] = [128, 128]  # hidden widths of f and g (ELU)
        self.value_hidden: List[int] = [128, 128]  # hidden widths of each value head (LayerNorm + ELU)
        # --- exploration (epsilon-greedy on the commanded goal, over env steps)
        self.epsilon_start: float = 1.0
        self.epsilon_end: float = 0.05
        self.epsilon_decay_fraction: float = 0.1  # of total_env_steps
        # --- the trial's experience log (qworld.worldmodel.experience: the `supervised` / `qss` methods)
        self.experience_capacity: int = 65536  # continuous: reservoir size; 0: record nothing
        # --- RLlib
        self.num_env_runners = 0
        self.env = self.env_id

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        env_id=NotProvided,
        env_kwargs=NotProvided,
        num_envs=NotProvided,
        rollout_length=NotProvided,
        total_env_steps=NotProvided,
        n_step=NotProvided,
        enc_horizon=NotProvided,
        goals_per_step=NotProvided,
        batch_size=NotProvided,
        updates_per_iteration=NotProvided,
        learning_starts=NotProvided,
        buffer_capacity=NotProvided,
        target_update_freq=NotProvided,
        enc_lr=NotProvided,
        enc_weight_decay=NotProvided,
        value_lr=NotProvided,
        value_weight_decay=NotProvided,
        dynamics_weight=NotProvided,
        reward_weight=NotProvided,
        terminal_weight=NotProvided,
        num_bins=NotProvided,
        zs_dim=NotProvided,
        za_dim=NotProvided,
        zsa_dim=NotProvided,
        enc_hidden=NotProvided,
        value_hidden=NotProvided,
        epsilon_start=NotProvided,
        epsilon_end=NotProvided,
        epsilon_decay_fraction=NotProvided,
        experience_capacity=NotProvided,
        checkpoint_replay_buffer=NotProvided,
        **kwargs,
    ) -> "MRQConfig":
        """RLlib's ``training()`` (``gamma``, ``grad_clip``, ...) plus every MR.Q field (see ``__init__``)."""
        super().training(**kwargs)
        self.set_fields(locals())
        return self

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

    def qworld_errors(self) -> List[str]:
        """Every bad MR.Q field, one message each (empty when valid)."""
        errors = super().qworld_errors()
        need = self.need(errors)
        for f in ("n_step", "enc_horizon", "goals_per_step", "target_update_freq", "zs_dim", "za_dim", "zsa_dim"):
            need(is_int(getattr(self, f)) and getattr(self, f) >= 1, f, "an int >= 1")
        need(is_int(self.num_bins) and self.num_bins >= 2, "num_bins", "an int >= 2")
        for f in ("enc_lr", "value_lr"):
            need(is_num(getattr(self, f)) and getattr(self, f) > 0, f, "a number > 0")
        for f in ("enc_weight_decay", "value_weight_decay", "dynamics_weight", "reward_weight", "terminal_weight"):
            need(is_num(getattr(self, f)) and getattr(self, f) >= 0, f, "a number >= 0")
        return errors

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
