"""EnvRunner for envs with batched torch dynamics: N envs stepped as one tensor op.

No per-step Python episode objects: ``sample()`` returns one rollout of tensors
(``rollout.py``), time-major ``[T, N, ...]`` with T = ``rollout_length``. Episode
return / length / success are accumulated on the device and logged once per rollout.
Works as the local runner (``num_env_runners=0``) and as remote runners (each runner
holds ``num_envs // num_env_runners`` envs and returns CPU tensors).
"""

from __future__ import annotations

from typing import Collection, Dict, Optional, Union

import gymnasium as gym
import numpy as np
import torch

import ray
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env import INPUT_ENV_SINGLE_SPACES, INPUT_ENV_SPACES
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.framework import get_device
from ray.rllib.utils.metrics import (
    EPISODE_LEN_MEAN,
    EPISODE_RETURN_MEAN,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_EPISODES,
    NUM_EPISODES_LIFETIME,
    WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.typing import StateDict

from qworld import metrics as K
from qworld.agents.pqn import rollout as R
from qworld.agents.pqn.module import EPSILON, GOAL, Q_ALL_GOALS, RETURN_Q_ALL_GOALS
from qworld.agents.rllib_private import subcomponents, wants_component

EPISODE_SUCCESS_MEAN = K.TRAIN_EPISODE_SUCCESS.split("/", 1)[1]  # "episode_success_mean"


class BatchedEnvRunner(EnvRunner, Checkpointable):
    """Samples rollouts from a ``qworld_envs.BatchedGoalEnv`` with the PQN RLModule."""

    @override(EnvRunner)
    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self.worker_index = kwargs.get("worker_index") or 0
        # Remote runners use their own GPU share; the local runner of a run without remote
        # runners sits with the (local) learner, so a rollout never leaves its device.
        if self.worker_index:
            self.device = get_device(self.config, self.config.num_gpus_per_env_runner)
        elif self.config.num_env_runners == 0 and self.config.num_learners == 0:
            self.device = get_device(self.config, self.config.num_gpus_per_learner)
        else:
            self.device = get_device(self.config, 0)
        # This runner's seed, as RLlib's EnvRunner seeds itself: the config's, plus the runner
        # index, plus 1e6 for an evaluation runner (None: unseeded).
        seed = self.config.seed
        self.seed = None if seed is None else int(seed + self.worker_index + 1e6 * self.config.in_evaluation)
        self.num_envs = self.config.envs_per_env_runner()
        self.rollout_length = int(self.config.rollout_length)
        self.weights_seq_no = 0
        self._state: Optional[Dict[str, torch.Tensor]] = None
        self.env = None
        self.module = None
        self.make_env()
        self.make_module()

    # ---------------------------------------------------------------- construction
    @override(EnvRunner)
    def make_env(self) -> None:
        from qworld_envs import make_batched

        seed = self.seed if self.seed is not None else self.worker_index
        self.env = make_batched(
            self.config.env_id,
            self.num_envs,
            seed=seed,
            device=self.device,
            **dict(self.config.env_kwargs or {}),
        )
        self._state = None

    @override(EnvRunner)
    def make_module(self) -> None:
        spec = self.config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True)
        self.module = spec.build()
        self.module.to(self.device)
        # It only acts: in eval mode for good, RLlib's forward_exploration has no mode to switch.
        self.module.eval()

    @override(EnvRunner)
    def get_spaces(self):
        env = self.env
        obs_space = gym.spaces.Box(-np.inf, np.inf, (env.obs_dim + env.goal_dim,), np.float32)
        act_space = gym.spaces.Discrete(env.num_actions)
        return {
            INPUT_ENV_SPACES: (obs_space, act_space),
            INPUT_ENV_SINGLE_SPACES: (obs_space, act_space),
            DEFAULT_MODULE_ID: (obs_space, act_space),
        }

    @override(EnvRunner)
    def assert_healthy(self):
        assert self.env is not None and self.module is not None

    # ---------------------------------------------------------------- sampling
    def global_env_steps(self) -> int:
        """Env steps of all runners so far (exact for one runner, estimated for several)."""
        return self.num_env_steps_sampled_lifetime * max(1, self.config.num_env_runners)

    @override(EnvRunner)
    def sample(
        self,
        *,
        num_timesteps: Optional[int] = None,
        explore: bool = True,
        epsilon: Optional[float] = None,
        next_q_argmax: Optional[bool] = None,
        **kwargs,
    ) -> Dict[str, torch.Tensor]:
        """One rollout of ``rollout_length`` steps of all envs (``num_timesteps`` rounds up).

        Args:
            num_timesteps: total env steps wanted; None for ``num_envs * rollout_length``.
            explore: epsilon-greedy (True) or greedy on the commanded goal.
            epsilon: fixed exploration rate; None for the module's schedule.
            next_q_argmax: hand over the greedy actions at s_{t+1} with their Q; None: only
                when the learner's lambda chains need them (``lambda_ > 0``).

        Returns:
            A time-major rollout dict (see ``rollout.py``).
        """
        env, module = self.env, self.module
        T = self.rollout_length if num_timesteps is None else -(-int(num_timesteps) // self.num_envs)
        N, dev = self.num_envs, self.device
        if self._state is None:
            self._state = env.reset(seed=self.seed)
        if explore:
            eps = module.current_epsilon(self.global_env_steps()) if epsilon is None else float(epsilon)
        else:
            eps = 0.0
        obs_b = torch.empty((T, N, env.obs_dim), dtype=torch.float32, device=dev)
        next_obs_b = torch.empty_like(obs_b)
        actions_b = torch.empty((T, N), dtype=torch.long, device=dev)
        goal_b = torch.empty((T, N), dtype=torch.long, device=dev)
        rewards_b = torch.empty((T, N, env.num_goals), dtype=torch.float32, device=dev)
        terminals_b = torch.empty((T, N, env.num_goals), dtype=torch.bool, device=dev)
        reward_b = torch.empty((T, N), dtype=torch.float32, device=dev)
        terminated_b = torch.empty((T, N), dtype=torch.bool, device=dev)
        truncated_b = torch.empty((T, N), dtype=torch.bool, device=dev)
        # Per-step episode stats, summed once after the rollout (fewer small ops per step).
        ret_b = torch.empty((T, N), dtype=torch.float32, device=dev)
        len_b = torch.empty((T, N), dtype=torch.float32, device=dev)
        succ_b = torch.empty((T, N), dtype=torch.bool, device=dev)
        obs, goal = self._state["obs"], self._state["goal"]
        keep_q = explore and module.head == "all_goals"
        # max without indices costs a third as much; 1-step targets need no argmax.
        keep_arg = keep_q and (self.config.lambda_ > 0 if next_q_argmax is None else bool(next_q_argmax))
        q_arg_b = None
        # The true states, for the trial's experience log (qworld.worldmodel.experience): cheap copies.
        record = int(getattr(self.config, "experience_capacity", 0)) > 0
        if record:
            state_b = torch.empty((T, *env.state.shape), dtype=env.state.dtype, device=dev)
            next_state_b = torch.empty_like(state_b)
        if keep_q:
            q_max_b = torch.empty((T, N, env.num_goals), dtype=torch.float32, device=dev)
        if keep_arg:
            q_arg_b = torch.empty((T, N, env.num_goals), dtype=torch.long, device=dev)
        for t in range(T):
            batch = {Columns.OBS: obs, GOAL: goal, EPSILON: eps, RETURN_Q_ALL_GOALS: keep_q}
            out = module.forward_exploration(batch) if explore else module.forward_inference(batch)
            actions = out[Columns.ACTIONS]
            if keep_arg:
                q_max_b[t], q_arg_b[t] = out[Q_ALL_GOALS].max(-1)
            elif keep_q:
                q_max_b[t] = out[Q_ALL_GOALS].amax(-1)
            if record:
                state_b[t] = env.state
            step = env.step(actions)
            if record:
                next_state_b[t] = step["next_state"]
            obs_b[t] = obs
            goal_b[t] = goal
            actions_b[t] = actions
            next_obs_b[t] = step["next_obs"]
            rewards_b[t] = step["rewards"]
            terminals_b[t] = step["terminals"]
            reward_b[t] = step["reward"]
            terminated_b[t] = step["terminated"]
            truncated_b[t] = step["truncated"]
            ret_b[t] = step["episode_return"]  # 0 but where an episode ended
            len_b[t] = step["episode_length"]
            succ_b[t] = step["success"]
            obs, goal = step["obs"], step["goal"]
        self._state = {"obs": obs, "goal": goal}

        steps = T * N
        self.num_env_steps_sampled_lifetime += steps
        done_b = terminated_b | truncated_b
        self._log_rollout_metrics(steps, done_b.sum(), ret_b.sum(), len_b.sum(), (succ_b & done_b).sum())
        rollout = {
            R.OBS: obs_b,
            R.NEXT_OBS: next_obs_b,
            R.ACTIONS: actions_b,
            R.GOAL: goal_b,
            R.REWARDS: rewards_b,
            R.TERMINALS: terminals_b,
            R.REWARD: reward_b,
            R.TERMINATED: terminated_b,
            R.TRUNCATED: truncated_b,
        }
        if record:
            rollout[R.STATE], rollout[R.NEXT_STATE] = state_b, next_state_b
        if keep_q:
            next_max, next_arg = self._next_q(q_max_b, q_arg_b, next_obs_b, terminated_b | truncated_b)
            rollout[R.NEXT_Q_MAX] = next_max
            if next_arg is not None:
                rollout[R.NEXT_Q_ARGMAX] = next_arg
        if self.worker_index > 0 and dev.type != "cpu":
            rollout = {k: v.cpu() for k, v in rollout.items()}
        return rollout

    @torch.no_grad()
    def _next_q(self, q_max: torch.Tensor, q_arg: Optional[torch.Tensor], next_obs: torch.Tensor, done: torch.Tensor):
        """Q at s_{t+1} from the Q at s_t the rollout computed: ``[T, N, L]`` max and argmax.

        Where the episode went on, s_{t+1} is the next step's s_t; the rows that ended
        (their next s_t is a reset) and the last step are evaluated here. ``q_arg`` None:
        the max only (argmax None).
        """
        next_max = torch.empty_like(q_max)
        next_max[:-1] = q_max[1:]
        next_arg = None
        if q_arg is not None:
            next_arg = torch.empty_like(q_arg)
            next_arg[:-1] = q_arg[1:]
        fresh = done.clone()
        fresh[-1] = True
        if fresh.any():
            q = self.module.q_all_goals(next_obs[fresh])
            if next_arg is None:
                next_max[fresh] = q.amax(-1)
            else:
                next_max[fresh], next_arg[fresh] = q.max(-1)
        return next_max, next_arg

    def _log_rollout_metrics(self, steps, done_sum, ret_sum, len_sum, succ_sum) -> None:
        stats = torch.stack([done_sum.float(), ret_sum.float(), len_sum.float(), succ_sum.float()]).tolist()
        n_done, ret, length, succ = stats
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED, steps, reduce="sum")
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, steps, reduce="lifetime_sum", with_throughput=True)
        self.metrics.log_value(NUM_EPISODES, int(n_done), reduce="sum")
        self.metrics.log_value(NUM_EPISODES_LIFETIME, int(n_done), reduce="lifetime_sum")
        if n_done > 0:
            # One mean per rollout (over its finished episodes), averaged over runners.
            self.metrics.log_value(EPISODE_RETURN_MEAN, ret / n_done, window=1)
            self.metrics.log_value(EPISODE_LEN_MEAN, length / n_done, window=1)
            self.metrics.log_value(EPISODE_SUCCESS_MEAN, succ / n_done, window=1)

    @override(EnvRunner)
    def get_metrics(self):
        return self.metrics.reduce()

    # ---------------------------------------------------------------- state / checkpoints
    @override(Checkpointable)
    def get_state(
        self,
        components: Optional[Union[str, Collection[str]]] = None,
        *,
        not_components: Optional[Union[str, Collection[str]]] = None,
        **kwargs,
    ) -> StateDict:
        state = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime}
        if wants_component(self, COMPONENT_RL_MODULE, components, not_components):
            state[COMPONENT_RL_MODULE] = self.module.get_state(
                components=subcomponents(self, COMPONENT_RL_MODULE, components),
                not_components=subcomponents(self, COMPONENT_RL_MODULE, not_components),
                **kwargs,
            )
            state[WEIGHTS_SEQ_NO] = self.weights_seq_no
        return state

    @override(Checkpointable)
    def set_state(self, state: StateDict) -> None:
        if COMPONENT_RL_MODULE in state:
            seq_no = state.get(WEIGHTS_SEQ_NO, 0)
            if seq_no == 0 or self.weights_seq_no < seq_no:
                module_state = state[COMPONENT_RL_MODULE]
                if isinstance(module_state, ray.ObjectRef):
                    module_state = ray.get(module_state)
                if isinstance(module_state, dict) and DEFAULT_MODULE_ID in module_state:
                    module_state = module_state[DEFAULT_MODULE_ID]
                self.module.set_state(module_state)
            if seq_no > 0:
                self.weights_seq_no = seq_no
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]

    @override(Checkpointable)
    def get_ctor_args_and_kwargs(self):
        return ((), {"config": self.config})

    @override(Checkpointable)
    def get_checkpointable_components(self):
        return [(COMPONENT_RL_MODULE, self.module)]

    @override(EnvRunner)
    def stop(self) -> None:
        self.env = None
