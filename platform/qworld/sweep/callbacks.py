"""Tune callbacks: hand checkpoints to the P-learning pool; W&B runs tagged by grid cell."""

from __future__ import annotations

from typing import Any, Mapping

from ray.air.integrations.wandb import WandbLoggerCallback, _clean_log
from ray.tune import Callback

from qworld import metrics as K


class PLearningCallback(Callback):
    """Sends every checkpoint Tune writes to the P-learning pool, without waiting.

    The pool lives in the driver process and is not pickled with the experiment state
    (Tune pickles callbacks for ``Tuner.restore``); a resumed sweep attaches a new pool.
    """

    def __init__(self, pool=None):
        self.pool = pool
        self.latest: dict[str, tuple[int, bool]] = {}  # trial_id -> (checkpoint index, scored)

    def __getstate__(self):
        return {"latest": {}, "pool": None}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.pool is None:
            return
        env_steps = (trial.last_result or {}).get(K.TRAIN_ENV_STEPS)
        self.pool.submit(trial.trial_id, checkpoint.path, env_steps)

    def on_step_end(self, iteration, trials, **info):
        if self.pool is not None:
            for trial_id, index, _ in self.pool.poll():
                self.latest[trial_id] = (index, True)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"env_kwargs": {"variant": "windy"}} -> {"env_kwargs/variant": "windy"}."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, prefix=f"{name}/"))
        else:
            out[name] = value
    return out


class GridWandbCallback(WandbLoggerCallback):
    """One W&B run per trial: group = sweep name, tags = the trial's grid-cell values,
    config = the trial's config with flat keys (``env_kwargs/variant``)."""

    def __init__(self, *args, grid_axes: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.grid_axes = tuple(grid_axes)

    def log_trial_start(self, trial):
        config = trial.config.copy()
        config.pop("callbacks", None)
        env_kwargs = config.get("env_kwargs") or {}
        tags = []
        for axis in self.grid_axes:
            value = env_kwargs.get(axis, config.get(axis))
            tags.append(f"{axis}={value}")
        config = _clean_log(flat_config(config))
        init_kwargs = dict(
            id=trial.trial_id, name=str(trial), resume=False, reinit=True,
            allow_val_change=True, group=self.group, project=self.project,
            config={k: v for k, v in config.items() if k not in self.excludes},
            tags=tags,
        )
        init_kwargs.update(self.kwargs)
        exclude = self._exclude_results.copy() + self.excludes + ["config"]
        self._start_logging_actor(trial, exclude, **init_kwargs)
