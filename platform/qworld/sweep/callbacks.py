"""Tune callbacks: hand checkpoints to the P-learning pool; W&B runs tagged by grid cell."""

from __future__ import annotations

from typing import Any, Mapping

from ray.air.integrations.wandb import WandbLoggerCallback, _clean_log
from ray.tune import Callback, CLIReporter

from qworld import metrics as K


class PLearningCallback(Callback):
    """Sends every checkpoint Tune writes to the P-learning pool, without waiting.

    The pool lives in the driver process and is not pickled with the experiment state
    (Tune pickles callbacks for ``Tuner.restore``); a resumed sweep attaches a new pool.
    """

    def __init__(self, pool=None):
        self.pool = pool
        self.latest: dict[str, tuple[int, dict]] = {}  # trial_id -> (ckpt index, {method: p_mse})

    def __getstate__(self):
        return {"latest": {}, "pool": None}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.pool is None:
            return
        env_steps = (trial.last_result or {}).get(K.TRAIN_ENV_STEPS)
        self.pool.submit(trial.trial_id, checkpoint.path, env_steps)

    def on_step_end(self, iteration, trials, **info):
        if self.pool is not None:
            for trial_id, index, scores in self.pool.poll():
                if scores and index >= self.latest.get(trial_id, (-1, {}))[0]:
                    self.latest[trial_id] = (index, scores)


class WorldModelReporter(CLIReporter):
    """Tune's progress table, followed by each trial's latest world-model score."""

    def __init__(self, plearn: PLearningCallback, **kwargs):
        super().__init__(**kwargs)
        self.plearn = plearn

    def report(self, trials, done, *sys_info):
        super().report(trials, done, *sys_info)
        if self.plearn.latest:
            lines = ["World models (latest scored checkpoint, p_mse per method):"]
            for trial in trials:
                if trial.trial_id in self.plearn.latest:
                    index, scores = self.plearn.latest[trial.trial_id]
                    text = "  ".join(f"{m}={v:.2e}" if isinstance(v, float) else f"{m}=error"
                                     for m, v in scores.items())
                    lines.append(f"  {trial.trial_id} ckpt {index}: {text}")
            print("\n".join(lines))


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


def log_worldmodel_runs(experiment_dir, sweep: str, project: str, group: str, mode: str) -> int:
    """One W&B run per trial with its world-model scores: a history point per checkpoint
    (``pinv/p_mse``, ... at step = env steps) and the full rows as a table.

    Written by the driver from the results store once every checkpoint is scored, so a
    restarted actor or a resumed sweep never logs a score twice. Returns the runs written.
    """
    import pandas as pd
    import wandb

    from qworld.sweep import store

    rows = store.read_store(experiment_dir)
    if rows.empty or mode == "disabled":
        return 0
    metric_cols = [c for c in rows.columns if c in (K.P_MSE, K.P_TV, K.P_MAX_ERR, K.Q_NMSE, K.FIT_SECONDS)
                   or c.endswith(("/" + K.PLAN_SUCCESS, "/" + K.UNSAFE_VISITS, "/" + K.PLAN_EXCESS_STEPS))]
    written = 0
    for trial_id, trial_rows in rows.groupby(K.TRIAL_ID):
        first = trial_rows.iloc[0]
        tags = [f"{c}={first[c]}" for c in (K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS, K.HEAD, K.SEED)
                if c in trial_rows and pd.notna(first[c])]
        run = wandb.init(id=f"{trial_id}-worldmodel", name=f"{trial_id}-worldmodel", project=project,
                         group=group, job_type="worldmodel", tags=tags, dir=str(experiment_dir),
                         mode=mode, reinit="create_new",
                         config={c: first[c] for c in K.GRID_COLUMNS if c in trial_rows})
        for index, ckpt_rows in trial_rows.sort_values(K.CHECKPOINT_INDEX).groupby(K.CHECKPOINT_INDEX):
            point = {K.CHECKPOINT_INDEX: int(index)}
            for _, row in ckpt_rows.iterrows():
                for col in metric_cols:
                    if pd.notna(row[col]):
                        point[f"{row[K.METHOD]}/{col}"] = float(row[col])
            steps = ckpt_rows[K.ENV_STEPS].dropna()
            point[K.ENV_STEPS] = int(steps.iloc[0]) if len(steps) else None
            run.log(point)
        run.log({"worldmodels": wandb.Table(dataframe=trial_rows.astype(str))})
        run.finish()
        written += 1
    return written
