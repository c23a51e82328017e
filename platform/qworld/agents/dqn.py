"""RLlib's DQN as shipped, on a qworld goal env: the ``dqn`` family.

RLlib's ``DQN`` algorithm, its ``DefaultDQNTorchRLModule`` and learner, unchanged, on the
gymnasium goal env (``qworld/FourRooms-v0``, ...) that observes
``concat(state obs, goal_features[goal])`` with one commanded goal per episode. qworld
adds only:

- :class:`GoalDQNConfig`: a small config surface (the fields below, each documented once),
  from which ``validate()`` derives RLlib's settings (env, vector envs, batch size,
  epsilon schedule, network widths);
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

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import qworld_envs  # noqa: F401  (registers the gymnasium envs wherever a config is unpickled)
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.dqn import DQN, DQNConfig
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

from qworld import metrics as K
from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.pqn.problem import jsonable, probe_problem

ALGORITHM = "dqn"


quiet_new_api_stack_notice("GoalDQN")

# The qworld fields of the config (what a sweep file's ``agent`` section may set for dqn).
DQN_FIELDS = (
    "env_id",
    "env_kwargs",
    "num_envs",
    "rollout_length",
    "total_env_steps",
    "gamma",
    "lr",
    "minibatch_size",
    "buffer_capacity",
    "learning_starts",
    "target_update_freq",
    "double_q",
    "dueling",
    "epsilon_start",
    "epsilon_end",
    "epsilon_decay_fraction",
    "hidden_sizes",
    "seed",
)


class GoalDQNConfig(DQNConfig):
    """RLlib's ``DQNConfig`` with a small qworld surface; set fields with ``training(...)``.

    Defaults are sized for a CPU. ``gamma``, ``lr``, ``double_q``, ``dueling`` and ``seed``
    are RLlib's own settings. RLlib settings derived from a qworld field on every
    ``validate()`` (set the qworld field, not these): ``env`` / ``env_config`` <- ``env_id``
    / ``env_kwargs``; ``num_envs_per_env_runner`` <- ``num_envs``;
    ``rollout_fragment_length`` <- ``rollout_length``; ``train_batch_size_per_learner`` <-
    ``minibatch_size``; ``replay_buffer_config["capacity"]`` <- ``buffer_capacity``;
    ``num_steps_sampled_before_learning_starts`` <- ``learning_starts``;
    ``target_network_update_freq`` <- ``target_update_freq``; ``epsilon`` <- the three
    epsilon fields and ``total_env_steps``; the module's ``fcnet_hiddens`` <- ``hidden_sizes``.
    Any other RLlib DQN setting can still be set through RLlib's own methods.
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or GoalDQN)
        self.algorithm: str = ALGORITHM  # the family (sweep column ``algorithm``)
        # --- problem
        self.env_id: str = qworld_envs.FOUR_ROOMS_ID  # gymnasium goal env id
        self.env_kwargs: Dict[str, Any] = {}  # env kwargs (variant, goal_type, num_goals, ...)
        # --- sampling
        self.num_envs: int = 8  # gymnasium envs per env runner (vectorised)
        self.rollout_length: int = 4  # env steps per env per sample call
        self.total_env_steps: int = 100_000  # budget: the epsilon schedule is relative to it
        # --- optimisation
        self.gamma = 0.99  # discount
        self.lr = 5e-4  # Adam learning rate
        self.minibatch_size = 64  # transitions per gradient step, drawn from the replay buffer
        self.buffer_capacity: int = 50_000  # replay buffer size (env steps)
        self.learning_starts: int = 1_000  # env steps sampled before the first update
        self.target_update_freq: int = 500  # env steps between target-network syncs
        self.double_q = True  # double-Q targets (RLlib's)
        self.dueling = False  # dueling heads (RLlib's; off: one Q head on the MLP)
        # --- exploration (epsilon-greedy, RLlib's schedule)
        self.epsilon_start: float = 1.0
        self.epsilon_end: float = 0.05
        self.epsilon_decay_fraction: float = 0.5  # of total_env_steps
        # --- network
        self.hidden_sizes: List[int] = [128, 128]  # MLP widths of the encoder (ReLU)
        # --- RLlib
        self.num_env_runners = 0
        self.min_sample_timesteps_per_iteration = 1000  # env steps per training iteration

    @override(DQNConfig)
    def training(
        self,
        *,
        env_id: Optional[str] = NotProvided,
        env_kwargs: Optional[Dict[str, Any]] = NotProvided,
        num_envs: Optional[int] = NotProvided,
        rollout_length: Optional[int] = NotProvided,
        total_env_steps: Optional[int] = NotProvided,
        gamma: Optional[float] = NotProvided,
        lr: Optional[float] = NotProvided,
        minibatch_size: Optional[int] = NotProvided,
        buffer_capacity: Optional[int] = NotProvided,
        learning_starts: Optional[int] = NotProvided,
        target_update_freq: Optional[int] = NotProvided,
        double_q: Optional[bool] = NotProvided,
        dueling: Optional[bool] = NotProvided,
        epsilon_start: Optional[float] = NotProvided,
        epsilon_end: Optional[float] = NotProvided,
        epsilon_decay_fraction: Optional[float] = NotProvided,
        hidden_sizes: Optional[List[int]] = NotProvided,
        seed: Optional[int] = NotProvided,
        **kwargs,
    ) -> "GoalDQNConfig":
        """Set qworld fields (see the class doc); other keywords go to ``DQNConfig.training``."""
        rllib = {k: v for k, v in dict(gamma=gamma, lr=lr, double_q=double_q, dueling=dueling).items()
                 if v is not NotProvided}
        super().training(**rllib, **kwargs)
        for name, value in dict(env_id=env_id, env_kwargs=env_kwargs, num_envs=num_envs,
                                rollout_length=rollout_length, total_env_steps=total_env_steps,
                                minibatch_size=minibatch_size, buffer_capacity=buffer_capacity,
                                learning_starts=learning_starts, target_update_freq=target_update_freq,
                                epsilon_start=epsilon_start, epsilon_end=epsilon_end,
                                epsilon_decay_fraction=epsilon_decay_fraction,
                                hidden_sizes=hidden_sizes, seed=seed).items():
            if value is not NotProvided:
                setattr(self, name, dict(value) if name == "env_kwargs" else value)
        return self

    # ------------------------------------------------------------------ checks
    def qworld_errors(self) -> List[str]:
        """Every bad qworld field as ``"field: value ...; allowed ..."`` (no env is built)."""
        errors = []

        def pos_int(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                errors.append(f"{name}: {v!r} must be an integer >= {lo}")

        for name in ("num_envs", "rollout_length", "total_env_steps", "minibatch_size",
                     "buffer_capacity", "target_update_freq"):
            pos_int(name)
        pos_int("learning_starts", 0)
        for name in ("gamma", "epsilon_start", "epsilon_end", "epsilon_decay_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                errors.append(f"{name}: {v!r} must be a number in [0, 1]")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or self.lr <= 0:
            errors.append(f"lr: {self.lr!r} must be a positive number")
        for name in ("double_q", "dueling"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name}: {getattr(self, name)!r} must be true or false")
        hs = self.hidden_sizes
        if not isinstance(hs, (list, tuple)) or not hs or not all(isinstance(h, int) and h > 0 for h in hs):
            errors.append(f"hidden_sizes: {hs!r} must be a non-empty list of positive integers")
        if not isinstance(self.env_kwargs, dict):
            errors.append(f"env_kwargs: {self.env_kwargs!r} must be a mapping")
        return errors

    def env_config_for_env(self) -> Dict[str, Any]:
        """``env_kwargs`` as gym.make takes them (``num_goals: None`` = the env default)."""
        return {k: v for k, v in dict(self.env_kwargs).items() if not (k == K.NUM_GOALS and v is None)}

    def problem(self):
        """Sizes and goal set of the configured problem (probed once per process)."""
        return probe_problem(self.env_id, self.env_config_for_env())

    @override(DQNConfig)
    def validate(self) -> None:
        """qworld fields checked, RLlib's shadowed settings derived from them, then RLlib's checks."""
        errors = self.qworld_errors()
        if errors:
            raise ValueError("invalid GoalDQNConfig:\n  - " + "\n  - ".join(errors))
        self.env = self.env_id
        self.env_config = self.env_config_for_env()
        self.num_envs_per_env_runner = int(self.num_envs)
        self.rollout_fragment_length = int(self.rollout_length)
        self.train_batch_size_per_learner = int(self.minibatch_size)
        self.replay_buffer_config = {**self.replay_buffer_config, "capacity": int(self.buffer_capacity)}
        self.num_steps_sampled_before_learning_starts = int(self.learning_starts)
        self.target_network_update_freq = int(self.target_update_freq)
        decay = max(1, int(self.epsilon_decay_fraction * self.total_env_steps))
        self.epsilon = [(0, float(self.epsilon_start)), (decay, float(self.epsilon_end))]
        mc = self._model_config
        mc = dict(mc) if isinstance(mc, dict) else dataclasses.asdict(mc)
        self._model_config = {**mc, "fcnet_hiddens": [int(h) for h in self.hidden_sizes]}
        super().validate()

    def qworld_config(self) -> Dict[str, Any]:
        """The resolved trial config (JSON-able): qworld fields, problem, goal set, sizes."""
        problem = self.problem()
        out: Dict[str, Any] = {"algorithm": ALGORITHM, "head": "goal_input"}
        for name in DQN_FIELDS:
            out[name] = jsonable(getattr(self, name))
        out.update(problem.trial_config())
        return out


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
