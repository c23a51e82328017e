"""Model-free agents whose Q-values we invert.

``load_q(checkpoint)`` gives the Q-function of a trained agent of any family
(``qworld.agents.families.ALGORITHMS``: PQN, RLlib's DQN, ...) from its Algorithm
checkpoint alone: no running Algorithm, no Ray cluster (``RLModule.from_checkpoint`` on
the module sub-directory, plus the ``qworld_config.json`` written next to it).

Shapes: B batch, S states, L goals, A actions.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Dict, Optional, Union

import numpy as np

__all__ = ["QFunction", "load_q", "local_checkpoint"]

from qworld.layout import CHECKPOINT_CONFIG_FILE, MODULE_SUBDIR


class QFunction:
    """Q-values of a goal-conditioned Q-module (any family), as numpy.

    Attributes:
        config: the resolved trial config (env_id, env_kwargs with variant / goal_type /
            num_goals ..., head, gamma, hidden_sizes, goal_states, env_steps, ...).
        module: the ``PQNTorchRLModule``, or for a family whose network takes the goal in
            its observation (RLlib's DQN) a ``qworld.agents.dqn.GoalInputQ`` around the
            restored RLModule (torch, eval mode, CPU unless moved).
    """

    def __init__(self, module: Any, config: Dict[str, Any]):
        self.module = module
        self.config = dict(config)

    @property
    def num_goals(self) -> int:
        return int(self.module.num_goals)

    @property
    def num_actions(self) -> int:
        return int(self.module.num_actions)

    @property
    def goal_features(self) -> np.ndarray:
        """``[L, goal_dim]`` features of the goal set the agent was trained on."""
        return self.module.goal_features.detach().cpu().numpy()

    def q(self, obs: np.ndarray, goals: Optional[np.ndarray] = None, batch_size: int = 65536) -> np.ndarray:
        """Q-values for a batch of states.

        Args:
            obs: ``[B, obs_dim]`` state observations (without goal features).
            goals: None for every goal of the goal set; ``[B]`` int goal indices (one
                goal per state); or ``[B, goal_dim]`` float goal features (goal_input
                head only, any goal).

        Returns:
            ``[B, L, A]`` when ``goals`` is None, else ``[B, A]`` (float64).
        """
        import torch

        module = self.module
        param = next(module.parameters())
        obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=param.device)
        if obs_t.dim() != 2 or obs_t.shape[1] != module.obs_dim:
            raise ValueError(f"obs must have shape [B, obs_dim={module.obs_dim}], got {tuple(obs_t.shape)}")
        goals_t = None
        if goals is not None:
            goals_np = np.asarray(goals)
            if goals_np.shape[0] != obs_t.shape[0]:
                raise ValueError(f"goals must have B={obs_t.shape[0]} rows, got shape {goals_np.shape}")
            if np.issubdtype(goals_np.dtype, np.integer):
                goals_t = torch.as_tensor(goals_np, dtype=torch.long, device=param.device)
            else:
                goals_t = torch.as_tensor(goals_np, dtype=torch.float32, device=param.device)
        outs = []
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for i in range(0, obs_t.shape[0], batch_size):
                    s = obs_t[i : i + batch_size]
                    if goals_t is None:
                        outs.append(module.q_all_goals(s))
                    elif goals_t.dtype == torch.long:
                        outs.append(module.q_goals(s, goals_t[i : i + batch_size]))
                    else:
                        outs.append(module.q_features(s, goals_t[i : i + batch_size]))
        finally:
            module.train(was_training)
        if not outs:
            shape = (0, self.num_goals, self.num_actions) if goals is None else (0, self.num_actions)
            return np.zeros(shape)
        return torch.cat(outs).double().cpu().numpy()

    def q_table(self) -> np.ndarray:
        """``Q[L, S, A]`` over every state and every goal of a finite task.

        The task (true MDP and goal set) is rebuilt with ``qworld_envs.make_finite_problem``
        from the config; the observation of state s is ``one_hot(s)`` (the finite envs'
        observation, CONTRACTS.md).
        """
        import qworld_envs

        task = qworld_envs.make_finite_problem(self.config["env_id"], **self.config["env_kwargs"])
        S = task.mdp.num_states
        if self.module.obs_dim != S:
            raise ValueError(f"q_table needs one-hot state observations (obs_dim == S = {S}), got obs_dim {self.module.obs_dim}")
        if task.goals.num_goals != self.num_goals:
            raise ValueError(f"task has {task.goals.num_goals} goals but the module {self.num_goals}")
        q = self.q(np.eye(S, dtype=np.float32))  # [S, L, A]
        return np.ascontiguousarray(q.transpose(1, 0, 2))

    def __repr__(self) -> str:
        c = self.config
        return f"QFunction(env_id={c.get('env_id')!r}, head={c.get('head')!r}, L={self.num_goals}, A={self.num_actions})"


@contextlib.contextmanager
def local_checkpoint(checkpoint: Union[str, os.PathLike, Any]):
    """A checkpoint as a local directory for the duration of the ``with`` block.

    ``checkpoint``: a ``ray.tune.Checkpoint`` (path + filesystem), a URI (``s3://...``,
    ``gs://...``, ``file://...``) or a local path. On local disk the directory itself (nothing
    is copied); on an object store a copy in a temporary folder on this node
    (``Checkpoint.to_directory``), removed when the block ends. The copy keeps the
    checkpoint's own name (``checkpoint_000007``): its index is read from it.
    """
    from ray.tune import Checkpoint

    if not isinstance(checkpoint, Checkpoint):
        path = os.fspath(getattr(checkpoint, "path", checkpoint))
        if "://" not in path or path.startswith("file://"):
            # absolute: RLlib hands the path to pyarrow, which reads a relative one as a URI
            yield pathlib.Path(path.removeprefix("file://")).absolute()
            return
        from qworld.sweep.location import Location

        loc = Location.of(path)
        checkpoint = Checkpoint(path=loc.path, filesystem=loc.fs)
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield pathlib.Path(checkpoint.path).absolute()
        return
    tmp = tempfile.mkdtemp(prefix="qworld-ckpt-")
    try:
        yield pathlib.Path(checkpoint.to_directory(os.path.join(tmp, _basename(checkpoint.path))))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def load_q(checkpoint: Union[str, os.PathLike, Any], device: str = "cpu") -> QFunction:
    """Restore the Q-function of an Algorithm checkpoint of any family without Ray running.

    Args:
        checkpoint: the Algorithm checkpoint directory (``algo.save()`` /
            ``algo.save_to_path()`` / a Tune checkpoint or its path), or directly its
            RLModule sub-directory ``learner_group/learner/rl_module/default_policy``;
            a local path, a URI (``s3://...``) or a ``ray.tune.Checkpoint`` (an object-store
            checkpoint is copied to a temporary folder on this node, loaded, and removed).
        device: torch device for the module.

    Returns:
        A :class:`QFunction` with ``.config``, ``.q_table()`` and ``.q(obs, goals)``.

    Raises:
        FileNotFoundError: no RLModule checkpoint under ``checkpoint``.
    """
    with local_checkpoint(checkpoint) as root:
        return _load_q_dir(root, device)


def _load_q_dir(root: pathlib.Path, device: str) -> QFunction:
    from ray.rllib.core.rl_module.rl_module import RLModule

    candidates = [root.joinpath(*MODULE_SUBDIR), root]
    mod_dir = next((d for d in candidates if (d / "class_and_ctor_args.pkl").is_file()), None)
    if mod_dir is None:
        raise FileNotFoundError(f"no RLModule checkpoint under {root} (looked in {[str(c) for c in candidates]})")
    module = RLModule.from_checkpoint(mod_dir)
    module.to(device)
    module.eval()
    config: Dict[str, Any] = {}
    for d in (mod_dir, root):
        f = d / CHECKPOINT_CONFIG_FILE
        if f.is_file():
            config = json.loads(f.read_text())
            break
    if not config:  # older checkpoints: what the module itself knows
        mc = dict(module.model_config)
        config = {k: mc[k] for k in ("env_id", "env_kwargs", "head", "q_output", "hidden_sizes") if k in mc}
    return q_function_of(module, config)


def q_function_of(module: Any, config: Dict[str, Any]) -> QFunction:
    """The :class:`QFunction` of any family's RLModule and its trial config."""
    if not hasattr(module, "q_all_goals"):
        # A family whose module takes concat(state obs, goal features) (RLlib's DQN): Q for
        # every goal of the set by concatenating each goal's features (qworld_config.json).
        from qworld.agents.dqn import GoalInputQ

        param = next(module.parameters(), None)
        module = GoalInputQ(module, config).to(param.device if param is not None else "cpu")
        module.eval()
    return QFunction(module, config)
