"""Goal-conditioned D3G (Edwards et al., "Estimating Q(s, s') with Deep Deterministic
Dynamics Gradients", ICML 2020) on RLlib's new API stack, for qworld's continuous envs.

One ``training_step`` =

1. sample ``rollout_length`` steps from each of ``num_envs`` copies of the gymnasium goal
   env with RLlib's own ``SingleAgentEnvRunner`` (epsilon-greedy around
   ``argmax I(s, s + tau(s, g))`` on the commanded goal); the episodes keep the env's
   infos, so every transition carries the world-model states (``info["state"]``) and
   ``rewards [L]`` / ``terminals [L]`` of every goal;
2. add the episodes to the replay buffer (RLlib's ``local_replay_buffer``: an
   ``EpisodeReplayBuffer`` in preallocated arrays of world-model states,
   ``qworld.agents.replay_buffer``);
3. past ``learning_starts`` env steps: sample ``updates_per_iteration * batch_size``
   single transitions and run ``updates_per_iteration`` gradient steps on them
   (``D3GTorchLearner``: every goal of the set learns from every transition);
4. sync the weights to the env runners.

D3G runs on the continuous envs only (``qworld_envs.CONTINUOUS_ENVS`` with an inverse
observation in ``qworld.agents.d3g.unobserve``): its networks live in the world-model
state space, which a finite env's one-hot observation has no use for.

A checkpoint holds the replay buffer and the learner's gradient-step count (which steps
update the proposal), ``qworld.agents.replay_step``.

Example::

    config = D3GConfig().training(env_id="qworld/MountainCar-v0", total_env_steps=100_000)
    algo = config.build_algo()
    algo.train()
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

import qworld_envs  # noqa: F401  (registers the gymnasium envs in every process)
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.d3g import learner as LR
from qworld.agents.d3g.module import D3GTorchRLModule
from qworld.agents.replay_step import EpisodeReplayConfig, EpisodeReplayStep, is_int, is_num

ALGORITHM_NAME = "d3g"

quiet_new_api_stack_notice("D3G")

# The D3G fields of the config, in the order the JSON config lists them.
D3G_FIELDS = (
    "env_id", "env_kwargs", "num_envs", "rollout_length", "total_env_steps", "gamma", "lr",
    "batch_size", "updates_per_iteration", "learning_starts", "buffer_capacity", "tau_polyak",
    "policy_delay", "hidden_sizes", "delta_fraction", "epsilon_start", "epsilon_end",
    "epsilon_decay_fraction", "experience_capacity", "seed",
)


class D3GConfig(EpisodeReplayConfig):
    """Configuration of goal-conditioned D3G; set fields with ``training(...)``.

    Defaults are D3G's public hyperparameters (2 x 256 ReLU nets, Adam 3e-4, batch 256,
    Polyak 0.005, proposal every 2 critic steps) except, as deviations:

    - replay ratio 0.25 gradient steps per env step (D3G: 1), for this 2-core CPU: 16
      gradient steps per ``training_step`` of 4 envs x 16 steps. Set
      ``updates_per_iteration = num_envs * rollout_length`` for the paper's ratio;
    - 1 000 learning-start steps and a 100k-step buffer (sized for qworld's small envs,
      as MR.Q's here; not the paper's);
    - epsilon-greedy exploration 1 -> 0.05 over the first 10 % of the budget (D3G adds
      Gaussian noise to continuous actions; epsilon-greedy is the discrete analogue).

    RLlib settings derived from D3G fields (``env`` <- ``env_id``, ``env_config`` <-
    ``env_kwargs``, ``num_envs_per_env_runner`` <- ``num_envs``,
    ``rollout_fragment_length`` <- ``rollout_length``) are overwritten in ``validate()``;
    set the D3G fields instead. ``gamma``, ``lr`` and ``seed`` are RLlib's own fields.
    """

    ALGORITHM_NAME = ALGORITHM_NAME
    FIELDS = D3G_FIELDS
    LIST_FIELDS = ("hidden_sizes",)
    RLLIB_FIELDS = ("gamma", "lr", "seed")

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or D3G)
        # --- problem
        self.env_id: str = qworld_envs.MOUNTAIN_CAR_ID  # a continuous gymnasium goal env id
        self.env_kwargs: Dict[str, Any] = {}  # env kwargs (goal_type, num_goals, reward, ...)
        # --- sampling
        self.num_envs: int = 4  # gymnasium env copies per env runner
        self.rollout_length: int = 16  # steps per env per training_step
        self.total_env_steps: int = 1_000_000  # budget: the epsilon schedule refers to it
        # --- targets and optimisation
        self.gamma = 0.99  # discount
        self.lr = 3e-4  # Adam lr of all four networks (D3G: 3e-4)
        self.grad_clip = None  # no gradient clipping (D3G)
        # --- replay and updates
        self.batch_size: int = 256  # transitions per gradient step (D3G: 256)
        self.updates_per_iteration: int = 16  # gradient steps per training_step (replay ratio 16 / 64)
        self.learning_starts: int = 1_000  # env steps before the first update
        self.buffer_capacity: int = 100_000  # rows (observations, ~ env steps) the replay buffer holds
        self.tau_polyak: float = 0.005  # soft target update rate (D3G: 0.005)
        self.policy_delay: int = 2  # critic steps per proposal (tau) step and target update (D3G: 2)
        # --- networks
        self.hidden_sizes: List[int] = [256, 256]  # ReLU MLP widths of every network (D3G: 2 x 256)
        self.delta_fraction: float = 0.05  # f's and tau's output scale: this fraction of the state box
        # --- exploration (epsilon-greedy on the commanded goal, over env steps)
        self.epsilon_start: float = 1.0
        self.epsilon_end: float = 0.05
        self.epsilon_decay_fraction: float = 0.1  # of total_env_steps
        # --- the trial's experience log (qworld.worldmodel.experience: the `supervised` method on D3G's own data)
        self.experience_capacity: int = 65536  # reservoir of experienced transitions; 0: record nothing
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
        gamma=NotProvided,
        lr=NotProvided,
        batch_size=NotProvided,
        updates_per_iteration=NotProvided,
        learning_starts=NotProvided,
        buffer_capacity=NotProvided,
        tau_polyak=NotProvided,
        policy_delay=NotProvided,
        hidden_sizes=NotProvided,
        delta_fraction=NotProvided,
        epsilon_start=NotProvided,
        epsilon_end=NotProvided,
        epsilon_decay_fraction=NotProvided,
        experience_capacity=NotProvided,
        checkpoint_replay_buffer=NotProvided,
        **kwargs,
    ) -> "D3GConfig":
        """RLlib's ``training()`` (``gamma`` and ``lr`` are RLlib's own fields) plus every D3G field
        (see ``__init__``)."""
        super().training(gamma=gamma, lr=lr, **kwargs)
        self.set_fields(locals())
        return self

    def replay_buffer_kwargs(self) -> Dict[str, Any]:
        """A buffer row keeps the world-model state (``info["state"]``): D3G's networks live there."""
        return {"observation": "info_state"}

    def d3g_model_config(self) -> Dict[str, Any]:
        p = self.problem()
        dyn = qworld_envs.make_continuous_problem(self.env_id, **p.env_kwargs).dynamics
        return dict(
            obs_dim=p.obs_dim, goal_dim=p.goal_dim, num_goals=p.num_goals, num_actions=p.num_actions,
            goal_features=p.goal_features, env_id=self.env_id, env_kwargs=p.env_kwargs,
            state_low=list(dyn.low), state_high=list(dyn.high), periodic=list(dyn.periodic),
            hidden_sizes=list(self.hidden_sizes), delta_fraction=float(self.delta_fraction),
            epsilon_start=float(self.epsilon_start), epsilon_end=float(self.epsilon_end),
            epsilon_decay_steps=self.epsilon_decay_steps(),
        )

    def qworld_errors(self) -> List[str]:
        """Every bad D3G field, one message each (empty when valid)."""
        from qworld.agents.d3g.unobserve import UNOBSERVE, round_trip_error

        errors = super().qworld_errors()
        need = self.need(errors)
        supported = sorted(UNOBSERVE)
        if self.env_id in getattr(qworld_envs, "FINITE_ENVS", {}):
            errors.append(f"env_id: {self.env_id!r} is finite; d3g runs on continuous envs: {supported}")
        elif self.env_id not in UNOBSERVE:
            errors.append(f"env_id: {self.env_id!r} is not supported; d3g runs on continuous envs: {supported}")
        need(is_int(self.policy_delay) and self.policy_delay >= 1, "policy_delay", "an int >= 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(is_num(self.tau_polyak) and 0 < self.tau_polyak <= 1, "tau_polyak", "a number in (0, 1]")
        need(is_num(self.delta_fraction) and self.delta_fraction > 0, "delta_fraction", "a number > 0")
        if not errors:  # the inverse observation must undo the env's observe (env kwargs may change it)
            try:
                problem = qworld_envs.make_continuous_problem(self.env_id, **self.env_kwargs)
            except Exception as e:  # reported by validate() with the env's own message
                problem = None
                errors.append(f"env_kwargs={self.env_kwargs!r}: {self.env_id} cannot be built: {type(e).__name__}: {e}")
            if problem is not None and not round_trip_error(problem) < 1e-4:
                errors.append(f"env_id: {self.env_id!r} observes its state in a way d3g cannot invert; "
                              f"d3g runs on continuous envs: {supported}")
        return errors

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=D3GTorchRLModule, model_config=self.d3g_model_config())

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        return LR.D3GTorchLearner


