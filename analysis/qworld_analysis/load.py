"""Experiment dir -> pandas DataFrames, read from its location alone.

An experiment (written by ``qworld sweep``) is a local folder or a URI (``s3://bucket/results/x``,
read through ``qworld.sweep.location``, i.e. ``pyarrow.fs``); it holds::

    EXPERIMENT_DIR/
      sweep.yaml                 the validated sweep file
      worldmodels.parquet/       the results store: one row per (trial, checkpoint, method)
      PQN_*/params.json          a trial's resolved config (env_id, env_kwargs, head, seed, ...)
      PQN_*/result.json          one JSON line per training iteration (nested metric dicts;
                                 ``checkpoint_dir_name`` on the lines that saved a checkpoint)
      PQN_*/checkpoint_000007/   checkpoints (only counted here, never opened)
      worldmodels_p/             the extracted P_hat per (trial, checkpoint): one .npz
                                 holding method -> [S, A, S] (:func:`load_world_model`)

Nothing here imports Ray, torch or the agents: the files are JSON, YAML and parquet. Every
file may be missing or half written (a sweep still running, killed, or resumed): what is
there is read, what is not is left out.

Column names are the constants of :mod:`qworld.metrics`. Training metrics are flattened
with ``/`` (``{"learner": {"td_loss": x}}`` -> ``learner/td_loss`` = ``K.TRAIN_LOSS``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from qworld import metrics as K
from qworld.layout import (CHECKPOINT_CONFIG_FILE, SCORING_ATTEMPTS_DIR, SPEC_FILE, STORE_DAMAGED_DIR, STORE_DIR,
                           WORLD_MODELS_DIR, family_of_trial_dir)
from qworld.sweep import store
from qworld.sweep.location import Location

PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"

# Keys of a trial config (params.json) and of a result.json line.
CFG_ENV_ID = "env_id"
CFG_ENV_KWARGS = "env_kwargs"
RES_CHECKPOINT_DIR = "checkpoint_dir_name"
RES_ITERATION = "training_iteration"
RES_CONFIG = "config"  # Tune copies the whole config into each line; params.json has it

# Extra columns of the trial table and of load_many.
TRIAL_DIR = "trial_dir"
EXPERIMENT = "experiment"
NUM_ITERATIONS = "num_iterations"
NUM_CHECKPOINTS = "num_checkpoints"  # checkpoint dirs on disk
NUM_SCORED = "num_scored"  # checkpoints with rows in the store
TRIAL_ERROR = "trial_error"  # Tune wrote error.txt for this trial
TRAIN_PREFIX = "train/"  # prefix of a training metric whose name clashes with a store column

# Agent config keys copied into the frames next to the grid columns (when present), on top
# of every env_kwargs entry and every key the sweep file sets or sweeps.
CONFIG_KEYS = ("gamma", "lambda_", "lr", "num_envs", "rollout_length", "minibatch_size",
               "num_epochs", "hidden_sizes", "q_output", "her_k", "total_env_steps")

INT_COLUMNS = (K.NUM_GOALS, K.SEED, K.CHECKPOINT_INDEX, K.ENV_STEPS, K.M_RANK, K.NUM_STATES,
               RES_ITERATION, K.TRAIN_ENV_STEPS, "goal_seed", NUM_ITERATIONS, NUM_CHECKPOINTS,
               NUM_SCORED)
FLOAT_COLUMNS = (K.P_MSE, K.P_TV, K.P_MAX_ERR, K.Q_NMSE, K.WM_NMSE, K.M_COND, K.M_GAP,
                 K.FIT_SECONDS, K.PLAN_SUCCESS, K.PLAN_EXCESS_STEPS, K.PLAN_REGRET, K.UNSAFE_VISITS,
                 K.RETURN_RATIO, K.PLAN_STEPS, K.PLAN_OPTIMAL_STEPS, "gamma", "lambda_", "lr")
STRING_COLUMNS = (K.SWEEP, K.TRIAL_ID, K.ENV, K.ALGORITHM, K.VARIANT, K.GOAL_TYPE, K.HEAD, K.METHOD,
                  K.IDENTIFIABLE_CASE, K.ERROR, K.TASK, EXPERIMENT)
# one list of scores, in qworld.metrics (names kept here for the analysis API)
PLAN_METRICS = K.PLAN_METRICS
WORLD_MODEL_METRICS = K.WORLD_MODEL_METRICS


# --------------------------------------------------------------------------------------
# public API


class NotAnExperimentError(FileNotFoundError):
    """A location that holds no qworld experiment (a wrong path, a typo, a parent folder)."""


def check_experiment(experiment_dir: str | Path | Location) -> Location:
    """The experiment's location, or :class:`NotAnExperimentError` naming what is missing.

    An experiment holds its sweep file, a results store or a trial dir (a sweep's first
    write is its sweep file, so a sweep that just started counts). Unreadable locations
    (credentials, network) raise their ``OSError``.
    """
    exp = Location.of(experiment_dir)
    if not exp.is_dir():
        raise NotAnExperimentError(f"{experiment_dir}: no such directory")
    if (exp / SPEC_FILE).is_file() or (exp / STORE_DIR).is_dir() or _read_trials(exp):
        return exp
    raise NotAnExperimentError(f"{experiment_dir}: not a qworld experiment dir (no {SPEC_FILE}, no "
                               f"{STORE_DIR}, no trial dirs); give the folder `qworld sweep` printed as "
                               "'experiment dir'")


def load(experiment_dir: str | Path | Location, *, resolve_num_goals: bool = False) -> pd.DataFrame:
    """Every scored (trial, checkpoint, method) with its trial config and training metrics.

    One row per row of the results store (``worldmodels.parquet``), left-joined with

    - the trial's config from ``params.json``: the grid columns (``K.GRID_COLUMNS``),
      every ``env_kwargs`` entry (``goal_seed``, ``layout``, ...), ``gamma``, ``lr`` and the
      other agent keys the sweep file sets (lists become strings, e.g. ``"[64, 64]"``);
    - the training metrics of the ``result.json`` line that saved that checkpoint,
      flattened with ``/`` (``K.TRAIN_LOSS``, ``K.TRAIN_ENV_STEPS``, ``training_iteration``...).

    Args:
        experiment_dir: a ``qworld sweep`` experiment (finished, running or resumed): a local
            folder or a URI. A damaged results file is named on stderr and left in place.
        resolve_num_goals: give a config with ``num_goals = None`` ("every state") the
            actual L of its goal set, built with ``qworld_envs`` (which imports torch, so it
            is off by default; the report turns it on). Otherwise such rows keep NA.

    Returns:
        The frame, sorted by (trial_id, checkpoint_index, method); typed columns: grid
        strings as ``string``, counts as ``Int64``, metrics as ``float64``. Checkpoints not
        yet scored have no rows; an empty store gives an empty frame with the key columns.

    Raises:
        NotAnExperimentError: the location holds no experiment (:func:`check_experiment`).
    """
    exp = check_experiment(experiment_dir)
    rows = store.read_store(exp)
    trials = _read_trials(exp)
    configs = _config_table(trials, _sweep_name(exp), _spec_keys(exp), resolve_num_goals)
    ckpt_metrics = _checkpoint_metrics(trials, rows)

    rows = _coerce(rows)
    if not ckpt_metrics.empty:
        clash = [c for c in ckpt_metrics.columns
                 if c in rows.columns and c not in (K.TRIAL_ID, K.CHECKPOINT_INDEX)]
        ckpt_metrics = ckpt_metrics.rename(columns={c: TRAIN_PREFIX + c for c in clash})
        rows = rows.merge(_coerce(ckpt_metrics), on=[K.TRIAL_ID, K.CHECKPOINT_INDEX], how="left")
        if K.ENV_STEPS in rows.columns and K.TRAIN_ENV_STEPS in rows.columns:
            rows[K.ENV_STEPS] = _as_int(rows[K.ENV_STEPS]).fillna(_as_int(rows[K.TRAIN_ENV_STEPS]))
    if not configs.empty:
        rows = _merge_config(rows, configs)
    return _order(_coerce(rows)).sort_values(
        [K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD], ignore_index=True)


def load_training_curves(experiment_dir: str | Path | Location, *, resolve_num_goals: bool = False) -> pd.DataFrame:
    """Every trial, every training iteration: config columns + flattened metrics.

    One row per (trial, ``training_iteration``); when a resumed trial repeated
    iterations the last report wins. ``K.ENV_STEPS`` copies ``K.TRAIN_ENV_STEPS`` (the same
    x axis as :func:`load`), and ``K.CHECKPOINT_INDEX`` is set on the iterations that saved
    a checkpoint (NA elsewhere).
    """
    exp = check_experiment(experiment_dir)
    trials = _read_trials(exp)
    configs = _config_table(trials, _sweep_name(exp), _spec_keys(exp), resolve_num_goals)
    hints = _store_steps(exp)
    frames = []
    for trial in trials:
        lines = _dedupe_iterations(trial["results"])
        if not lines:
            continue
        frame = pd.DataFrame([_flatten(line) for line in lines])
        frame[K.TRIAL_ID] = trial["trial_id"]
        saved = {id(line): index for index, line in _checkpoint_lines(trial, hints.get(trial["trial_id"])).items()}
        frame[K.CHECKPOINT_INDEX] = [saved.get(id(line)) for line in lines]
        if K.TRAIN_ENV_STEPS in frame:
            frame[K.ENV_STEPS] = frame[K.TRAIN_ENV_STEPS]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*K.GRID_COLUMNS, RES_ITERATION, K.ENV_STEPS])
    curves = pd.concat(frames, ignore_index=True)
    clash = [c for c in configs.columns if c in curves.columns and c != K.TRIAL_ID]
    curves = curves.rename(columns={c: TRAIN_PREFIX + c for c in clash})
    curves = configs.merge(curves, on=K.TRIAL_ID, how="inner")
    curves = _order(_coerce(curves))
    sort = [c for c in (K.TRIAL_ID, RES_ITERATION) if c in curves.columns]
    return curves.sort_values(sort, ignore_index=True)


def load_trials(experiment_dir: str | Path | Location, *, resolve_num_goals: bool = False) -> pd.DataFrame:
    """One row per trial dir: config columns plus progress.

    Columns beyond the config: ``trial_dir``, ``num_iterations`` (result lines),
    ``env_steps`` (last reported), ``num_checkpoints`` (checkpoint dirs on disk),
    ``num_scored`` (checkpoints with rows in the store), ``trial_error`` (Tune wrote an
    ``error.txt``). Trials that never reported (no ``result.json``) are listed too.
    """
    exp = check_experiment(experiment_dir)
    trials = _read_trials(exp)
    configs = _config_table(trials, _sweep_name(exp), _spec_keys(exp), resolve_num_goals)
    if configs.empty:
        return pd.DataFrame(columns=[*K.GRID_COLUMNS, TRIAL_DIR, NUM_ITERATIONS, K.ENV_STEPS,
                                     NUM_CHECKPOINTS, NUM_SCORED, TRIAL_ERROR])
    scored = store.scored_keys(exp)
    progress = []
    for trial in trials:
        lines = _dedupe_iterations(trial["results"])
        steps = [line.get(K.TRAIN_ENV_STEPS) for line in lines if line.get(K.TRAIN_ENV_STEPS) is not None]
        progress.append({
            K.TRIAL_ID: trial["trial_id"],
            TRIAL_DIR: str(trial["dir"]),
            NUM_ITERATIONS: len(lines),
            K.ENV_STEPS: steps[-1] if steps else None,
            NUM_CHECKPOINTS: len(trial["dir"].list("checkpoint_*", kind="dir")),
            NUM_SCORED: len({c for t, c in scored if t == trial["trial_id"]}),
            TRIAL_ERROR: (trial["dir"] / ERROR_FILE).is_file(),
        })
    out = configs.merge(pd.DataFrame(progress), on=K.TRIAL_ID, how="left")
    return _order(_coerce(out)).sort_values(K.TRIAL_ID, ignore_index=True)


def load_many(experiment_dirs: Iterable[str | Path] | Mapping[str, str | Path], **kwargs) -> pd.DataFrame:
    """:func:`load` of several experiment dirs as one frame with an ``experiment`` column.

    Args:
        experiment_dirs: dirs (labelled by their folder name) or a mapping label -> dir.
        **kwargs: passed to :func:`load`.
    """
    if isinstance(experiment_dirs, Mapping):
        items = list(experiment_dirs.items())
    else:
        items = [(Location.of(d).name, d) for d in experiment_dirs]
    labels = [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise ValueError(f"load_many: experiment labels {labels} repeat; pass a mapping label -> dir")
    frames = []
    for label, path in items:
        frame = load(path, **kwargs)
        frame.insert(0, EXPERIMENT, pd.Series([label] * len(frame), index=frame.index, dtype="string"))
        frames.append(frame)
    frames = [f for f in frames if not f.empty] or frames[:1]
    if not frames:
        return pd.DataFrame(columns=[EXPERIMENT, *K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.METHOD])
    return _coerce(pd.concat(frames, ignore_index=True))


def final_checkpoints(df: pd.DataFrame) -> pd.DataFrame:
    """The rows at each trial's last scored checkpoint (per experiment in a load_many frame)."""
    if df.empty:
        return df.copy()
    keys = [c for c in (EXPERIMENT, K.TRIAL_ID) if c in df.columns]
    last = df.groupby(keys, dropna=False)[K.CHECKPOINT_INDEX].transform("max")
    return df[df[K.CHECKPOINT_INDEX] == last].reset_index(drop=True)


