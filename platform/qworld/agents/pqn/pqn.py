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

import functools
import json
from typing import Any, Dict, List, Tuple

import numpy as np

import qworld_envs  # noqa: F401  (registers the gymnasium envs in every process that unpickles a config)
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
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
from qworld.agents.fields import (
    Field,
    FieldsConfig,
    Message,
    as_dict,
    as_list,
    int_at_least,
    is_int,
    is_num,
    need,
    number_above,
    one_of,
    unit_interval,
    widths,
)
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
RUNNER_CLASSES = {"fast": BatchedEnvRunner, "standard": SingleAgentEnvRunner}

# What a saved PQN config dict / state looks like: 1 before PQN used RLlib's shuffle and
# non-finite-gradient flags, 2 with a shadow of RLlib's settings (``_pqn_derived``), 3 with
# its fields declared once and RLlib's env settings as their storage (this version).
PQN_FORMAT = 3
_RLLIB_TRAIN_BATCH_SIZE = AlgorithmConfig().train_batch_size  # RLlib's default: not set by a user


def _is_schedule(x: Any) -> bool:
    """An RLlib schedule: ``[[timestep, value], ...]``."""
    return (
        isinstance(x, (list, tuple)) and len(x) > 0
        and all(isinstance(p, (list, tuple)) and len(p) == 2 and is_int(p[0]) and is_num(p[1]) and p[1] >= 0 for p in x)
    )


# ---------------------------------------------------------------------- checks across fields
def _check_env_runner(value, config):
    if value not in ENV_RUNNERS:
        return one_of(ENV_RUNNERS)(value, config)
    if value == "fast" and isinstance(config.env_id, str) and not qworld_envs.has_batched(config.env_id):
        return f"'auto' or 'standard' for {config.env_id!r}, which has no batched dynamics"
    return None


def _check_num_envs(value, config):
    if not (is_int(value) and value >= 1):
        return "an int >= 1"
    runners = config.num_env_runners if is_int(config.num_env_runners) else 0
    if runners > 0 and value % runners:
        return f"a multiple of num_env_runners={runners}"
    return None


def _check_lr(value, config):
    if _is_schedule(value):
        if config.anneal_lr:
            return Message(
                f"lr={value!r} is an RLlib lr schedule and conflicts with anneal_lr=True (which builds "
                "[[0, lr], [total_env_steps, 0]] from a number lr): set anneal_lr=False to use the schedule"
            )
        return None
    if not is_num(value) or not value > 0:
        return "a number > 0, or (with anneal_lr=False) an RLlib schedule [[env_step, lr], ...]"
    return None


def _check_minibatch_size(value, config):
    if not (is_int(value) and value >= 1):
        return "an int >= 1"
    if config.in_evaluation:  # RLlib's evaluation copy samples with its own fragment length
        return None
    envs, length = config.num_envs, config.rollout_length
    if is_int(envs) and envs >= 1 and is_int(length) and length >= 1:
        per_learner = envs * length // max(1, int(config.num_learners or 0))
        if value > per_learner:
            return f"<= num_envs * rollout_length per learner = {per_learner}"
    return None