# ---------------------------------------------------------------------- replay
def transitions_of(windows: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """One-transition windows of the buffer (rows: world-model states) -> ``{states,
    next_states [N, d], actions [N], rewards / terminals [N, L]}``: transition k's states are
    ``infos[k]["state"]`` -> ``infos[k + 1]["state"]``, its rewards / terminals of every goal
    ``infos[k + 1]["rewards"]`` / ``["terminals"]`` (the info the env returned with
    ``s_{k+1}``; CONTRACTS.md)."""
    return {
        LR.STATES: windows["obs"][:, 0],
        LR.NEXT_STATES: windows["obs"][:, 1],
        LR.ACTIONS: windows["actions"][:, 0],
        LR.REWARDS: windows["rewards"][:, 0],
        LR.TERMINALS: windows["terminals"][:, 0],
    }


class D3G(EpisodeReplayStep, QworldAlgorithmMixin, Algorithm):
    """Goal-conditioned D3G on RLlib's new API stack (see module doc)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> D3GConfig:
        return D3GConfig()

    @override(Algorithm)
    def setup(self, config) -> None:
        super().setup(config)  # builds the replay buffer (RLlib's local_replay_buffer)

    VALUE_LOSS_KEY = LR.CRITIC_LOSS_KEY
    Q_MEAN_KEY = LR.Q_MEAN_KEY

    # kept in every checkpoint beside the replay buffer (EpisodeReplayStep.get_state)
    LEARNER_COUNTERS = ("_grad_steps",)  # gradient steps: which ones update the proposal

    def replay_batch(self, num: int) -> Dict[str, Any]:
        """``num`` transitions drawn uniformly from the buffer."""
        return transitions_of(self.replay_buffer.sample(batch_size_B=num, batch_length_T=1))