def plan_columns(df: pd.DataFrame) -> list[str]:
    """The ``<task>/<planning metric>`` columns of a frame, in frame order."""
    return [c for c in df.columns if "/" in c and c.rsplit("/", 1)[1] in PLAN_METRICS
            and not c.startswith(TRAIN_PREFIX)]


def load_world_model(experiment_dir: str | Path, trial_id: str, checkpoint_index: int,
                     method: str) -> np.ndarray:
    """The ``P_hat[S, A, S]`` a method extracted at one checkpoint (finite envs).

    Read from ``EXPERIMENT_DIR/worldmodels_p/`` (``qworld.sweep.store.write_world_models``),
    keyed like the rows of :func:`load` (``trial_id``, ``checkpoint_index``, ``method``).

    Returns:
        ``[S, A, S]`` float64, each row renormalised to sum to 1 (the store keeps float32).

    Raises:
        FileNotFoundError: nothing stored for that (trial, checkpoint); the message lists
            the stored checkpoints of the trial, or the stored trials.
        KeyError: the method has no model there (it failed, or was not run); the message
            lists the methods that do.
    """
    models = store.read_world_models(experiment_dir, trial_id, checkpoint_index)
    if method not in models:
        raise KeyError(f"no world model of method {method!r} for trial {trial_id!r}, checkpoint "
                       f"{int(checkpoint_index)}; stored methods: {sorted(models)}")
    P_hat = models[method].astype(np.float64)
    sums = P_hat.sum(axis=-1, keepdims=True)
    # float32 rows sum to 1 within ~1e-7; a row summing to 0 would be no distribution at all
    return P_hat / np.where(sums > 0, sums, 1.0)