class PQNConfig(FieldsConfig, AlgorithmConfig):
    """Configuration of goal-conditioned PQN; set fields with ``training(...)``.

    Defaults follow the paper's agent (RAdam, lr 1e-4 decayed linearly to 0, grad-norm
    clip 10, epsilon 1 -> 0.1 over half of training, LayerNorm MLP, 1-step targets,
    256 envs x 64 steps, minibatch 256, 1 epoch, gamma 0.99). Every field is declared once,
    in ``FIELDS`` (``qworld.agents.fields``; ``docs/AGENT_CONFIG.md`` lists them).

    RLlib's own settings, used as they are: ``gamma``, ``lr``, ``grad_clip``, ``num_epochs``,
    ``minibatch_size``, ``shuffle_batch_per_epoch``, ``explore``, ``seed``,
    ``torch_skip_nan_gradients``, and the ones PQN's fields are stored in: ``env``
    (``env_id``), ``env_config`` (``env_kwargs``), ``rollout_fragment_length``
    (``rollout_length``): ``.environment(env_config={"variant": "windy"})`` trains the windy
    variant, exactly as ``.training(env_kwargs=...)``. RLlib settings PQN derives:
    ``num_envs_per_env_runner`` (``num_envs``, the total over the env runners, split evenly;
    setting it sets ``num_envs``), ``train_batch_size(_per_learner)`` (one rollout),
    ``env_runner_cls`` (``env_runner``; a ``BatchedEnvRunner`` / ``SingleAgentEnvRunner`` set
    through RLlib decides ``env_runner="auto"``), the module's ``model_config`` (the network
    fields) and the lr schedule (``anneal_lr``): one set through RLlib to a value that
    disagrees with PQN's fields is refused by ``validate()``, naming both.
    """

    ALGORITHM_NAME = "pqn"
    FIELDS = (
        # --- problem
        Field("env_id", qworld_envs.FOUR_ROOMS_ID, "the problem's env id (a registered gymnasium id, e.g. "
              "\"qworld/FourRooms-v0\")",
              need(lambda v: isinstance(v, str) and bool(v), "a non-empty env id string"), alias="env"),
        Field("env_kwargs", {}, "the problem's env kwargs (variant, goal_type, num_goals, goal_seed, goal_cells, "
              "layout, max_episode_steps, ...)", need(lambda v: isinstance(v, dict), "a dict of env kwargs"),
              alias="env_config", store=as_dict),
        Field("env_runner", "auto", "\"auto\" (the fast batched runner when has_batched(env_id), else RLlib's "
              "standard runner), \"fast\" or \"standard\"", _check_env_runner),
        # --- rollout
        Field("num_envs", 256, "parallel envs in total, split evenly over the env runners", _check_num_envs),
        Field("rollout_length", 64, "steps per env per rollout; a rollout of num_envs * rollout_length env steps "
              "feeds one training_step", int_at_least(1), alias="rollout_fragment_length"),
        Field("total_env_steps", 10_000_000, "env-step budget: lr (with anneal_lr) reaches 0 and epsilon its end "
              "value (after epsilon_decay_fraction) relative to it", int_at_least(1)),
        # --- optimisation
        Field("gamma", 0.99, "discount factor in (0, 1]",
              need(lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"), rllib=True),
        Field("lambda_", 0.0, "Q(lambda) in [0, 1]; 0 = 1-step targets (the paper's setting), 0.65 = PQN's "
              "default", unit_interval()),
        Field("lr", 1e-4, "initial learning rate (> 0); or, with anneal_lr=False, an RLlib schedule "
              "[[env_step, lr], ...]", _check_lr, rllib=True),
        Field("anneal_lr", True, "decay lr linearly to 0 over total_env_steps",
              need(lambda v: isinstance(v, bool), "True or False")),
        Field("optimizer", "radam", "\"radam\" or \"adam\" (not RLlib's old-stack optimizer dict)",
              one_of(OPTIMIZERS)),
        Field("adam_eps", 1e-8, "epsilon of the optimizer (> 0)", number_above(0)),
        Field("grad_clip", 10.0, "max global gradient norm (> 0), or None for no clipping",
              need(lambda v: v is None or (is_num(v) and v > 0), "None or a number > 0"), rllib=True),
        Field("num_epochs", 1, "passes over each rollout (>= 1)", int_at_least(1), rllib=True),
        Field("minibatch_size", 256, "transitions per gradient step (>= 1, at most one rollout per learner)",
              _check_minibatch_size, rllib=True),
        # --- exploration (epsilon-greedy on the commanded goal)
        Field("epsilon_start", 1.0, "exploration rate at step 0, in [0, 1]", unit_interval()),
        Field("epsilon_end", 0.1, "exploration rate after the decay, in [0, 1]", unit_interval()),
        Field("epsilon_decay_fraction", 0.5, "fraction of total_env_steps over which epsilon decays linearly, "
              "in [0, 1]", unit_interval()),
        # --- network
        Field("hidden_sizes", [256, 256], "widths of the hidden layers (depth = its length), each Linear -> "
              "LayerNorm -> ReLU", widths("a non-empty list of ints >= 1 (layer widths)"), store=as_list),
        Field("fourier_features", 0, "F >= 0 random Fourier features sin/cos(2 pi s B) of the state fed to the "
              "MLP with the state (0: the raw state only); they let a small MLP fit the sharp edges of "
              "goal-reaching values on low-dimensional continuous states", int_at_least(0)),
        Field("fourier_scale", 1.0, "standard deviation (> 0) of B's entries, cycles per unit of the observation",
              number_above(0, "a number > 0 (cycles per unit of observation)")),
        Field("q_output", Q_OUTPUT_AUTO, "\"auto\", \"linear\" or \"sigmoid\". \"sigmoid\" squashes Q into (0, 1), "
              "right when every goal's discounted return lies in [0, 1] (indicator / sparse goals: reward 1 on "
              "arrival, terminal); \"linear\" for any other family (dense, gaussian); \"auto\" picks between them "
              "from the problem's goal family (resolved_q_output), so one sweep can cross indicator and dense "
              "goals; checkpoints record the choice", one_of(Q_OUTPUT_CHOICES)),
        Field("head", "all_goals", "\"all_goals\" (state in, Q for every goal of the goal set out, every "
              "transition trains every goal) or \"goal_input\" (state + goal features in)", one_of(HEADS)),
        # --- hindsight relabelling (goal_input head only)
        Field("her_k", 4, "hindsight relabelled copies per transition (>= 0; goal_input head only)",
              int_at_least(0)),
        Field("her_strategy", "future", "\"future\" (a goal achieved later in the episode) or \"random_goal\" "
              "(uniform over the goal set)", one_of(HER_STRATEGIES)),
        # --- what the trial records of its experience (qworld.worldmodel.experience, the `supervised` method)
        Field("experience_capacity", 65536, "what the trial records of the transitions it experienced (saved with "
              "every checkpoint for the supervised method; fast runner only): 0 records nothing; > 0 records every "
              "transition's count on finite envs and a uniform reservoir sample of this many transitions on "
              "continuous ones", int_at_least(0)),
        Field("seed", None, "RLlib's seed (set with .debugging(seed=...); a sweep's trial axis)", keyword=False),
    )
    RLLIB_DEFAULTS = {
        "grad_clip_by": "global_norm",
        "shuffle_batch_per_epoch": True,  # minibatches of shuffled rows (RLlib's flag)
        "torch_skip_nan_gradients": True,  # a step with non-finite gradients is skipped and counted
        "num_env_runners": 0,
    }

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PQN)
        self._pqn_format = PQN_FORMAT

    # ------------------------------------------------------------------ RLlib settings PQN derives
    @property
    def num_envs_per_env_runner(self) -> int:
        """RLlib's envs per env runner: ``num_envs`` split evenly over the runners."""
        envs, runners = getattr(self, "num_envs", 1), getattr(self, "num_env_runners", 0)
        if not is_int(envs) or envs < 1:
            return 1
        return max(1, int(envs) // max(1, int(runners) if is_int(runners) else 1))

    @num_envs_per_env_runner.setter
    def num_envs_per_env_runner(self, value) -> None:
        runners = getattr(self, "num_env_runners", 0)
        self.num_envs = int(value) * max(1, int(runners) if is_int(runners) else 1) if is_int(value) else value

    def _rollout_steps(self) -> int | None:
        envs, length = getattr(self, "num_envs", None), getattr(self, "rollout_length", None)
        return int(envs) * int(length) if is_int(envs) and is_int(length) and envs > 0 else None

    @property
    def train_batch_size(self):
        """One rollout: ``num_envs * rollout_length`` env steps."""
        steps = self._rollout_steps()
        return steps if steps is not None else vars(self).get("train_batch_size")

    @train_batch_size.setter
    def train_batch_size(self, value) -> None:
        vars(self)["train_batch_size"] = value  # what was asked for: validate() refuses another rollout size

    @property
    def train_batch_size_per_learner(self):
        """One rollout over the learners."""
        steps = self._rollout_steps()
        if steps is None:
            return AlgorithmConfig.train_batch_size_per_learner.fget(self)
        return max(1, steps // max(1, int(self.num_learners or 0)))

    @train_batch_size_per_learner.setter
    def train_batch_size_per_learner(self, value) -> None:
        AlgorithmConfig.train_batch_size_per_learner.fset(self, value)

    @property
    def env_runner_cls(self):
        """The runner class set through RLlib, else the one ``env_runner`` resolves to."""
        requested = vars(self).get("env_runner_cls")
        if requested is not None:
            return requested
        try:
            return RUNNER_CLASSES[self.resolved_env_runner()]
        except Exception:  # unknown env id, bad env_runner: reported by the checks
            return None

    @env_runner_cls.setter
    def env_runner_cls(self, value) -> None:
        vars(self)["env_runner_cls"] = value

    def _refuse_conflicting_rllib_settings(self) -> None:
        """ValueError naming both sides for an RLlib setting set to what PQN's fields contradict."""
        learners = max(1, int(self.num_learners or 0))
        asked = vars(self).get("train_batch_size")
        if asked not in (None, _RLLIB_TRAIN_BATCH_SIZE, self.train_batch_size):
            self._conflict("train_batch_size", asked, "num_envs, rollout_length",
                           " (a training batch is one rollout of num_envs x rollout_length env steps)")
        # RLlib's own getter: the value set through RLlib, else train_batch_size // num_learners
        asked = AlgorithmConfig.train_batch_size_per_learner.fget(self)
        if asked != self.train_batch_size_per_learner:
            self._conflict("train_batch_size_per_learner", asked, "num_envs, rollout_length",
                           f" (one rollout of num_envs x rollout_length env steps over num_learners={learners})")
        requested = vars(self).get("env_runner_cls")
        named = {cls: name for name, cls in RUNNER_CLASSES.items()}
        if requested in named and self.env_runner in RUNNER_CLASSES and named[requested] != self.env_runner:
            self._conflict("env_runner_cls", requested, "env_runner",
                           " (\"fast\": BatchedEnvRunner, \"standard\": SingleAgentEnvRunner)")

    def _conflict(self, rllib_field: str, value: Any, pqn_fields: str, how: str) -> None:
        values = ", ".join(f"{f}={getattr(self, f)!r}" for f in pqn_fields.split(", "))
        raise ValueError(f"invalid PQNConfig: RLlib's {rllib_field}={value!r} conflicts with PQN's {values}{how}; "
                         "set only one of them")

    def _check_model_config(self) -> None:
        """RLlib's ``model_config`` may not disagree with the module settings PQN derives.

        RLlib merges the user's ``model_config`` *under* the default module spec's, so a
        key PQN sets (hidden_sizes, head, ...) would silently lose; refuse it instead.
        """
        user = self.model_config
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

    # ------------------------------------------------------------------ saved configs
    def update_from_dict(self, config_dict) -> "PQNConfig":
        """RLlib's, PQN's fields winning: ``num_envs`` over the ``num_envs_per_env_runner``
        beside it (a dict saved by an older PQN holds both)."""
        if "num_envs" in config_dict:
            config_dict = {k: v for k, v in config_dict.items() if k != "num_envs_per_env_runner"}
        return super().update_from_dict(config_dict)

    def upgrade_saved(self, saved: Dict[str, Any]) -> None:
        """A config dict / state saved by an older PQN (``PQN_FORMAT``): format 2 kept the RLlib
        settings it derived in ``_pqn_derived`` (they are derived again, not taken as set by
        the user); format 1 carries RLlib's defaults for the shuffle and non-finite-gradient
        flags, but PQN always shuffled its minibatches and never zeroed non-finite gradients,
        so keep doing so (and skip them)."""
        if "_pqn_format" in saved:
            return
        vars(self).pop("num_envs_per_env_runner", None)  # a state's copy of a derived setting
        derived = vars(self).pop("_pqn_derived", None)
        derived = saved.get("_pqn_derived", derived)
        if isinstance(derived, dict):
            if "train_batch_size" in derived and vars(self).get("train_batch_size") == derived["train_batch_size"]:
                self.train_batch_size = None
            per_learner = derived.get("train_batch_size_per_learner")
            if per_learner is not None and AlgorithmConfig.train_batch_size_per_learner.fget(self) == per_learner:
                self.train_batch_size_per_learner = None
            if "env_runner_cls" in derived and vars(self).get("env_runner_cls") is derived["env_runner_cls"]:
                self.env_runner_cls = None
        elif "shuffle_batch_per_epoch" in saved and "num_envs" in saved:
            self.shuffle_batch_per_epoch = True
            self.torch_skip_nan_gradients = True
        self._pqn_format = PQN_FORMAT

    # ------------------------------------------------------------------ derived settings
    def resolved_env_runner(self) -> str:
        """"fast" or "standard" (``env_runner="auto"`` resolved: by the runner class set
        through RLlib, else with ``has_batched``)."""
        if self.env_runner == "auto":
            requested = vars(self).get("env_runner_cls")
            for name, cls in RUNNER_CLASSES.items():
                if requested is cls:
                    return name
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

    def resolved_fields(self) -> Dict[str, Any]:
        """``env_runner`` and ``q_output`` as the trial runs them ("auto" resolved)."""
        return {"env_runner": self.resolved_env_runner(), "q_output": self.resolved_q_output()}

    @override(AlgorithmConfig)
    def validate(self) -> None:
        """Raises ValueError naming every bad field with its allowed values, an RLlib setting
        PQN's fields contradict (naming both), then RLlib's checks. RLlib's evaluation copy
        of the config sets its own runner count and fragment length."""
        self.validate_fields()
        self.validate_problem()
        if not self.in_evaluation:
            self._refuse_conflicting_rllib_settings()
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
