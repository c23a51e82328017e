"""The P-learning actors: score checkpoints as Tune writes them, off the training path.

A small pool of Ray actors owned by the sweep's driver. The Tune callback hands each new
checkpoint (a ``ray.tune.Checkpoint``: path + filesystem) to the pool and returns at once
(training never waits); the driver drains the pool at the end of the sweep. An actor
scores a checkpoint on an object store from a copy on its own node (``local_checkpoint``),
removed afterwards. The actors have no name: no other sweep on the cluster can reach them
(a named actor with ``get_if_exists`` handed one sweep's actor to another of the same name),
and they end with the driver that owns them. Actors restart when they die (``max_restarts=-1``) and Ray retries the task that was
running (``max_task_retries=-1``); since each score is written under its (trial, checkpoint)
key and an actor skips keys already in the store, every checkpoint ends scored exactly once.
Each scoring leaves an attempt record (``store.begin_attempt``), so a second scoring of a
checkpoint is visible on disk (``store.read_attempts``).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray

from qworld import metrics as K
from qworld.layout import CHECKPOINT_CONFIG_FILE
from qworld.sweep import store
from qworld.sweep.score import checkpoint_index, checkpoint_uid, score_checkpoint

def checkpoint_env_steps(checkpoint_path: str | Path, default: int | None = None) -> int | None:
    """The env steps a checkpoint holds (its ``qworld_config.json``), else ``default``."""
    try:
        steps = json.loads((Path(checkpoint_path) / CHECKPOINT_CONFIG_FILE).read_text()).get(K.ENV_STEPS)
    except (OSError, ValueError, AttributeError):
        return default
    return int(steps) if isinstance(steps, (int, float)) else default


def checkpoint_uri(checkpoint: Any) -> str:
    """A checkpoint's location as one string: its local path, or its URI on an object store."""
    fs = getattr(checkpoint, "filesystem", None)
    if fs is None:
        return str(checkpoint)
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return str(checkpoint.path)
    return f"{fs.type_name}://{str(checkpoint.path).lstrip('/')}"


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class PLearningActor:
    """Loads Q from a checkpoint, extracts P^ with every method, writes the scored rows and
    the extracted models (``store.write_world_models``)."""

    def __init__(self, experiment_dir: str, sweep: str, methods: Sequence[str] | Mapping[str, Sequence[str]],
                 tasks: Sequence[str], options: Mapping[str, Mapping[str, Any]]):
        import torch

        torch.set_num_threads(1)
        self.experiment_dir = experiment_dir
        self.sweep = sweep
        self.methods = dict(methods) if isinstance(methods, Mapping) else tuple(methods)  # or per family
        self.tasks = tuple(tasks)
        self.options = dict(options)

    def pid(self) -> int:
        return os.getpid()

    def score(self, trial_id: str, checkpoint: Any, env_steps: int | None = None,
              force: bool = False) -> tuple[str, int, dict | None]:
        """Score one checkpoint (a ``ray.tune.Checkpoint``, a URI or a local path) unless
        already scored.

        Returns (trial_id, checkpoint index, {method: p_mse} or None if it was scored before).
        """
        from qworld.agents import local_checkpoint

        uri = checkpoint_uri(checkpoint)
        index = checkpoint_index(uri)
        # rows of an earlier checkpoint of this number (a trial rolled back) are not its rows
        uid = checkpoint_uid(uri)
        if not force and store.is_scored(self.experiment_dir, trial_id, index, checkpoint_uid=uid):
            return trial_id, index, None
        attempt = store.begin_attempt(self.experiment_dir, trial_id, index, uri, force, checkpoint_uid=uid)
        models: dict = {}
        with local_checkpoint(checkpoint) as local:
            # The checkpoint says how many env steps it holds; the caller's count (Tune's last
            # result) can be another iteration's when a trial was restored or a driver resumed.
            env_steps = checkpoint_env_steps(local, default=env_steps)
            rows = score_checkpoint(local, sweep=self.sweep, trial_id=trial_id,
                                    methods=self.methods, tasks=self.tasks, options=self.options,
                                    env_steps=env_steps, world_models=models)
        for row in rows:  # where the checkpoint lives, not this node's temporary copy
            row[K.CHECKPOINT_PATH] = uri
        # Models first: the rows mark the key as scored, so a crash in between leaves the
        # key unscored and the retry replaces the model file.
        store.write_world_models(self.experiment_dir, trial_id, index, models)
        store.write_rows(self.experiment_dir, rows, attempt=attempt)
        store.end_attempt(self.experiment_dir, trial_id, index, attempt, len(rows))
        return trial_id, index, {r[K.METHOD]: r.get(K.P_MSE, r.get(K.WM_NMSE)) for r in rows}


class PLearningPool:
    """Round-robin over the sweep's actors; holds the futures of checkpoints not yet scored."""

    def __init__(self, experiment_dir: str | Path, sweep: str, methods: Sequence[str] | Mapping[str, Sequence[str]],
                 tasks: Sequence[str] = (), options: Mapping | None = None, size: int = 1):
        self.actors = [
            PLearningActor.remote(
                str(experiment_dir), sweep, dict(methods) if isinstance(methods, Mapping) else list(methods),
                list(tasks), dict(options or {}))
            for i in range(size)
        ]
        self._next = itertools.cycle(range(size))
        self.pending: dict[Any, tuple[str, str]] = {}
        self.done: list[tuple[str, int, dict | None]] = []

    def submit(self, trial_id: str, checkpoint: Any, env_steps: int | None = None,
               force: bool = False) -> None:
        """``checkpoint``: a ``ray.tune.Checkpoint`` (as Tune hands it over), a URI or a path."""
        if not hasattr(checkpoint, "filesystem"):
            checkpoint = str(checkpoint)
        actor = self.actors[next(self._next)]
        ref = actor.score.remote(trial_id, checkpoint, env_steps, force)
        self.pending[ref] = (trial_id, checkpoint_uri(checkpoint))

    def poll(self) -> list[tuple[str, int, dict | None]]:
        """Collect finished scores without waiting."""
        return self._collect(timeout=0)

    def drain(self, timeout: float | None = None) -> list[tuple[str, int, dict | None]]:
        """Wait until every submitted checkpoint is scored."""
        return self._collect(timeout=timeout)

    def _collect(self, timeout: float | None) -> list:
        if not self.pending:
            return []
        refs = list(self.pending)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out = []
        for ref in ready:
            self.pending.pop(ref)
            out.append(ray.get(ref))
        self.done.extend(out)
        return out
