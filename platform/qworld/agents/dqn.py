"""RLlib's DQN as shipped, on a qworld goal env: the ``dqn`` family.

RLlib's ``DQN`` algorithm, its ``DefaultDQNTorchRLModule`` and learner, unchanged, on the
gymnasium goal env (``qworld/FourRooms-v0``, ...) that observes
``concat(state obs, goal_features[goal])`` with one commanded goal per episode. qworld
adds only:

- :class:`GoalDQNConfig`: a small config surface (its ``FIELDS``, each declared once with
  its doc and check), stored in or derived into RLlib's settings (env, vector envs, batch
  size, epsilon schedule, network widths);
- :class:`GoalDQN`: writes ``qworld_config.json`` (the resolved trial config, with
  ``algorithm: dqn`` and ``env_steps``) into every checkpoint, as PQN does;
- :class:`GoalInputQ`: the restored module seen as a goal-set Q-function
  (``q_all_goals`` / ``q_goals`` / ``q_features``), by concatenating each goal's features
  to the state observation. ``qworld.agents.load_q`` wraps any module without
  ``q_all_goals`` in it.

Example::

    config = GoalDQNConfig().training(env_id="qworld/FourRooms-v0", env_kwargs={"num_goals": 8})
    algo = config.build_algo()
    algo.train()
    algo.save_to_path("/tmp/ckpt")   # load_q("/tmp/ckpt") works without Ray
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

import qworld_envs  # noqa: F401  (registers the gymnasium envs wherever a config is unpickled)
from ray.rllib.algorithms.dqn import DQN, DQNConfig
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

from qworld import metrics as K
from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.fields import Field, FieldsConfig, as_dict, as_list, is_int, is_num, need, widths
from qworld.agents.pqn.problem import probe_problem

ALGORITHM = "dqn"


quiet_new_api_stack_notice("GoalDQN")

def _dqn_int(lo: int):
    return need(lambda v: is_int(v) and v >= lo, f"an integer >= {lo}")


_DQN_UNIT = need(lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
_DQN_BOOL = need(lambda v: isinstance(v, bool), "true or false")


class GoalDQNConfig(FieldsConfig, DQNConfig):
    """RLlib's ``DQNConfig`` with a small qworld surface; set fields with ``training(...)``.

    Defaults are sized for a CPU; every field is declared once, in ``FIELDS``
    (``docs/AGENT_CONFIG.md`` lists them). ``gamma``, ``lr``, ``double_q``, ``dueling`` and
    ``seed`` are RLlib's own settings, and some fields are stored in the RLlib setting they
    are: ``env_id`` (``env``), ``num_envs`` (``num_envs_per_env_runner``), ``rollout_length``
    (``rollout_fragment_length``), ``learning_starts``
    (``num_steps_sampled_before_learning_starts``), ``target_update_freq``
    (``target_network_update_freq``). RLlib settings derived from qworld fields on every
    ``validate()`` (set the qworld field, not these): ``env_config`` <- ``env_kwargs``;
    ``train_batch_size_per_learner`` <- ``minibatch_size``; ``replay_buffer_config["capacity"]``
    <- ``buffer_capacity``; ``epsilon`` <- the three epsilon fields and ``total_env_steps``;
    the module's ``fcnet_hiddens`` <- ``hidden_sizes``. Any other RLlib DQN setting can still
    be set through RLlib's own methods.
    """

    ALGORITHM_NAME = ALGORITHM
    CONFIG_HEAD = {"head": "goal_input"}
    ERROR_FORMAT = "{name}: {value!r} must be {allowed}"
    FIELDS = (
        # --- problem
        Field("env_id", qworld_envs.FOUR_ROOMS_ID, "gymnasium goal env id", alias="env"),
        Field("env_kwargs", {}, "env kwargs (variant, goal_type, num_goals, ...)",
              need(lambda v: isinstance(v, dict), "a mapping"), store=as_dict),
        # --- sampling
        Field("num_envs", 8, "gymnasium envs per env runner (vectorised)", _dqn_int(1),
              alias="num_envs_per_env_runner"),
        Field("rollout_length", 4, "env steps per env per sample call", _dqn_int(1),
              alias="rollout_fragment_length"),
        Field("total_env_steps", 100_000, "budget: the epsilon schedule is relative to it", _dqn_int(1)),
        # --- optimisation
        Field("gamma", 0.99, "discount", _DQN_UNIT, rllib=True),
        Field("lr", 5e-4, "Adam learning rate", need(lambda v: is_num(v) and v > 0, "a positive number"),
              rllib=True),
        Field("minibatch_size", 64, "transitions per gradient step, drawn from the replay buffer", _dqn_int(1)),
        Field("buffer_capacity", 50_000, "replay buffer size (env steps)", _dqn_int(1)),
        Field("learning_starts", 1_000, "env steps sampled before the first update", _dqn_int(0),
              alias="num_steps_sampled_before_learning_starts"),
        Field("target_update_freq", 500, "env steps between target-network syncs", _dqn_int(1),
              alias="target_network_update_freq"),
        Field("double_q", True, "double-Q targets (RLlib's)", _DQN_BOOL, rllib=True),
        Field("dueling", False, "dueling heads (RLlib's; off: one Q head on the MLP)", _DQN_BOOL, rllib=True),
        # --- exploration (epsilon-greedy, RLlib's schedule)
        Field("epsilon_start", 1.0, "exploration rate at step 0", _DQN_UNIT),
        Field("epsilon_end", 0.05, "exploration rate after the decay", _DQN_UNIT),
        Field("epsilon_decay_fraction", 0.5, "fraction of total_env_steps over which epsilon decays", _DQN_UNIT),
        # --- network
        Field("hidden_sizes", [128, 128], "MLP widths of the encoder (ReLU)",
              widths("a non-empty list of positive integers"), store=as_list),
        Field("seed", None, "RLlib's seed"),
    )
    RLLIB_DEFAULTS = {
        "num_env_runners": 0,
        "min_sample_timesteps_per_iteration": 1000,  # env steps per training iteration
    }

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or GoalDQN)

    def env_config_for_env(self) -> Dict[str, Any]:
        """``env_kwargs`` as gym.make takes them (``num_goals: None`` = the env default)."""
        return {k: v for k, v in dict(self.env_kwargs).items() if not (k == K.NUM_GOALS and v is None)}

    def problem(self):
        """Sizes and goal set of the configured problem (probed once per process)."""
        return probe_problem(self.env_id, self.env_config_for_env())

    @override(DQNConfig)
    def validate(self) -> None:
        """qworld fields checked, RLlib's settings derived from them, then RLlib's checks."""
        self.validate_fields()
        self.env_config = self.env_config_for_env()
        self.train_batch_size_per_learner = int(self.minibatch_size)
        self.replay_buffer_config = {**self.replay_buffer_config, "capacity": int(self.buffer_capacity)}
        decay = max(1, int(self.epsilon_decay_fraction * self.total_env_steps))
        self.epsilon = [(0, float(self.epsilon_start)), (decay, float(self.epsilon_end))]
        super().validate()

    @override(DQNConfig)
    def get_default_rl_module_spec(self):
        """RLlib's DQN module, its encoder ``fcnet_hiddens`` <- ``hidden_sizes``."""
        spec = super().get_default_rl_module_spec()
        spec.model_config = {**spec.model_config, "fcnet_hiddens": [int(h) for h in self.hidden_sizes]}
        return spec


