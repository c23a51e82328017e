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
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.d3g import learner as LR
from qworld.agents.d3g.module import D3GTorchRLModule
from qworld.agents.fields import Field, Message, as_dict, as_list, is_num, need, number_above
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

ALGORITHM_NAME = "d3g"

quiet_new_api_stack_notice("D3G")

def _check_env_id(value, config) -> Message | None:
    from qworld.agents.d3g.unobserve import UNOBSERVE

    supported = sorted(UNOBSERVE)
    if value in getattr(qworld_envs, "FINITE_ENVS", {}):
        return Message(f"env_id: {value!r} is finite; d3g runs on continuous envs: {supported}")
    if value not in UNOBSERVE:
        return Message(f"env_id: {value!r} is not supported; d3g runs on continuous envs: {supported}")
    return None


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

    Every field is declared once, in ``FIELDS`` (``docs/AGENT_CONFIG.md`` lists them).
    RLlib settings that store D3G fields: ``env`` (``env_id``), ``env_config``
    (``env_kwargs``), ``num_envs_per_env_runner`` (``num_envs``),
    ``rollout_fragment_length`` (``rollout_length``); ``gamma``, ``lr`` and ``seed`` are
    RLlib's own fields.
    """

    ALGORITHM_NAME = ALGORITHM_NAME
    FIELDS = (
        # --- problem
        Field("env_id", qworld_envs.MOUNTAIN_CAR_ID, "a continuous gymnasium goal env id (one with an inverse "
              "observation in qworld.agents.d3g.unobserve)", _check_env_id, alias="env"),
        Field("env_kwargs", {}, "env kwargs (goal_type, num_goals, reward, ...)", DICT, alias="env_config",
              store=as_dict),
        # --- sampling
        Field("num_envs", 4, "gymnasium env copies per env runner", INT_1, alias="num_envs_per_env_runner"),
        Field("rollout_length", 16, "steps per env per training_step", INT_1, alias="rollout_fragment_length"),
        Field("total_env_steps", 1_000_000, "budget: the epsilon schedule refers to it", INT_1),
        # --- targets and optimisation
        Field("gamma", 0.99, "discount", DISCOUNT, rllib=True),
        Field("lr", 3e-4, "Adam lr of all four networks (D3G: 3e-4)", number_above(0), rllib=True),
        # --- replay and updates
        Field("batch_size", 256, "transitions per gradient step (D3G: 256)", INT_1),
        Field("updates_per_iteration", 16, "gradient steps per training_step (replay ratio 16 / 64)", INT_1),
        Field("learning_starts", 1_000, "env steps before the first update", INT_0),
        Field("buffer_capacity", 100_000, "rows (observations, ~ env steps) the replay buffer holds", INT_1),
        Field("tau_polyak", 0.005, "soft target update rate (D3G: 0.005)",
              need(lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]")),
        Field("policy_delay", 2, "critic steps per proposal (tau) step and target update (D3G: 2)", INT_1),
        # --- networks
        Field("hidden_sizes", [256, 256], "ReLU MLP widths of every network (D3G: 2 x 256)", WIDTHS,
              store=as_list),
        Field("delta_fraction", 0.05, "f's and tau's output scale: this fraction of the state box",
              number_above(0)),
        # --- exploration (epsilon-greedy on the commanded goal, over env steps)
        Field("epsilon_start", 1.0, "exploration rate at step 0", UNIT),
        Field("epsilon_end", 0.05, "exploration rate after the decay", UNIT),
        Field("epsilon_decay_fraction", 0.1, "fraction of total_env_steps over which epsilon decays", UNIT),
        # --- the trial's experience log (qworld.worldmodel.experience: the `supervised` method on D3G's own data)
        Field("experience_capacity", 65536, "reservoir of experienced transitions; 0: record nothing", INT_0),
        Field("seed", None, "RLlib's seed (set with .debugging(seed=...); a sweep's trial axis)", keyword=False),
        CHECKPOINT_REPLAY_BUFFER,
    )
    RLLIB_DEFAULTS = {"grad_clip": None, "num_env_runners": 0}  # no gradient clipping (D3G)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or D3G)

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

    def more_errors(self, errors: List[str]) -> List[str]:
        """The replay buffer's config (every buffer family's check); then, with every field
        fine, the inverse observation must undo the env's observe (env kwargs may change it)."""
        from qworld.agents.d3g.unobserve import UNOBSERVE, round_trip_error

        buffer_errors = super().more_errors(errors)
        if errors or buffer_errors:
            return buffer_errors
        try:
            problem = qworld_envs.make_continuous_problem(self.env_id, **self.env_kwargs)
        except Exception as e:  # reported by validate() with the env's own message
            return [f"env_kwargs={self.env_kwargs!r}: {self.env_id} cannot be built: {type(e).__name__}: {e}"]
        if not round_trip_error(problem) < 1e-4:
            return [f"env_id: {self.env_id!r} observes its state in a way d3g cannot invert; "
                    f"d3g runs on continuous envs: {sorted(UNOBSERVE)}"]
        return []

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