def read_sweep_text(experiment_dir: str | Path | Location) -> str | None:
    """The sweep file kept in the experiment dir, or None."""
    try:
        return (Location.of(experiment_dir) / SPEC_FILE).read_text()
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# reading trial dirs


# folders of an experiment that are no trial dirs (not opened when looking for trials)
_NOT_TRIALS = {STORE_DIR, STORE_DAMAGED_DIR, WORLD_MODELS_DIR, SCORING_ATTEMPTS_DIR, "report", "wandb"}


def _read_trials(exp) -> list[dict]:
    """Each trial dir of ``exp`` (a path, URI or Location) as {trial_id, dir (a Location),
    params, results}; unreadable parts become empty."""
    exp = Location.of(exp)
    trials = []
    for trial_dir in exp.list(kind="dir"):
        if trial_dir.name in _NOT_TRIALS:
            continue
        params_text, result_text = _read_text(trial_dir / PARAMS_FILE), _read_text(trial_dir / RESULT_FILE)
        if params_text is None and result_text is None:
            continue
        params = _parse_json(params_text)
        params = params if isinstance(params, dict) else {}
        if K.ALGORITHM not in params:  # a single-family sweep: the family is the trainable's name
            params[K.ALGORITHM] = family_of_trial_dir(trial_dir.name)
        results = _json_lines(result_text)
        trial_id = next((r[K.TRIAL_ID] for r in results if r.get(K.TRIAL_ID)), None)
        trials.append({
            "trial_id": str(trial_id) if trial_id else _trial_id_from_dir(trial_dir.name),
            "dir": trial_dir,
            "params": params,
            "results": results,
        })
    return trials


