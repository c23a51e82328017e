"""Tune callbacks: hand checkpoints to the P-learning pool, print the sweep's progress as
one line per event, W&B runs tagged by grid cell."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune import Callback, CLIReporter
from ray.tune.logger import LoggerCallback

from qworld import metrics as K


class StagingDirClaimed(Callback):
    """Tune has named this driver's staging folder once it sets callbacks up: other drivers
    of the same sweep name on this node may start (``run._own_staging_dir``)."""

    def __init__(self, name: str):
        self.name = name

    def setup(self, **info):
        from qworld.sweep.run import release_staging_dir

        release_staging_dir(self.name)


class PLearningCallback(Callback):
    """Sends every checkpoint Tune writes to the P-learning pool, without waiting.

    The pool lives in the driver process and is not pickled with the experiment state
    (Tune pickles callbacks for ``Tuner.restore``); a resumed sweep attaches a new pool.
    """

    def __init__(self, pool=None, console: "SweepConsole | None" = None):
        self.pool = pool
        self.console = console  # prints a line per scored checkpoint
        self.latest: dict[str, tuple[int, dict]] = {}  # trial_id -> (ckpt index, {method: p_mse})

    def __getstate__(self):
        return {"latest": {}, "pool": None, "console": self.console}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.pool is None:
            return
        env_steps = (trial.last_result or {}).get(K.TRAIN_ENV_STEPS)
        # the Checkpoint itself (path + filesystem): it may live on an object store
        self.pool.submit(trial.trial_id, checkpoint, env_steps)

    def on_step_end(self, iteration, trials, **info):
        if self.pool is not None:
            for trial_id, index, scores in self.pool.poll():
                if scores and index >= self.latest.get(trial_id, (-1, {}))[0]:
                    self.latest[trial_id] = (index, scores)
                if scores is not None and self.console is not None:
                    self.console.scored(trial_id, index, scores)


class SweepConsole(Callback):
    """The driver's console: a header, one line per event a person cares about (trial
    started / recovered / errored / finished, checkpoint scored), read by a person.

    Replaces Tune's progress tables and per-trial config tables (``qworld sweep`` runs
    Tune with ``verbose=0`` unless ``--verbose``). Errors are never hidden: a failed trial
    prints its error line and error file here, on top of Tune's own error log. Picklable
    (Tune stores callbacks with the experiment for ``Tuner.restore``).

    Args:
        experiment_dir: where the results store is (q_nmse of a scored checkpoint is read
            from its rows).
        grid_axes: the sweep's grid axes; a trial is labelled by its values on them.
        methods: the extraction methods, in the order the sweep file lists them (the
            first one's p_mse is printed per scored checkpoint).
        out: where lines go (``sys.stdout`` when None).
    """

    def __init__(self, experiment_dir: str | Path, grid_axes=(), methods=(), out=None):
        self.experiment_dir = str(experiment_dir)
        self.grid_axes = tuple(grid_axes)
        self.methods = tuple(methods)
        self.start = time.time()
        self.labels: dict[str, str] = {}  # trial_id -> "(windy, 4, 0)"
        self._out = out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_out"] = None  # a stream does not pickle; stdout after a restore
        return state

    # ------------------------------------------------------------------ printing
    def line(self, text: str, err: bool = False) -> None:
        elapsed = int(time.time() - self.start)
        stream = sys.stderr if err else (self._out or sys.stdout)
        print(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}", file=stream, flush=True)

    def label(self, trial_id: str) -> str:
        return f"{trial_id} {self.labels[trial_id]}" if trial_id in self.labels else trial_id

    def remember(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """Label a trial by its grid-cell values, e.g. ``(windy, 4, 0)``."""
        values = [str(v) for _, v in cell_values(config, self.grid_axes)]
        self.labels[trial_id] = f"({', '.join(values)})" if values else ""

    def _trial_label(self, trial) -> str:
        if trial.trial_id not in self.labels:
            self.remember(trial.trial_id, trial.config)
        return self.label(trial.trial_id)

    def header(self, spec, experiment_dir: str | Path) -> None:
        """What runs and where it goes, before anything starts."""
        cells = spec.cells()
        axes = ", ".join(f"{a} x{len(spec.sweep[a])}" if a in spec.sweep else a
                         for a in spec.sweep) or "one cell"
        budget = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in spec.stop.items())
        out = self._out or sys.stdout
        print(f"qworld sweep {spec.name}: {len(cells)} trials of {spec.env.id} ({axes}), "
              f"stop at {budget}", file=out)
        print(f"  extract {', '.join(spec.extract.methods)}"
              + (f"; plan {', '.join(spec.extract.task_names)}" if spec.extract.tasks else ""), file=out)
        wandb = "" if spec.wandb.mode == "disabled" else f", W&B {spec.wandb.mode} runs in wandb/"
        print(f"  results -> {experiment_dir} (worldmodels.parquet, trial dirs{wandb})", file=out,
              flush=True)

    # ------------------------------------------------------------------ Tune hooks
    def setup(self, **info):
        self.start = time.time()

    def on_trial_start(self, iteration, trials, trial, **info):
        cell = " ".join(f"{a}={v}" for a, v in cell_values(trial.config, self.grid_axes))
        self._trial_label(trial)
        self.line(f"trial {trial.trial_id} started" + (f": {cell}" if cell else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.line(f"trial {self._trial_label(trial)} finished: {result_summary(trial.last_result)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.line(f"trial {self._trial_label(trial)} failed and is retried from its last checkpoint: "
                  f"{_error_line(trial)}", err=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.line(f"trial {self._trial_label(trial)} ERRORED: {_error_line(trial)}", err=True)
        error_file = getattr(trial, "error_file", None)
        if error_file and Path(error_file).is_file():
            print(Path(error_file).read_text().rstrip(), file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ P-learning
    def scored(self, trial_id: str, index: int, scores: Mapping[str, Any]) -> None:
        """One line per scored checkpoint: q_nmse and the first method's p_mse."""
        rows = _checkpoint_rows(self.experiment_dir, trial_id, index)
        head = f"scored {self.label(trial_id)} checkpoint {index}"
        if rows is not None and not rows.empty and K.ENV_STEPS in rows and rows[K.ENV_STEPS].notna().any():
            head += f" ({int(rows[K.ENV_STEPS].dropna().iloc[0]):,} env steps)"
        parts = []
        if rows is not None and K.Q_NMSE in rows and rows[K.Q_NMSE].notna().any():
            parts.append(f"q_nmse {rows[K.Q_NMSE].dropna().iloc[0]:.3g}")
        method = next((m for m in self.methods if m in scores), next(iter(scores), None))
        if method is not None:
            value = scores[method]
            metric = K.P_MSE if rows is None or K.P_MSE in rows else K.WM_NMSE
            if isinstance(value, (int, float)) and value == value:
                parts.append(f"{metric} {method} {value:.2e}")
            else:
                error = None
                if rows is not None and K.ERROR in rows:
                    errs = rows.loc[rows[K.METHOD] == method, K.ERROR].dropna()
                    error = errs.iloc[0] if len(errs) else None
                parts.append(f"{method}: error" + (f": {error}" if error else ""))
        self.line(head + (": " + ", ".join(parts) if parts else ""))


def cell_values(config: Mapping[str, Any], grid_axes) -> list[tuple[str, Any]]:
    """(axis, value) of a trial's config on the grid axes (env/goal axes in env_kwargs)."""
    env_kwargs = config.get("env_kwargs") or {}
    return [(a, env_kwargs.get(a, config.get(a))) for a in grid_axes]


def result_summary(result: Mapping[str, Any] | None) -> str:
    """"8 iterations, 2,048 env steps, td_loss 3.1e-04, success 0.42" from a Tune result."""
    from ray.tune.utils import flatten_dict

    flat = flatten_dict(dict(result or {}), delimiter="/")
    parts = []
    if "training_iteration" in flat:
        parts.append(f"{int(flat['training_iteration'])} iterations")
    if flat.get(K.TRAIN_ENV_STEPS) is not None:
        parts.append(f"{int(flat[K.TRAIN_ENV_STEPS]):,} env steps")
    for key, name in ((K.TRAIN_LOSS, "td_loss"), (K.TRAIN_EPISODE_SUCCESS, "success")):
        value = flat.get(key)
        if isinstance(value, (int, float)) and value == value:
            parts.append(f"{name} {value:.3g}")
    if "time_total_s" in flat:
        parts.append(f"{flat['time_total_s']:.0f} s")
    return ", ".join(parts) or "no result"


def _error_line(trial) -> str:
    """The last line of a trial's error (the exception), or where to read it."""
    error_file = getattr(trial, "error_file", None)
    text = ""
    if error_file and Path(error_file).is_file():
        lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
        text = lines[-1].strip() if lines else ""
    return (text or "see the trial's error.txt") + (f" (error file: {error_file})" if error_file else "")


def _checkpoint_rows(experiment_dir: str, trial_id: str, index: int):
    """The store's rows of one (trial, checkpoint), None if unreadable or not there."""
    from qworld.sweep import store

    try:
        return store.read_rows(experiment_dir, trial_id, index)
    except (OSError, ValueError, KeyError):
        return None


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


class GridWandbCallback(LoggerCallback):
    """One W&B run per trial: group = sweep name, tags = the trial's grid-cell values,
    config = the trial's config with flat keys (``env_kwargs/variant``), history = every
    numeric training metric at step = training iteration.

    The runs live in the driver (``wandb.init(reinit="create_new")``: one process holds
    every trial's run), not in Tune's ``WandbLoggerCallback`` logging actors. Those actors
    were the cause of the ``ConnectionResetError`` tracebacks at a sweep's teardown: each
    actor's ``wandb.init`` starts a ``wandb-core`` service that only an atexit hook tears
    down (the actor calls ``wandb.finish()``, not ``wandb.teardown()``); Tune ``ray.kill``s
    the actor once its run has finished, Ray kills the worker's child processes (the
    service) as the worker exits, and the hook then writes to a dead socket. Here every run
    is finished when its trial ends and the driver's service is stopped
    (``wandb.teardown()``) at the end of the experiment, before Ray shuts down. On a small
    machine this also saves two worker processes per trial (logging actor + queue actor)
    and the driver's waits on the queue actor's start (``on_trial_result`` blocked about
    10 s per trial on 2 cores).

    A W&B failure never stops training: it is reported once on stderr and that trial's
    run is dropped.
    """

    # Result keys W&B keeps in the run config rather than the history (as Tune's callback).
    AUTO_CONFIG_KEYS = tuple(WandbLoggerCallback.AUTO_CONFIG_KEYS)
    EXCLUDE_RESULTS = ("done", "should_checkpoint", "config")

    def __init__(self, project: str, group: str | None = None, grid_axes: tuple[str, ...] = (),
                 dir: str | None = None, mode: str = "offline", excludes=(), run_id: str | None = None):
        self.project = project
        self.run_id = run_id  # the experiment's (``run.new_run_id``): W&B ids are unique per sweep
        self.group = group
        self.grid_axes = tuple(grid_axes)
        self.dir = dir
        self.mode = mode
        self.excludes = list(excludes)
        self._runs: dict[str, Any] = {}  # trial_id -> wandb Run
        self._failed = False

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_runs"] = {}  # live runs stay in this driver (Tune pickles callbacks)
        return state

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._failed:
            print(f"qworld: W&B logging failed ({what}): {type(exc).__name__}: {exc}; "
                  "training goes on", file=sys.stderr, flush=True)
        self._failed = True

    def log_trial_start(self, trial):
        if trial.trial_id in self._runs:  # a trial restarted after a failure: same run
            return
        import wandb

        from qworld.agents.rllib_private import clean_wandb_log

        config = trial.config.copy()
        config.pop("callbacks", None)
        tags = [f"{a}={v}" for a, v in cell_values(config, self.grid_axes)]
        if K.ALGORITHM not in self.grid_axes:  # the learner family, swept or not
            tags.append(f"{K.ALGORITHM}={str(config.get(K.ALGORITHM) or 'pqn').lower()}")
        config = clean_wandb_log(flat_config(config))
        try:
            self._runs[trial.trial_id] = wandb.init(
                id=wandb_run_id(trial.trial_id, self.run_id), name=str(trial), project=self.project, group=self.group,
                config={k: v for k, v in config.items() if k not in self.excludes},
                tags=tags, dir=self.dir, mode=self.mode, reinit="create_new", resume="allow",
                allow_val_change=True,
                # the trial runs elsewhere: no capture of the driver's console, no
                # sampling of the driver's system metrics
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
        except Exception as exc:  # noqa: BLE001 - logging must not stop training
            self._warn(f"init of {trial.trial_id}", exc)

    def log_trial_result(self, iteration, trial, result):
        from ray.tune.utils import flatten_dict

        from qworld.agents.rllib_private import clean_wandb_log

        if trial.trial_id not in self._runs:
            self.log_trial_start(trial)
        run = self._runs.get(trial.trial_id)
        if run is None:
            return
        log, to_config = {}, {}
        result = {k: v for k, v in result.items() if k not in self.EXCLUDE_RESULTS}
        for key, value in flatten_dict(clean_wandb_log(result), delimiter="/").items():
            top = key.split("/", 1)[0]
            if top in self.EXCLUDE_RESULTS or key in self.excludes:
                continue
            if top in self.AUTO_CONFIG_KEYS:
                to_config[key] = value
            elif _loggable(value):
                log[key] = value
        try:
            if to_config and run.config.get("trial_id") is None:
                run.config.update(to_config, allow_val_change=True)
            run.log(log, step=result.get("training_iteration"))
        except Exception as exc:  # noqa: BLE001
            self._warn(f"log of {trial.trial_id}", exc)

    def log_trial_end(self, trial, failed: bool = False):
        run = self._runs.pop(trial.trial_id, None)
        if run is not None:
            try:
                run.finish(exit_code=1 if failed else 0)
            except Exception as exc:  # noqa: BLE001
                self._warn(f"finish of {trial.trial_id}", exc)

    def on_experiment_end(self, trials, **info):
        """Finish the runs of trials that did not end (an interrupted sweep) and stop
        the driver's W&B service while Ray and the driver are still up."""
        import wandb

        for trial_id in list(self._runs):
            run = self._runs.pop(trial_id)
            try:
                run.finish(exit_code=1)
            except Exception as exc:  # noqa: BLE001
                self._warn(f"finish of {trial_id}", exc)
        wandb.teardown()


def wandb_run_id(trial_id: str, run_id: str | None, suffix: str = "") -> str:
    """A trial's W&B run id. Tune's trial ids share 5 hex digits per sweep, so alone they
    collide across a lab's sweeps (and ``resume="allow"`` would append to the other's run);
    the experiment's run id makes them unique. Experiments from before it keep their ids."""
    return "-".join(p for p in (run_id, trial_id, suffix) if p)


def _loggable(value: Any) -> bool:
    """A number W&B can put in a run's history (Tune's rule, plus W&B media objects)."""
    import numbers

    import numpy as np

    if isinstance(value, np.ndarray):
        return value.size == 1 and isinstance(value.item(), numbers.Number)
    if isinstance(value, numbers.Number):
        return True
    try:
        from wandb.sdk.data_types.base_types.wb_value import WBValue

        return isinstance(value, WBValue)
    except ImportError:
        return False


def worldmodel_history(trial_rows) -> list[dict]:
    """One W&B history point per checkpoint of a trial's rows: ``<method>/<score>`` for every
    score column the rows hold (``K.is_row_metric``), with ``checkpoint_index`` and ``env_steps``."""
    import pandas as pd

    metric_cols = [c for c in trial_rows.columns if K.is_row_metric(c)]
    points = []
    for index, ckpt_rows in trial_rows.sort_values(K.CHECKPOINT_INDEX).groupby(K.CHECKPOINT_INDEX):
        point = {K.CHECKPOINT_INDEX: int(index)}
        for _, row in ckpt_rows.iterrows():
            for col in metric_cols:
                value = pd.to_numeric(row[col], errors="coerce")
                if pd.notna(value):
                    point[f"{row[K.METHOD]}/{col}"] = float(value)
        steps = ckpt_rows[K.ENV_STEPS].dropna()
        point[K.ENV_STEPS] = int(steps.iloc[0]) if len(steps) else None
        points.append(point)
    return points


def log_worldmodel_runs(experiment_dir, sweep: str, project: str, group: str, mode: str,
                        run_id: str | None = None, dir: str | None = None) -> int:
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
    written = 0
    for trial_id, trial_rows in rows.groupby(K.TRIAL_ID):
        first = trial_rows.iloc[0]
        tags = [f"{c}={first[c]}" for c in (K.ALGORITHM, K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS, K.HEAD, K.SEED)
                if c in trial_rows and pd.notna(first[c])]
        run = wandb.init(id=wandb_run_id(trial_id, run_id, "worldmodel"), name=f"{trial_id}-worldmodel",
                         project=project, group=group, job_type="worldmodel", tags=tags,
                         dir=dir or str(experiment_dir),
                         mode=mode, reinit="create_new",
                         config={c: first[c] for c in K.GRID_COLUMNS if c in trial_rows})
        for point in worldmodel_history(trial_rows):
            run.log(point)
        run.log({"worldmodels": wandb.Table(dataframe=trial_rows.astype(str))})
        run.finish()
        written += 1
    # Flush and stop this process's W&B service now rather than in an atexit hook that
    # runs while Ray is shutting down.
    wandb.teardown()
    return written
