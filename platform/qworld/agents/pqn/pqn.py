"""PQN (parallelised Q-network, no replay buffer, no target network), goal-conditioned.

One ``training_step`` = one rollout of ``num_envs x rollout_length`` env steps sampled
epsilon-greedily on the commanded goal, then ``num_epochs`` passes of minibatch updates
on Q(lambda) targets computed once from that rollout with the current network.

Two sampling paths share the same RLModule and Learner:

- ``"fast"``: :class:`BatchedEnvRunner` for envs with batched torch dynamics
  (``qworld_envs.has_batched(env_id)``): every env steps in one tensor op;
- ``"standard"``: RLlib's ``SingleAgentEnvRunner`` over the gymnasium env (any env
  that follows CONTRACTS.md); its episodes are converted to the same rollout tensors.

Example::

    config = PQNConfig().training(env_id="qworld/FourRooms-v0", num_envs=64, total_env_steps=200_000)
    algo = config.build_algo()
    result = algo.train()
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from typing_extensions import Self

import qworld_envs  # noqa: F401  (registers the gymnasium envs in every process that unpickles a config)
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.learner import DEFAULT_OPTIMIZER, LR_KEY
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.annotations import override
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
from qworld.agents.checkpoint import QworldAlgorithmMixin, quiet_new_api_stack_notice
from qworld.agents.pqn import rollout as R
from qworld.agents.pqn.fast_env_runner import EPISODE_SUCCESS_MEAN, BatchedEnvRunner
from qworld.agents.pqn.learner import NUM_SKIPPED_STEPS_KEY, Q_MEAN_KEY, TD_LOSS_KEY, PQNTorchLearner
from qworld.agents.pqn.module import HEADS, Q_OUTPUTS, PQNTorchRLModule, linear_epsilon
from qworld.agents.pqn.problem import ProblemInfo, jsonable, probe_problem


quiet_new_api_stack_notice("PQN")

OPTIMIZERS = ("radam", "adam")
# q_output choices of the config: "auto" resolves to one of the module's Q_OUTPUTS per problem.
Q_OUTPUT_AUTO = "auto"
Q_OUTPUT_CHOICES = (Q_OUTPUT_AUTO,) + tuple(Q_OUTPUTS)
HER_STRATEGIES = ("future", "random_goal")
ENV_RUNNERS = ("auto", "fast", "standard")

# The PQN fields of the config, in the order the JSON config lists them.
PQN_FIELDS = (
    "env_id",
    "env_kwargs",
    "env_runner",
    "num_envs",
    "rollout_length",
    "total_env_steps",
    "gamma",
    "lambda_",
    "lr",
    "anneal_lr",
    "optimizer",
    "adam_eps",
    "grad_clip",
    "num_epochs",
    "minibatch_size",
    "epsilon_start",
    "epsilon_end",
    "epsilon_decay_fraction",
    "hidden_sizes",
    "fourier_features",
    "fourier_scale",
    "q_output",
    "head",
    "her_k",
    "her_strategy",
    "experience_capacity",
    "seed",
)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_schedule(x: Any) -> bool:
    """An RLlib schedule: ``[[timestep, value], ...]``."""
    return (
        isinstance(x, (list, tuple)) and len(x) > 0
        and all(isinstance(p, (list, tuple)) and len(p) == 2 and _is_int(p[0]) and _is_num(p[1]) and p[1] >= 0 for p in x)
    )


_UNSET = object()


class PQNConfig(AlgorithmConfig):
    """Configuration of goal-conditioned PQN; set fields with ``training(...)``.

    Defaults follow the paper's agent (RAdam, lr 1e-4 decayed linearly to 0, grad-norm
    clip 10, epsilon 1 -> 0.1 over half of training, LayerNorm MLP, 1-step targets,
    256 envs x 64 steps, minibatch 256, 1 epoch, gamma 0.99).

    ``gamma``, ``lr``, ``grad_clip``, ``num_epochs``, ``minibatch_size``,
    ``shuffle_batch_per_epoch``, ``explore``, ``seed`` and ``torch_skip_nan_gradients`` are
    RLlib's own settings, used as they are. RLlib settings that PQN fields determine
    (``env`` <- ``env_id``, ``env_config`` <- ``env_kwargs``, ``num_envs_per_env_runner`` <-
    ``num_envs``, ``rollout_fragment_length`` <- ``rollout_length``,
    ``train_batch_size(_per_learner)`` <- one rollout, ``env_runner_cls`` <- ``env_runner``,
    ``model_config`` <- the network fields, an ``lr`` schedule <- ``anneal_lr``) have one
    source each: set through RLlib while the PQN field keeps its default, the PQN field
    follows (``.environment(env_config={"variant": "windy"})`` trains the windy variant);
    set on both sides to different values, ``validate()`` raises a ValueError naming both.
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PQN)
        # --- problem
        self.env_id: str = qworld_envs.FOUR_ROOMS_ID  # gymnasium / batched env id
        self.env_kwargs: Dict[str, Any] = {}  # env kwargs (variant, goal_type, num_goals, ...)
        self.env_runner: str = "auto"  # "auto" (fast if has_batched), "fast", "standard"
        # --- rollout
        self.num_envs: int = 256  # parallel envs in total (split over the env runners)
        self.rollout_length: int = 64  # steps per env per rollout (one training_step)
        self.total_env_steps: int = 10_000_000  # budget: lr and epsilon schedules end here
        # --- optimisation
        self.gamma = 0.99  # discount
        self.lambda_: float = 0.0  # Q(lambda): 0 = 1-step targets (paper), 0.65 = PQN default
        self.lr = 1e-4  # initial learning rate
        self.anneal_lr: bool = True  # decay lr linearly to 0 at total_env_steps
        self.optimizer: str = "radam"  # "radam" | "adam"
        self.adam_eps: float = 1e-8  # epsilon of (R)Adam
        self.grad_clip = 10.0  # max global gradient norm (None: no clipping)
        self.grad_clip_by = "global_norm"
        self.num_epochs = 1  # passes over each rollout
        self.minibatch_size = 256  # transitions per gradient step
        self.shuffle_batch_per_epoch = True  # minibatches of shuffled rows (RLlib's flag)
        # A step with non-finite gradients is skipped and counted (PQNTorchLearner).
        self.torch_skip_nan_gradients = True
        # --- exploration (epsilon-greedy on the commanded goal)
        self.epsilon_start: float = 1.0
        self.epsilon_end: float = 0.1
        self.epsilon_decay_fraction: float = 0.5  # of total_env_steps
        # --- network
        self.hidden_sizes: List[int] = [256, 256]  # MLP widths (depth = length), LayerNorm + ReLU
        self.fourier_features: int = 0  # random Fourier features of the state (0: raw state)
        self.fourier_scale: float = 1.0  # std of their frequencies, cycles per unit of obs
        self.q_output: str = Q_OUTPUT_AUTO  # "auto" | "linear" | "sigmoid"; see resolved_q_output()
        self.head: str = "all_goals"  # "all_goals" (Q[L, A] from the state) | "goal_input"
        # --- hindsight relabelling (goal_input head only)
        self.her_k: int = 4  # relabelled copies per transition (0: off)
        self.her_strategy: str = "future"  # "future" | "random_goal"
        # --- what the trial records of its experience (qworld.worldmodel.experience, the `supervised` method)
        self.experience_capacity: int = 65536  # continuous: reservoir size; 0: record nothing
        # --- RLlib
        self.num_env_runners = 0
        # The RLlib settings validate() last derived from PQN fields (or PQN fields adopted
        # from RLlib's): a value equal to its entry here was not set by the user.
        self._pqn_derived: Dict[str, Any] = {}
        self._derive("env", self.env_id)  # names Tune trials before validate()

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        env_id: Optional[str] = NotProvided,
        env_kwargs: Optional[Dict[str, Any]] = NotProvided,
        env_runner: Optional[str] = NotProvided,
        num_envs: Optional[int] = NotProvided,
        rollout_length: Optional[int] = NotProvided,
        total_env_steps: Optional[int] = NotProvided,
        gamma: Optional[float] = NotProvided,
        lambda_: Optional[float] = NotProvided,
        lr: Optional[float] = NotProvided,
        anneal_lr: Optional[bool] = NotProvided,
        optimizer: Optional[str] = NotProvided,
        adam_eps: Optional[float] = NotProvided,
        grad_clip: Optional[float] = NotProvided,
        num_epochs: Optional[int] = NotProvided,
        minibatch_size: Optional[int] = NotProvided,
        epsilon_start: Optional[float] = NotProvided,
        epsilon_end: Optional[float] = NotProvided,
        epsilon_decay_fraction: Optional[float] = NotProvided,
        hidden_sizes: Optional[Sequence[int]] = NotProvided,
        fourier_features: Optional[int] = NotProvided,
        fourier_scale: Optional[float] = NotProvided,
        q_output: Optional[str] = NotProvided,
        head: Optional[str] = NotProvided,
        her_k: Optional[int] = NotProvided,
        her_strategy: Optional[str] = NotProvided,
        experience_capacity: Optional[int] = NotProvided,
        **kwargs,
    ) -> Self:
        """Sets the PQN training configuration.

        Args:
            env_id: the problem's env id (e.g. "qworld/FourRooms-v0").
            env_kwargs: the problem's env kwargs (variant, goal_type, num_goals, goal_seed,
                goal_cells, layout, max_episode_steps, ...).
            env_runner: "auto" (the fast batched runner when ``has_batched(env_id)``,
                else RLlib's standard runner), "fast" or "standard".
            num_envs: parallel envs in total, split evenly over the env runners.
            rollout_length: steps per env per rollout; a rollout of
                ``num_envs * rollout_length`` env steps feeds one training_step.
            total_env_steps: env-step budget; lr (if ``anneal_lr``) reaches 0 and
                epsilon its end value (after ``epsilon_decay_fraction``) relative to it.
            gamma: discount factor in (0, 1].
            lambda_: Q(lambda) in [0, 1]; 0 = 1-step targets (the paper's setting),
                0.65 = PQN's default.
            lr: initial learning rate (> 0).
            anneal_lr: decay lr linearly to 0 over ``total_env_steps``.
            optimizer: "radam" or "adam".
            adam_eps: epsilon of the optimizer (> 0).
            grad_clip: max global gradient norm (> 0), or None for no clipping.
            num_epochs: passes over each rollout (>= 1).
            minibatch_size: transitions per gradient step (>= 1, at most one rollout
                per learner).
            epsilon_start: exploration rate at step 0, in [0, 1].
            epsilon_end: exploration rate after the decay, in [0, 1].
            epsilon_decay_fraction: fraction of ``total_env_steps`` over which epsilon
                decays linearly, in [0, 1].
            hidden_sizes: widths of the hidden layers (depth = its length), each
                Linear -> LayerNorm -> ReLU.
            fourier_features: F >= 0 random Fourier features ``sin/cos(2 pi s B)`` of
                the state fed to the MLP with the state (0: the raw state only); they
                let a small MLP fit the sharp edges of goal-reaching values on
                low-dimensional continuous states.
            fourier_scale: standard deviation (> 0) of B's entries, cycles per unit of
                the observation.
            q_output: "auto" (default), "linear" or "sigmoid". "sigmoid" squashes Q into
                (0, 1), right when every goal's discounted return lies in [0, 1]
                (indicator / sparse goals: reward 1 on arrival, terminal); "linear"
                for any other family (dense, gaussian). "auto" picks between them
                from the problem's goal family (:meth:`resolved_q_output`), so one sweep
                can cross indicator and dense goals; checkpoints record the choice.
            head: "all_goals" (state in, Q for every goal of the goal set out, every
                transition trains every goal) or "goal_input" (state + goal features in).
            her_k: hindsight relabelled copies per transition (>= 0; goal_input head only).
            her_strategy: "future" (a goal achieved later in the episode) or
                "random_goal" (uniform over the goal set).
            experience_capacity: what the trial records of the transitions it experienced
                (saved with every checkpoint for the ``supervised`` extraction method;
                fast runner only): 0 records nothing; > 0 records every transition's count
                on finite envs and a uniform reservoir sample of this many transitions on
                continuous ones (``qworld.worldmodel.experience.ExperienceLog``).

        Returns:
            This updated config.
        """
        if optimizer is not NotProvided:
            self.optimizer = optimizer  # handled here: RLlib's own `optimizer` is an old-stack dict
        super().training(
            gamma=gamma,
            lr=lr,
            grad_clip=grad_clip,
            num_epochs=num_epochs,
            minibatch_size=minibatch_size,
            **kwargs,
        )
        for name, value in dict(
            env_id=env_id,
            env_kwargs=env_kwargs,
            env_runner=env_runner,
            num_envs=num_envs,
            rollout_length=rollout_length,
            total_env_steps=total_env_steps,
            lambda_=lambda_,
            anneal_lr=anneal_lr,
            adam_eps=adam_eps,
            epsilon_start=epsilon_start,
            epsilon_end=epsilon_end,
            epsilon_decay_fraction=epsilon_decay_fraction,
            hidden_sizes=hidden_sizes,
            fourier_features=fourier_features,
            fourier_scale=fourier_scale,
            q_output=q_output,
            head=head,
            her_k=her_k,
            her_strategy=her_strategy,
            experience_capacity=experience_capacity,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        if hidden_sizes is not NotProvided and isinstance(hidden_sizes, (list, tuple)):
            self.hidden_sizes = list(hidden_sizes)
        if env_kwargs is not NotProvided and env_kwargs is not None:
            self.env_kwargs = dict(env_kwargs)
        if env_id is not NotProvided and (self.env is None or self.env == self._pqn_derived.get("env", _UNSET)):
            self._derive("env", env_id)  # an env the user set stays, for validate() to compare
        return self

    @classmethod
    @override(AlgorithmConfig)
    def from_state(cls, state: Dict[str, Any]):
        config = super().from_state(state)
        if isinstance(config, PQNConfig):
            config._upgrade_saved(state)
        return config

    @override(AlgorithmConfig)
    def update_from_dict(self, config_dict) -> Self:
        super().update_from_dict(config_dict)
        self._upgrade_saved(config_dict)
        return self

    def _upgrade_saved(self, saved: Dict[str, Any]) -> None:
        """A whole config saved before PQN used RLlib's flags (checkpoints, Tune experiment
        state): it carries RLlib's defaults for them, but that PQN always shuffled its
        minibatches and never zeroed non-finite gradients, so keep doing so (and skip them)."""
        if "_pqn_derived" not in saved and "shuffle_batch_per_epoch" in saved and "env_kwargs" in saved:
            self.shuffle_batch_per_epoch = True
            self.torch_skip_nan_gradients = True

    def _derive(self, field: str, value: Any) -> None:
        """Set ``field`` to a value derived from another setting, and remember it as such."""
        if getattr(self, field, None) != value:
            setattr(self, field, value)
        if self._pqn_derived.get(field, _UNSET) != value:
            # A copy: RLlib updates some settings in place (environment() deep-updates env_config).
            self._pqn_derived = {**self._pqn_derived, field: copy.deepcopy(value)}

    # ------------------------------------------------------------------ derived settings
    def resolved_env_runner(self) -> str:
        """"fast" or "standard" (``env_runner="auto"`` resolved with ``has_batched``)."""
        if self.env_runner == "auto":
            # The local runner shares the learner's device; a CPU-only batched env (MuJoCo)
            # with a GPU learner goes through the standard runner instead.
            gpu = bool(self.num_gpus_per_learner) or bool(self.num_gpus_per_env_runner)
            device = "cuda" if gpu else "cpu"
            return "fast" if qworld_envs.has_batched(self.env_id, device) else "standard"
        return self.env_runner

    def resolved_q_output(self) -> str:
        """"linear" or "sigmoid": ``q_output`` with "auto" resolved from the goal family.

        "auto" -> "sigmoid" when every goal's discounted return lies in [0, 1] (see
        :func:`returns_in_unit_interval`), else "linear". An explicit value is kept.
        """
        if self.q_output != Q_OUTPUT_AUTO:
            return self.q_output
        unit = returns_in_unit_interval(self.env_id, self.env_kwargs or {})
        return "sigmoid" if unit else "linear"

    def resolved_q_scale(self) -> float:
        """The factor on a linear head's output: the size of the goal family's returns.

        ``q_output="auto"`` resolved to "linear" (dense, gaussian goals) scales the network's
        output by ``max |r| / (1 - gamma)``, so outputs of order 1 cover the returns: Adam
        moves a bias by about ``lr`` a step, and unscaled returns of ~50 (dense FourRooms
        goals) would take ~50k steps to reach (the agent ended at q_nmse ~50 within 2M env
        steps). An explicit "linear" keeps 1.0 (the settings existing sweep files were tuned
        with); "sigmoid" ignores it.
        """
        if self.q_output != Q_OUTPUT_AUTO or self.resolved_q_output() != "linear":
            return 1.0
        kwargs_json = json.dumps(jsonable(dict(self.env_kwargs or {})), sort_keys=True)
        return _max_reward(self.env_id, kwargs_json) / (1.0 - float(self.gamma))

    def envs_per_env_runner(self) -> int:
        return int(self.num_envs) // max(1, int(self.num_env_runners))

    def minibatches_per_learner(self) -> int:
        """Gradient steps per epoch of each Learner when there are several (DDP)."""
        copies = 1 + (int(self.her_k) if self.head == "goal_input" else 0)
        rows = int(self.num_envs) * int(self.rollout_length) * copies // max(1, int(self.num_learners))
        return max(1, rows // int(self.minibatch_size))

    def lr_schedule(self) -> List[List[float]]:
        """RLlib lr schedule: ``[[0, lr], [total_env_steps, 0]]`` (constant without anneal_lr).

        ``lr`` given as RLlib's own schedule ``[[t, lr], ...]`` (with ``anneal_lr=False``)
        is used as it is.
        """
        if _is_schedule(self.lr):
            return [[int(t), float(v)] for t, v in self.lr]
        end = 0.0 if self.anneal_lr else float(self.lr)
        return [[0, float(self.lr)], [int(self.total_env_steps), end]]

    def epsilon_decay_steps(self) -> float:
        return float(self.epsilon_decay_fraction) * float(self.total_env_steps)

    def epsilon_at(self, env_steps: float) -> float:
        """Exploration rate after ``env_steps`` env steps."""
        return linear_epsilon(env_steps, self.epsilon_start, self.epsilon_end, self.epsilon_decay_steps())

    def problem(self) -> ProblemInfo:
        """Sizes and goal set of the configured problem (probed once per process)."""
        return probe_problem(self.env_id, self.env_kwargs)

    def pqn_model_config(self) -> Dict[str, Any]:
        """The module's model_config: problem sizes, goal set, network and exploration settings."""
        problem = self.problem()
        return {
            "obs_dim": problem.obs_dim,
            "goal_dim": problem.goal_dim,
            "num_goals": problem.num_goals,
            "num_actions": problem.num_actions,
            "goal_features": problem.goal_features,
            "hidden_sizes": [int(h) for h in self.hidden_sizes],
            "fourier_features": int(self.fourier_features),
            "fourier_scale": float(self.fourier_scale),
            "head": self.head,
            "q_output": self.resolved_q_output(),
            "q_scale": self.resolved_q_scale(),
            "epsilon_start": float(self.epsilon_start),
            "epsilon_end": float(self.epsilon_end),
            "epsilon_decay_steps": self.epsilon_decay_steps(),
            "env_id": self.env_id,
            "env_kwargs": problem.env_kwargs,
        }

    def qworld_config(self) -> Dict[str, Any]:
        """The resolved trial config (JSON-able): PQN fields, problem, goal set, sizes."""
        problem = self.problem()
        out = {"algorithm": "pqn"}  # the family (qworld.agents.families)
        for name in PQN_FIELDS:
            out[name] = jsonable(getattr(self, name))
        out["env_runner"] = self.resolved_env_runner()
        out["q_output"] = self.resolved_q_output()  # "auto" resolved: what the module uses
        out.update(problem.trial_config())
        return out

    def _reconcile(self, rllib_field: str, pqn_field: str, wanted: Any, adopt=None, how: str = "") -> None:
        """One RLlib setting that a PQN field determines: derive it, adopt it, or refuse it.

        Args:
            rllib_field: RLlib's name (e.g. ``env_config``).
            pqn_field: the PQN field(s) it follows, as the error names them.
            wanted: the RLlib value the PQN field(s) give.
            adopt: ``value -> None``, setting the PQN field from an RLlib value the user
                set while the PQN field(s) kept their defaults; None: RLlib's value cannot
                determine the PQN fields, so a differing one is always refused.
            how: how ``wanted`` follows from the PQN field(s), for the error.

        Raises:
            ValueError: the user set ``rllib_field`` to a value that disagrees with the
                PQN field(s), naming both.
        """
        current = getattr(self, rllib_field)
        user_set = current != getattr(_RLLIB_DEFAULTS, rllib_field) and current != self._pqn_derived.get(
            rllib_field, _UNSET
        )
        if user_set and current != wanted:
            pqn_user_set = any(
                getattr(self, f) != getattr(_PQN_DEFAULTS, f) and getattr(self, f) != self._pqn_derived.get(f, _UNSET)
                for f in pqn_field.split(", ")
            )
            if adopt is None or pqn_user_set:
                values = ", ".join(f"{f}={getattr(self, f)!r}" for f in pqn_field.split(", "))
                raise ValueError(
                    f"invalid PQNConfig: RLlib's {rllib_field}={current!r} conflicts with PQN's {values}"
                    f"{how}; set only one of them"
                )
            adopt(current)
            return
        self._derive(rllib_field, wanted)

    def _reconcile_rllib_settings(self) -> None:
        """RLlib's own settings that PQN fields shadow: one source for each.

        A PQN field left at its default follows the RLlib setting the user made (e.g.
        ``.environment(env_config=...)`` sets ``env_kwargs``); otherwise the RLlib setting
        is derived from the PQN field, and a user-set RLlib value that disagrees is an error
        naming both. Runs before the PQN checks, so adopted values are checked too.

        RLlib's evaluation copy of the config is left as RLlib makes it (it sets its own
        runner count and fragment length).
        """
        if self.in_evaluation:
            return

        def adopt(field, convert=lambda v: v):
            def set_pqn(value):
                self._derive(field, convert(value))

            return set_pqn

        if not (isinstance(self.env, str) or self.env is None):
            raise ValueError(
                f"invalid PQNConfig: RLlib's env={self.env!r} is not an env id; PQN makes its envs from "
                f"env_id={self.env_id!r} (a registered gymnasium id), so set env to that id or leave it unset"
            )
        self._reconcile("env", "env_id", self.env_id, adopt("env_id"))
        self._reconcile("env_config", "env_kwargs", dict(self.env_kwargs or {}), adopt("env_kwargs", dict))
        runners = max(1, int(self.num_env_runners)) if _is_int(self.num_env_runners) else 1
        if _is_int(self.rollout_length) and _is_int(self.rollout_fragment_length or 0):
            self._reconcile("rollout_fragment_length", "rollout_length", int(self.rollout_length), adopt("rollout_length"))
        if _is_int(self.num_envs) and _is_int(self.num_envs_per_env_runner) and self.num_envs > 0:
            self._reconcile(
                "num_envs_per_env_runner", "num_envs", max(1, int(self.num_envs) // runners),
                adopt("num_envs", lambda per_runner: int(per_runner) * runners),
                f" (num_envs is the total over num_env_runners={runners})",
            )
        if _is_int(self.num_envs) and _is_int(self.rollout_length) and self.num_envs > 0:
            total = int(self.num_envs) * int(self.rollout_length)
            learners = max(1, int(self.num_learners or 0))
            self._reconcile("train_batch_size", "num_envs, rollout_length", total, None,
                            " (a training batch is one rollout of num_envs x rollout_length env steps)")
            self._reconcile("train_batch_size_per_learner", "num_envs, rollout_length", max(1, total // learners), None,
                            f" (one rollout of num_envs x rollout_length env steps over num_learners={learners})")
        if self.env_runner in ENV_RUNNERS and isinstance(self.env_id, str) and self.env_id:
            if self.env_runner_cls in (None, BatchedEnvRunner, SingleAgentEnvRunner):  # else: a custom runner, kept
                try:
                    fast = self.resolved_env_runner() == "fast"
                except Exception:  # unknown env id: reported by the PQN checks
                    return
                self._reconcile(
                    "env_runner_cls", "env_runner", BatchedEnvRunner if fast else SingleAgentEnvRunner,
                    adopt("env_runner", lambda cls: "fast" if cls is BatchedEnvRunner else "standard"),
                    " (\"fast\": BatchedEnvRunner, \"standard\": SingleAgentEnvRunner)",
                )

    def _check_model_config(self) -> None:
        """RLlib's ``model_config`` may not disagree with the module settings PQN derives.

        RLlib merges the user's ``model_config`` *under* the default module spec's, so a
        key PQN sets (hidden_sizes, head, ...) would silently lose; refuse it instead.
        """
        user = self._model_config if isinstance(self._model_config, dict) else {}
        if not user:
            return
        ours = self.pqn_model_config()
        clash = {k: v for k, v in user.items() if k in ours and v != ours[k]}
        if clash:
            key = next(iter(clash))
            raise ValueError(
                f"invalid PQNConfig: RLlib's model_config[{key!r}]={clash[key]!r} conflicts with PQN's "
                f"{key}={ours[key]!r} (PQN builds its module from its own fields); set it with "
                f"training({key}=...) instead"
            )

    def qworld_errors(self) -> List[str]:
        """Every bad PQN field, one message each (empty when the config is valid)."""
        errors: List[str] = []

        def bad(field: str, allowed: str) -> None:
            errors.append(f"{field}={getattr(self, field)!r}: must be {allowed}")

        def check_int(field: str, lo: int) -> bool:
            ok = _is_int(getattr(self, field)) and getattr(self, field) >= lo
            if not ok:
                bad(field, f"an int >= {lo}")
            return ok

        def check_unit(field: str, lo_open: bool = False) -> None:
            v = getattr(self, field)
            if not _is_num(v) or not ((0.0 < v) if lo_open else (0.0 <= v)) or v > 1.0:
                bad(field, "a number in (0, 1]" if lo_open else "a number in [0, 1]")

        def check_choice(field: str, allowed: Sequence[str]) -> bool:
            ok = getattr(self, field) in allowed
            if not ok:
                bad(field, "one of " + ", ".join(repr(a) for a in allowed))
            return ok

        if not isinstance(self.env_id, str) or not self.env_id:
            bad("env_id", "a non-empty env id string")
        if not isinstance(self.env_kwargs, dict):
            bad("env_kwargs", "a dict of env kwargs")
        if check_choice("env_runner", ENV_RUNNERS) and self.env_runner == "fast" and isinstance(self.env_id, str):
            if not qworld_envs.has_batched(self.env_id):
                bad("env_runner", f"'auto' or 'standard' for {self.env_id!r}, which has no batched dynamics")
        envs_ok = check_int("num_envs", 1)
        runners = self.num_env_runners if _is_int(self.num_env_runners) else 0
        if envs_ok and runners > 0 and self.num_envs % runners:
            bad("num_envs", f"a multiple of num_env_runners={runners}")
        length_ok = check_int("rollout_length", 1)
        check_int("total_env_steps", 1)
        check_unit("gamma", lo_open=True)
        check_unit("lambda_")
        if _is_schedule(self.lr):
            if self.anneal_lr:
                errors.append(
                    f"lr={self.lr!r} is an RLlib lr schedule and conflicts with anneal_lr=True (which builds "
                    "[[0, lr], [total_env_steps, 0]] from a number lr): set anneal_lr=False to use the schedule"
                )
        elif not _is_num(self.lr) or not self.lr > 0:
            bad("lr", "a number > 0, or (with anneal_lr=False) an RLlib schedule [[env_step, lr], ...]")
        if not isinstance(self.anneal_lr, bool):
            bad("anneal_lr", "True or False")
        check_choice("optimizer", OPTIMIZERS)
        if not _is_num(self.adam_eps) or not self.adam_eps > 0:
            bad("adam_eps", "a number > 0")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or not self.grad_clip > 0):
            bad("grad_clip", "None or a number > 0")
        check_int("num_epochs", 1)
        check_int("experience_capacity", 0)
        if check_int("minibatch_size", 1) and envs_ok and length_ok:
            per_learner = self.num_envs * self.rollout_length // max(1, int(self.num_learners or 0))
            if self.minibatch_size > per_learner:
                bad("minibatch_size", f"<= num_envs * rollout_length per learner = {per_learner}")
        check_unit("epsilon_start")
        check_unit("epsilon_end")
        check_unit("epsilon_decay_fraction")
        hs = self.hidden_sizes
        if not isinstance(hs, (list, tuple)) or not hs or not all(_is_int(h) and h >= 1 for h in hs):
            bad("hidden_sizes", "a non-empty list of ints >= 1 (layer widths)")
        check_int("fourier_features", 0)
        if not _is_num(self.fourier_scale) or not self.fourier_scale > 0:
            bad("fourier_scale", "a number > 0 (cycles per unit of observation)")
        check_choice("q_output", Q_OUTPUT_CHOICES)
        check_choice("head", HEADS)
        check_int("her_k", 0)
        check_choice("her_strategy", HER_STRATEGIES)
        return errors

    def validate_training(self) -> None:
        """Check the PQN fields only (no env is built); ValueError naming every bad field."""
        errors = self.qworld_errors()
        if errors:
            raise ValueError("invalid PQNConfig:\n  - " + "\n  - ".join(errors))

    @override(AlgorithmConfig)
    def validate(self) -> None:
        """Raises ValueError naming every bad field with its allowed values, then RLlib's checks.

        RLlib settings that PQN fields shadow are reconciled first (see
        :meth:`_reconcile_rllib_settings`): a conflicting pair is a ValueError naming both.
        """
        self._reconcile_rllib_settings()
        self.validate_training()
        try:
            self.problem()
        except Exception as e:  # bad env id / kwargs: name the fields
            raise ValueError(
                f"invalid PQNConfig: env_id={self.env_id!r} with env_kwargs={self.env_kwargs!r} "
                f"cannot be built: {type(e).__name__}: {e}"
            ) from e
        self._reconcile_rllib_settings()  # again: the checked values, all derived settings
        self._check_model_config()
        super().validate()

    # ------------------------------------------------------------------ RLlib hooks
    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=PQNTorchRLModule, model_config=self.pqn_model_config())

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        return PQNTorchLearner


class PQN(QworldAlgorithmMixin, Algorithm):
    """Goal-conditioned PQN on RLlib's new API stack (see module doc)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> PQNConfig:
        return PQNConfig()

    @property
    def fast(self) -> bool:
        return self.config.resolved_env_runner() == "fast"

    @override(Algorithm)
    def training_step(self) -> None:
        """Sample one rollout, update the learner(s) on it, sync weights, report metrics."""
        cfg: PQNConfig = self.config
        steps_before = self.env_steps_sampled()
        # RLlib's `explore` setting holds: without it the runners act greedily.
        epsilon = cfg.epsilon_at(steps_before) if cfg.explore else 0.0
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            rollout, runner_metrics = self._sample_rollout(epsilon)
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        if R.STATE in rollout:  # the learner needs none of it
            states, actions, next_states = rollout.pop(R.STATE), rollout[R.ACTIONS], rollout.pop(R.NEXT_STATE)
            if R.MASK in rollout:  # runners of unequal length: padding is no transition
                keep = rollout[R.MASK]
                states, actions, next_states = states[keep], actions[keep], next_states[keep]
            self.record_experience(states, actions, next_states)
        env_steps = self.env_steps_sampled()

        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                batch=R.to_train_batch(rollout),
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: env_steps},
                num_epochs=cfg.num_epochs,
                minibatch_size=cfg.minibatch_size,
                shuffle_batch_per_epoch=cfg.shuffle_batch_per_epoch,
            )
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)

        # The qworld metric names (qworld.metrics), grouped by prefix as in CleanRL.
        def log(name: str, value: Any) -> None:
            if value is not None:
                self.metrics.log_value(tuple(name.split("/")), value, window=1)

        def learner_value(key: str) -> Any:
            try:
                return self.metrics.peek((LEARNER_RESULTS, DEFAULT_MODULE_ID, key))
            except KeyError:
                return None

        log(K.TRAIN_LOSS, learner_value(TD_LOSS_KEY))
        log(K.TRAIN_Q_MEAN, learner_value(Q_MEAN_KEY))
        log(K.TRAIN_EPSILON, epsilon)
        log(K.TRAIN_LR, learner_value(f"{DEFAULT_OPTIMIZER}_{LR_KEY}"))
        skipped = learner_value(NUM_SKIPPED_STEPS_KEY)
        log(K.TRAIN_NONFINITE_STEPS_SKIPPED, skipped)
        if skipped is not None:
            self.metrics.log_value(
                tuple(K.TRAIN_NONFINITE_STEPS_SKIPPED_LIFETIME.split("/")), skipped, reduce="lifetime_sum"
            )

    def _sample_rollout(self, epsilon: float) -> Tuple[Dict[str, Any], List[Any]]:
        """One rollout from every env runner (tensors), plus each runner's metrics."""
        group = self.env_runner_group
        local = group.num_remote_workers() <= 0
        if self.fast:
            results = group.foreach_env_runner(
                lambda er, eps=epsilon, explore=self.config.explore: (
                    er.sample(epsilon=eps, explore=explore),
                    er.get_metrics(),
                ),
                local_env_runner=local,
            )
            return R.concat_columns([r[0] for r in results]), [r[1] for r in results]

        problem = self.config.problem()
        obs_dim, goal_features = problem.obs_dim, np.asarray(problem.goal_features, np.float32)

        def sample_standard(er, obs_dim=obs_dim, goal_features=goal_features, explore=self.config.explore):
            episodes = er.sample(explore=explore)
            done = [e for e in episodes if e.is_done]
            success = [float(e.is_terminated) for e in done]
            rollout = R.episodes_to_rollout(episodes, obs_dim, goal_features)
            return rollout, success, er.get_metrics()

        results = group.foreach_env_runner(sample_standard, local_env_runner=local)
        success = [s for r in results for s in r[1]]
        if success:
            self.metrics.log_value((ENV_RUNNER_RESULTS, EPISODE_SUCCESS_MEAN), float(np.mean(success)), window=1)
        return R.concat_columns([r[0] for r in results]), [r[2] for r in results]

    # ------------------------------------------------------------------ checkpoints


# Defaults of RLlib's settings and of PQN's fields: a value other than these was set.
_RLLIB_DEFAULTS = AlgorithmConfig()
_PQN_DEFAULTS = PQNConfig()


@functools.lru_cache(maxsize=64)
def _unit_returns(env_id: str, kwargs_json: str) -> bool:
    env_kwargs = json.loads(kwargs_json)
    if env_id in qworld_envs.FINITE_ENVS:
        goals = qworld_envs.make_finite_problem(env_id, **env_kwargs).goals
        rewards, terminal = np.asarray(goals.rewards), np.asarray(goals.terminal, dtype=bool)
        # One reward in [0, 1] at most per episode: every rewarding arrival ends it.
        return bool(((rewards >= 0) & (rewards <= 1)).all() and terminal[rewards > 0].all())
    if env_id in qworld_envs.CONTINUOUS_ENVS:
        goals = qworld_envs.make_continuous_problem(env_id, **env_kwargs).goals
        return goals.reward == "sparse"  # 1 on arrival in the ball, terminal; gaussian: never terminal
    return False


@functools.lru_cache(maxsize=64)
def _max_reward(env_id: str, kwargs_json: str) -> float:
    """Largest |reward| of the goal family (1 for continuous envs: their rewards lie in [0, 1])."""
    env_kwargs = json.loads(kwargs_json)
    if env_id in qworld_envs.FINITE_ENVS:
        rewards = np.asarray(qworld_envs.make_finite_problem(env_id, **env_kwargs).goals.rewards)
        return max(float(np.abs(rewards).max()), 1e-12)
    return 1.0


def returns_in_unit_interval(env_id: str, env_kwargs: Dict[str, Any] | None = None) -> bool:
    """Whether every goal's discounted return lies in [0, 1] whatever the policy.

    True when rewards lie in [0, 1] and every state that pays a positive reward ends the
    episode for that goal (indicator goals of finite envs, sparse goals of continuous
    envs); False for dense and gaussian goals (returns up to ``r_max / (1 - gamma)``) and
    for envs without a qworld goal family. Cached per process.

    Raises:
        ValueError / TypeError: from the env for a bad id or bad kwargs.
    """
    kwargs_json = json.dumps(jsonable(dict(env_kwargs or {})), sort_keys=True)
    return _unit_returns(env_id, kwargs_json)