def _read_text(loc: Location) -> str | None:
    """A file's text; None when it is not there or cannot be read (a file being written)."""
    try:
        return loc.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _parse_json(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _read_json(loc: Location) -> Any:
    return _parse_json(_read_text(loc))


def _json_lines(text: str | None) -> list[dict]:
    """The parseable lines of a JSON-lines file (a line cut by a crash is skipped)."""
    if text is None:
        return []
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


def _trial_id_from_dir(name: str) -> str:
    """Tune names trial dirs ``<trainable>_<env>_<trial_id>_...``; trial ids read ``a1b2c_00003``."""
    match = re.search(r"(?:^|_)([0-9a-f]{5}_\d{5})(?:_|$)", name)
    return match.group(1) if match else name


def _checkpoint_index(name: Any) -> int | None:
    match = re.search(r"checkpoint_(\d+)", str(name)) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def _dedupe_iterations(lines: list[dict]) -> list[dict]:
    """One line per training iteration, the last report winning (resumed trials repeat some)."""
    by_iter: dict[Any, dict] = {}
    unnumbered = []
    for line in lines:
        it = line.get(RES_ITERATION)
        if it is None:
            unnumbered.append(line)
        else:
            by_iter.pop(it, None)
            by_iter[it] = line
    return unnumbered + sorted(by_iter.values(), key=lambda r: r[RES_ITERATION])


def _flatten(line: Mapping[str, Any], prefix: str = "") -> dict:
    """Nested dicts -> ``a/b/c`` keys; scalars kept, lists as strings, ``config`` dropped."""
    out = {}
    for key, value in line.items():
        if not prefix and key == RES_CONFIG:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix=f"{name}/"))
        else:
            out[name] = _scalar(value)
    return out