class GoalDQN(QworldAlgorithmMixin, DQN):
    """RLlib's DQN, plus ``qworld_config.json`` in every checkpoint."""

    @classmethod
    @override(DQN)
    def get_default_config(cls) -> GoalDQNConfig:
        return GoalDQNConfig()


class GoalInputQ(nn.Module):
    """A Q-network on ``concat(state obs, goal features)`` seen as Q for every goal of a set.

    Wraps any RLModule with ``compute_q_values({obs: [B, obs_dim + goal_dim]}) -> {qf_preds:
    [B, A]}`` (RLlib's DQN module). Attributes as ``PQNTorchRLModule``: ``num_goals``,
    ``num_actions``, ``obs_dim``, ``goal_dim``, ``goal_features`` (``[L, goal_dim]`` buffer).
    """

    def __init__(self, module: nn.Module, config: Dict[str, Any]):
        super().__init__()
        self.inner = module
        feats = torch.as_tensor(config["goal_features"], dtype=torch.float32)
        self.register_buffer("goal_features", feats.reshape(len(feats), -1))
        self.num_goals = int(self.goal_features.shape[0])
        self.goal_dim = int(self.goal_features.shape[1])
        self.obs_dim = int(config["obs_dim"])
        self.num_actions = int(config["num_actions"])

    def q_features(self, state: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim]`` states, ``[B, goal_dim]`` goal features -> ``[B, A]``."""
        obs = torch.cat([state, goal_features.to(state.dtype)], dim=-1)
        return self.inner.compute_q_values({Columns.OBS: obs})["qf_preds"]

    def q_goals(self, state: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim]`` states, ``[B]`` goal indices -> ``[B, A]``."""
        return self.q_features(state, self.goal_features[goal.long()])

    def q_all_goals(self, state: torch.Tensor) -> torch.Tensor:
        """``[B, obs_dim]`` states -> ``[B, L, A]``: every goal of the set."""
        B, L = state.shape[0], self.num_goals
        s = state.unsqueeze(1).expand(B, L, state.shape[-1]).reshape(B * L, -1)
        f = self.goal_features.to(state.dtype).unsqueeze(0).expand(B, L, self.goal_dim).reshape(B * L, -1)
        return self.q_features(s, f).reshape(B, L, -1)
