"""What every qworld learner family adds to RLlib's ``Algorithm``, written once.

``qworld_config.json`` (the resolved trial config and ``env_steps``) beside RLlib's own
checkpoint, at its root and next to the RLModule, so that ``qworld.agents.load_q`` needs
neither Ray nor the Algorithm; the trial's experience log (``experience.npz``, for the
``supervised`` method), kept across Tune restores; and the live Q-network as a ``QFunction``. A family's config
provides ``qworld_config() -> dict``; its Algorithm lists :class:`QworldAlgorithmMixin`
before ``Algorithm``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import uuid

from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

from qworld import metrics as K
from qworld.layout import CHECKPOINT_CONFIG_FILE, EXPERIENCE_FILE, MODULE_SUBDIR


class _NoNewApiStackNotice(logging.Filter):
    """Drops RLlib's "You are running <Algo> on the new API stack!" notice for our families.

    RLlib logs it (at WARNING, once per process: the driver and every trial) for any
    algorithm whose default moved to the new API stack, telling how to go back to the old
    one; our families exist only on the new stack, so it says nothing true about them.
    """

    def __init__(self, algorithm: str):
        super().__init__()
        self.prefix = f"You are running {algorithm} on the new API stack"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_new_api_stack_notice(algorithm: str) -> None:
    """Silence that notice for the Algorithm class named ``algorithm`` (e.g. ``"PQN"``)."""
    logging.getLogger("ray.rllib.algorithms.algorithm_config").addFilter(_NoNewApiStackNotice(algorithm))


class QworldAlgorithmMixin:
    """``env_steps_sampled``, ``save_to_path`` (+ ``qworld_config.json``, ``experience.npz``),
    ``restore_from_path`` (+ the experience log), ``record_experience`` and ``q_function``."""

    _experience = None  # qworld.worldmodel.experience.ExperienceLog, built on the first recorded batch

    def record_experience(self, states, actions, next_states) -> None:
        """Add true transitions to the trial's experience log (finite: state indices [..],
        continuous: states [.., d]); the config's ``experience_capacity`` sizes the reservoir."""
        from qworld.worldmodel.experience import ExperienceLog

        if self._experience is None:
            info = self.config.problem()
            capacity = int(self.config.experience_capacity)
            seed = int(self.config.seed or 0)
            if info.finite:
                self._experience = ExperienceLog(info.num_actions, num_states=info.obs_dim, capacity=capacity, seed=seed)
            else:
                self._experience = ExperienceLog(info.num_actions, state_dim=int(states.shape[-1]),
                                                 capacity=capacity, seed=seed)
        self._experience.add(states, actions, next_states)

    def env_steps_sampled(self) -> int:
        return int(self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))

    def qworld_config(self) -> dict:
        """The trial's resolved config with the env steps sampled so far."""
        cfg = self.config.qworld_config()
        cfg[K.ENV_STEPS] = self.env_steps_sampled()
        return cfg

    def save_to_path(self, path=None, *, state=None, filesystem=None, use_msgpack=False) -> str:
        """RLlib's checkpoint plus ``qworld_config.json`` at its root and next to the module,
        with a new ``checkpoint_uid`` (a uuid4 hex: this checkpoint's identity)."""
        path = super().save_to_path(path, state=state, filesystem=filesystem, use_msgpack=use_msgpack)
        # a fresh identity for every checkpoint saved: rows scored from it carry it, so a
        # checkpoint number written again (a trial rolled back by a restore) is told apart
        config = {**self.qworld_config(), K.CHECKPOINT_UID: uuid.uuid4().hex, K.WRITTEN_BY: _writer()}
        text = json.dumps(config, indent=1)
        root = pathlib.Path(path)
        for target in (root, root.joinpath(*MODULE_SUBDIR)):
            if target.is_dir():
                (target / CHECKPOINT_CONFIG_FILE).write_text(text)
        if self._experience is not None:
            self._experience.save(root)
        return path

    def restore_from_path(self, path, *args, **kwargs):
        """RLlib's restore, plus the experience log saved beside it (a restored trial goes on
        counting from there, so the log always matches ``env_steps``)."""
        super().restore_from_path(path, *args, **kwargs)
        if (pathlib.Path(path) / EXPERIENCE_FILE).is_file():
            from qworld.worldmodel.experience import load_experience

            self._experience = load_experience(path)

    def live_module(self):
        """The local learner's module, the one being trained (no copy).

        Through RLlib's public ``LearnerGroup.foreach_learner``, which calls a local learner
        in this process and hands back what the function returns (RLlib keeps the learner
        itself in a private attribute). Remote learners: ``ValueError``; use
        :meth:`q_function`, which copies their weights.
        """
        if not self.learner_group.is_local:
            raise ValueError("the learners are remote: their live module is not in this process")
        [result] = self.learner_group.foreach_learner(lambda learner: learner.module[DEFAULT_MODULE_ID].unwrapped())
        return result.get()

    def q_function(self):
        """The learner's current Q-network as a :class:`qworld.agents.QFunction`.

        With a local learner this is the live module (no copy); with remote learners, a
        CPU copy built from the learner group's weights.
        """
        from qworld.agents import q_function_of

        if self.learner_group.is_local:
            module = self.live_module()
        else:
            state = self.learner_group.get_state(
                components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/{DEFAULT_MODULE_ID}"
            )[COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]
            module = self.config.get_rl_module_spec(spaces=self.env_runner_group.get_spaces()).build()
            module.set_state(state)
        return q_function_of(module, self.qworld_config())


def _writer() -> dict:
    """Where a checkpoint was saved (as Tune's results say where a trial ran): which node of
    a cluster wrote it is what one asks after a node is lost."""
    import os
    import socket

    import ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node_id, "hostname": socket.gethostname(), "pid": os.getpid()}