def _scalar(value: Any) -> Any:
    """A value fit for a DataFrame cell: scalars as they are, containers as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _checkpoint_lines(trial: dict, steps_hint: Mapping[int, Any] | None = None) -> dict[int, dict]:
    """Checkpoint index -> the result line of the iteration that saved it.

    Tune (2.60) does not always write ``checkpoint_dir_name`` into ``result.json``, so a
    checkpoint is matched, in this order, by that name; by its env steps as the results
    store recorded them (``steps_hint``); by the ``env_steps`` of the ``qworld_config.json``
    the agent saves in each checkpoint dir. A resumed trial may report a checkpoint twice:
    the last line wins.
    """
    lines = _dedupe_iterations(trial["results"])
    out: dict[int, dict] = {}
    for line in lines:
        index = _checkpoint_index(line.get(RES_CHECKPOINT_DIR))
        if index is not None:
            out[index] = line
    by_steps: dict[int, dict] = {}
    for line in lines:
        steps = _int_or_none(line.get(K.TRAIN_ENV_STEPS))
        if steps is not None:
            by_steps[steps] = line  # the last line at those steps
    wanted = dict(steps_hint or {})
    for ckpt in trial["dir"].list("checkpoint_*", kind="dir"):
        index = _checkpoint_index(ckpt.name)
        if index is not None and index not in out and _int_or_none(wanted.get(index)) is None:
            config = _read_json(ckpt / CHECKPOINT_CONFIG_FILE)
            wanted[index] = config.get(K.ENV_STEPS) if isinstance(config, dict) else None
    for index, steps in wanted.items():
        steps = _int_or_none(steps)
        if index not in out and steps is not None and steps in by_steps:
            out[index] = by_steps[steps]
    return out


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or pd.isna(value) else int(round(float(value)))
    except (TypeError, ValueError):
        return None


def _store_steps(exp: Location) -> dict[str, dict[int, Any]]:
    """trial_id -> {checkpoint index: env steps} as the results store recorded them."""
    rows = store.read_store(exp)
    out: dict[str, dict[int, Any]] = {}
    if K.ENV_STEPS in rows.columns:
        for t, c, steps in rows[[K.TRIAL_ID, K.CHECKPOINT_INDEX, K.ENV_STEPS]].itertuples(index=False):
            out.setdefault(str(t), {})[int(c)] = steps
    return out


def _checkpoint_metrics(trials: list[dict], rows: pd.DataFrame) -> pd.DataFrame:
    """Per (trial, checkpoint index): the flattened result line that saved it."""
    hints: dict[str, dict[int, Any]] = {}
    if not rows.empty and K.ENV_STEPS in rows.columns:
        for t, c, steps in rows[[K.TRIAL_ID, K.CHECKPOINT_INDEX, K.ENV_STEPS]].itertuples(index=False):
            if not pd.isna(c):
                hints.setdefault(str(t), {})[int(c)] = steps
    out = []
    for trial in trials:
        for index, line in _checkpoint_lines(trial, hints.get(trial["trial_id"])).items():
            flat = _flatten(line)
            flat[K.TRIAL_ID] = trial["trial_id"]
            flat[K.CHECKPOINT_INDEX] = index
            out.append(flat)
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------
# trial configs


def _sweep_name(exp: Location) -> str:
    spec = _read_spec(exp)
    name = spec.get("name") if isinstance(spec, dict) else None
    return str(name) if name else exp.name


def _read_spec(exp: str | Path | Location) -> dict:
    text = read_sweep_text(exp)
    if text is None:
        return {}
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return raw if isinstance(raw, dict) else {}


def _spec_keys(exp: Location) -> tuple[str, ...]:
    """Agent keys the sweep file sets or sweeps (they become config columns)."""
    spec = _read_spec(exp)
    keys = []
    for section in ("agent", "sweep"):
        value = spec.get(section)
        if isinstance(value, dict):
            keys += [k for k in value if k != "cases"]
    return tuple(dict.fromkeys(keys))


def _config_table(trials: list[dict], sweep: str, spec_keys: tuple[str, ...],
                  resolve_num_goals: bool) -> pd.DataFrame:
    rows = [_config_columns(t["params"], sweep, t["trial_id"], spec_keys, resolve_num_goals)
            for t in trials]
    if not rows:
        return pd.DataFrame(columns=list(K.GRID_COLUMNS))
    return _coerce(pd.DataFrame(rows))


def _config_columns(params: Mapping[str, Any], sweep: str, trial_id: str,
                    spec_keys: tuple[str, ...], resolve_num_goals: bool) -> dict:
    env_kwargs = params.get(CFG_ENV_KWARGS)
    env_kwargs = dict(env_kwargs) if isinstance(env_kwargs, Mapping) else {}
    num_goals = env_kwargs.get(K.NUM_GOALS)
    if num_goals is None and resolve_num_goals and params.get(CFG_ENV_ID):
        num_goals = _resolved_num_goals(params[CFG_ENV_ID], env_kwargs)
    cols = {
        K.SWEEP: sweep,
        K.TRIAL_ID: trial_id,
        K.ENV: params.get(CFG_ENV_ID),
        K.ALGORITHM: str(params.get(K.ALGORITHM) or "pqn").lower(),  # PQN configs carry no key
        K.VARIANT: env_kwargs.get(K.VARIANT),
        K.GOAL_TYPE: env_kwargs.get(K.GOAL_TYPE),
        K.NUM_GOALS: num_goals,
        K.HEAD: params.get(K.HEAD),
        K.SEED: params.get(K.SEED),
    }
    for key, value in env_kwargs.items():
        cols.setdefault(key, _scalar(value))
    for key in (*CONFIG_KEYS, *spec_keys):
        if key in params and key not in (CFG_ENV_ID, CFG_ENV_KWARGS):
            cols.setdefault(key, _scalar(params[key]))
    return cols


_NUM_GOALS_CACHE: dict[str, int | None] = {}


def _resolved_num_goals(env_id: str, env_kwargs: Mapping[str, Any]) -> int | None:
    """L of the goal set a config with ``num_goals = None`` trains on (finite envs)."""
    key = json.dumps([env_id, env_kwargs], sort_keys=True, default=str)
    if key not in _NUM_GOALS_CACHE:
        try:
            from qworld_envs import FINITE_ENVS, make_finite_problem

            kwargs = {k: (tuple(map(tuple, v)) if k == "goal_cells" and v else v)
                      for k, v in env_kwargs.items()}
            _NUM_GOALS_CACHE[key] = (make_finite_problem(env_id, **kwargs).goals.num_goals
                                     if env_id in FINITE_ENVS else None)
        except Exception:  # noqa: BLE001 - an env we cannot build keeps num_goals NA
            _NUM_GOALS_CACHE[key] = None
    return _NUM_GOALS_CACHE[key]


def _merge_config(rows: pd.DataFrame, configs: pd.DataFrame) -> pd.DataFrame:
    """Left-join configs on trial_id; params.json wins, the store's grid columns fill gaps."""
    suffix = "__config"
    merged = rows.merge(configs, on=K.TRIAL_ID, how="left", suffixes=("", suffix))
    for col in configs.columns:
        other = col + suffix
        if other in merged.columns:
            merged[col] = merged[other].astype(object).where(merged[other].notna(), merged[col].astype(object))
            merged = merged.drop(columns=other)
    return merged


# --------------------------------------------------------------------------------------
# types and column order


def _as_int(series: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(series, errors="coerce")
    try:
        return numeric.astype("Int64")
    except (TypeError, ValueError):  # non-integral values: keep them as floats
        return numeric.astype("float64")


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Known columns to their types (Int64 / float64 / string); others as pandas infers."""
    df = df.copy()
    plan = set(plan_columns(df))
    for col in df.columns:
        if col in INT_COLUMNS:
            df[col] = _as_int(df[col])
        elif col in FLOAT_COLUMNS or col in plan:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        elif col in STRING_COLUMNS:
            df[col] = df[col].astype(object).where(df[col].notna(), None).astype("string")
        elif df[col].dtype == object:
            df[col] = df[col].infer_objects()
    return df


def _order(df: pd.DataFrame) -> pd.DataFrame:
    first = [EXPERIMENT, *K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.ENV_STEPS, K.METHOD,
             *WORLD_MODEL_METRICS, K.M_RANK, K.M_COND, K.M_GAP, K.IDENTIFIABLE_CASE]
    head = [c for c in first if c in df.columns]
    plan = [c for c in plan_columns(df) if c not in head]
    rest = [c for c in df.columns if c not in head and c not in plan]
    return df[head + plan + rest]
