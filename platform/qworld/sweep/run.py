"""Run, resume and re-score sweeps: Tune over agent trials (any learner family,
``qworld.agents.families``), P-learning actors on the side.

``run_sweep`` is what ``qworld sweep`` calls. The spec is validated before this module is
reached; from here on, Ray is started (or joined), one trial runs per grid cell, each
checkpoint goes to the P-learning pool as it is written, and at the end every checkpoint on
disk that has no rows in the store is scored before returning.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qworld import metrics as K
from qworld.layout import CHECKPOINT_CONFIG_FILE, RUN_FILE, SPEC_FILE
from qworld.sweep import store
from qworld.sweep.location import Location
from qworld.sweep.spec import GOAL_AXES, STOP_KEYS, TRIAL_AXES, SweepSpec, load_sweep

DEFAULT_STORAGE = "results"


@dataclass
class SweepOutcome:
    experiment_dir: Location
    num_trials: int
    num_errors: int
    num_checkpoints: int
    num_scored: int
    num_unfinished: int = 0  # trials Tune stopped before their stop condition (Ctrl-C): resume them


EXIT_INTERRUPTED = 130  # a sweep stopped by Ctrl-C (the shell's code for SIGINT): not a success


def num_unfinished(results) -> int:
    """Trials of a Tune ``ResultGrid`` that neither errored nor reached their stop condition
    (Tune marks a finished trial's last result ``done``; Ctrl-C stops trials without it)."""
    return sum(1 for r in results if r.error is None and not (r.metrics or {}).get("done"))


class ExperimentExistsError(ValueError):
    """A sweep was started where an experiment already is (``qworld resume`` continues it)."""


def experiment_location(spec: SweepSpec, storage: str | None) -> Location:
    """``<storage>/<name>``: a local folder (default ``./results/<name>``) or a URI."""
    return Location.of(storage or DEFAULT_STORAGE) / spec.name


def check_new_experiment(location: Location) -> None:
    """One experiment per location: a second sweep into it would mix its trials, seeds and
    ``sweep.yaml`` with the first one's."""
    if (location / SPEC_FILE).exists():
        raise ExperimentExistsError(
            f"{location} already holds an experiment; continue it with `qworld resume {location}`, "
            "or start a new one elsewhere (--set name=NEW_NAME, or another --storage)")


def new_run_id(location: Location) -> str:
    """A fresh id for this experiment, kept in it (``RUN_FILE``): W&B run ids are built on it,
    so two sweeps logging to one project never resume each other's runs, whatever their names."""
    run_id = uuid.uuid4().hex[:12]
    (location / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")
    return run_id


def run_id_of(location: Location) -> str | None:
    """The experiment's run id (None for experiments written before it existed)."""
    try:
        return json.loads((location / RUN_FILE).read_text())["run_id"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def wandb_dir(location: Location, run_id: str | None) -> str:
    """W&B writes its offline runs as local files: in the experiment dir on local disk, else
    in a folder of the driver's machine named after the run (``~/.cache/qworld/wandb/``),
    copied into the experiment's ``wandb/`` when the sweep ends (:func:`upload_wandb_runs`)."""
    if location.is_local:
        return str(location.local_path)
    path = Path.home() / ".cache" / "qworld" / "wandb" / f"{location.name}-{run_id}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def upload_wandb_runs(location: Location, run_id: str | None) -> None:
    """Copy the driver's offline W&B runs of an experiment on an object store into its
    ``wandb/`` (``qworld sync URI`` reads them there)."""
    import pyarrow.fs as pafs

    local = Path(wandb_dir(location, run_id)) / "wandb"
    if location.is_local or not local.is_dir():
        return
    pafs.copy_files(str(local), (location / "wandb").path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=location.fs)


def _tune_storage(location: Location) -> dict:
    """Tune's storage arguments for the experiment's parent (Tune appends the name)."""
    parent = location.parent
    if location.is_local:
        return {"storage_path": str(parent.local_path)}
    return {"storage_path": parent.path, "storage_filesystem": location.fs}


# --------------------------------------------------------------------------------------
# Ray


def init_ray(spec: SweepSpec, address: str | None, experiment_dir: Path, verbose: bool = False) -> bool:
    """Start a local Ray sized to this machine, or join ``address`` (or $RAY_ADDRESS).

    Quiet by default: Python logging of the driver and of every worker (Ray, Tune, RLlib)
    at ERROR (``ray.LoggingConfig``), so errors and what workers print still reach the
    console but the INFO/WARNING chatter (RLlib's new-API-stack notice per trial,
    "Checkpoint successfully created", ...) does not; ``verbose`` keeps Ray's defaults.
    Returns whether this call started (or joined) Ray, i.e. whether to shut it down.
    """
    import ray

    # W&B reads WANDB_MODE when a run starts inside an actor: it must be in the env of the
    # driver *and* of every worker before Ray starts them, or offline runs log nothing.
    os.environ["WANDB_MODE"] = spec.wandb.mode
    os.environ.setdefault("WANDB_SILENT", "true")
    env_vars = {"WANDB_MODE": spec.wandb.mode, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(runtime_env={"env_vars": env_vars}, log_to_driver=True,
                                  include_dashboard=False)
    if not verbose:
        kwargs["logging_config"] = ray.LoggingConfig(encoding="TEXT", log_level="ERROR")
    from qworld.sweep.spec import cluster_address

    joined = cluster_address(address)
    if joined is not None:
        kwargs.pop("include_dashboard")
        ray.init(address=joined, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), **kwargs)
    return True


# --------------------------------------------------------------------------------------
# Tune pieces


def spec_families(spec: SweepSpec) -> list[str]:
    """The learner families the sweep's cells train (file order; ``[pqn]`` when not given)."""
    from qworld.agents.families import ALGORITHM_KEY, family

    names = [family(spec.cell_config(cell)[2].get(ALGORITHM_KEY)).name for cell in spec.cells()]
    return list(dict.fromkeys(names))


def trainable_for(spec: SweepSpec):
    """The Tune trainable: the family's Algorithm, or ``AnyFamily`` when cells cross families."""
    from qworld.agents.families import family

    names = spec_families(spec)
    if len(names) == 1:
        return family(names[0]).algo_class()
    from qworld.agents.mixed import AnyFamily

    return AnyFamily


def _family_space(spec: SweepSpec, name: str) -> dict:
    from qworld.agents.families import ALGORITHM_KEY, family

    env_id, env_kwargs, agent = spec.cell_config({})
    agent.pop(ALGORITHM_KEY, None)
    total = spec.stop.get(K.ENV_STEPS)
    config = (
        family(name).build_config(env_id, env_kwargs, agent, total_env_steps=total)
        .environment(env=env_id)
        .learners(num_gpus_per_learner=spec.resources.gpus_per_trial)
        .resources(num_cpus_for_main_process=spec.resources.cpus_per_trial)
        .env_runners(num_env_runners=0)
        .debugging(seed=0)
    )
    space = config.to_dict()
    space["env_kwargs"] = dict(space["env_kwargs"])
    return space


def param_space(spec: SweepSpec) -> dict:
    """The family's config dict with a ``tune.grid_search`` at every sweep axis.

    A sweep crossing families (``sweep.algorithm``) gets one dict holding every family's
    keys: a key whose value differs between families (or that one family lacks) is a
    ``tune.sample_from`` of the trial's ``algorithm``; ``AnyFamily`` hands each trial's
    family only the keys it knows.
    """
    from ray import tune

    from qworld.agents.families import ALGORITHM_KEY

    names = spec_families(spec)
    spaces = {name: _family_space(spec, name) for name in names}
    if len(names) == 1:
        space = spaces[names[0]]
    else:
        space = {}
        for key in dict.fromkeys(k for s in spaces.values() for k in s):
            values = [s.get(key, _MISSING) for s in spaces.values()]
            if all(repr(v) == repr(values[0]) for v in values) and values[0] is not _MISSING:
                space[key] = values[0]
            else:
                space[key] = tune.sample_from(functools.partial(
                    _family_value, key=key, values={n: s.get(key) for n, s in spaces.items()}))
        space[ALGORITHM_KEY] = names[0]  # the grid axis below sets it per trial
    if "cases" in spec.sweep:
        # Each case's env/goal part is a whole env_kwargs dict, so Tune crosses cases with
        # the other axes; agent keywords a case sets follow its env_kwargs (sample_from is
        # resolved after the grid, with the trial's env_kwargs known).
        cases = spec.sweep["cases"]
        env_parts = [{k: v for k, v in c.items() if k in spec.env_axes + GOAL_AXES} for c in cases]
        space["env_kwargs"] = tune.grid_search([{**space["env_kwargs"], **e} for e in env_parts])
        for key in sorted({k for c in cases for k in c} - set(spec.env_axes + GOAL_AXES)):
            space[key] = tune.sample_from(functools.partial(
                _case_value, key=key, default=space.get(key), env_parts=env_parts, cases=cases))
    for axis, values in spec.sweep.items():
        if axis == "cases":
            continue
        if axis in spec.env_axes or axis in GOAL_AXES:
            space["env_kwargs"][axis] = tune.grid_search(list(values))
        elif axis in TRIAL_AXES:
            space[axis] = tune.grid_search(list(values))
        else:
            space[axis] = tune.grid_search(list(values))
    return space


_MISSING = object()


def _family_value(trial_spec, key, values):
    """The value of config key ``key`` for this trial's learner family."""
    from qworld.agents.families import family_of

    return values.get(family_of(trial_spec.config).name)


def _case_value(trial_spec, key, default, env_parts, cases):
    """The value of agent keyword ``key`` for the case whose env/goal part this trial has."""
    env_kwargs = trial_spec.config["env_kwargs"]
    for part, case in zip(env_parts, cases):
        if all(env_kwargs.get(k) == v for k, v in part.items()):
            return case.get(key, default)
    return default


def _tune_stop(spec: SweepSpec) -> dict:
    return {STOP_KEYS[k]: v for k, v in spec.stop.items()}


def _run_config(spec: SweepSpec, experiment_dir: Location, pool, console=None, verbose: bool = False,
                run_id: str | None = None):
    """Tune's run config. Quiet (default): Tune prints nothing of its own (``verbose=0``:
    no per-trial config tables, no progress tables; failed trials are still reported) and
    ``console`` (a :class:`SweepConsole`) prints one line per event. ``verbose``: Tune's
    own output as well (``verbose=1``)."""
    from ray import tune

    from qworld.sweep.callbacks import GridWandbCallback, PLearningCallback, StagingDirClaimed, WorldModelReporter

    plearn = PLearningCallback(pool, console=console)
    callbacks = [StagingDirClaimed(spec.name), plearn] + ([console] if console is not None else [])
    if spec.wandb.mode != "disabled":
        callbacks.append(GridWandbCallback(
            project=spec.wandb.project, group=spec.wandb_group, grid_axes=spec.grid_axes,
            dir=wandb_dir(experiment_dir, run_id), mode=spec.wandb.mode, run_id=run_id))
    reporter = None
    if verbose and os.environ.get("RAY_AIR_NEW_OUTPUT", "1") == "0":
        # Tune's legacy output engine is the only one that takes a progress reporter.
        reporter = WorldModelReporter(
            plearn,
            metric_columns={K.TRAIN_ENV_STEPS: K.ENV_STEPS, K.TRAIN_EPISODE_SUCCESS: "success",
                            K.TRAIN_LOSS: "td_loss"},
            parameter_columns=[f"env_kwargs/{a}" if a in spec.env_axes + GOAL_AXES else a
                               for a in spec.grid_axes],
            max_report_frequency=15, print_intermediate_tables=True)
    return tune.RunConfig(
        name=spec.name,
        **_tune_storage(experiment_dir),
        stop=_tune_stop(spec),
        checkpoint_config=tune.CheckpointConfig(
            checkpoint_frequency=spec.checkpoint.every,
            checkpoint_at_end=spec.checkpoint.at_end),
        failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        callbacks=callbacks,
        progress_reporter=reporter,
        verbose=1 if verbose else 0,
    )


@contextlib.contextmanager
def _tune_output(verbose: bool):
    """Quiet: Tune's legacy output engine at verbosity 0 prints nothing of its own (the
    new engine prints an experiment box and result paths even when silent); errors still
    come through Tune's error log and :class:`SweepConsole`. Verbose: Tune's defaults."""
    if verbose:
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _console(spec: SweepSpec, experiment_dir: Path):
    from qworld.sweep.callbacks import SweepConsole

    return SweepConsole(experiment_dir, grid_axes=spec.grid_axes, methods=spec.extract.methods)


def _pool(spec: SweepSpec, experiment_dir: Path):
    from qworld.sweep.plearn_actor import PLearningPool

    return PLearningPool(experiment_dir, spec.name, spec.extract.plan(), spec.extract.tasks,
                         spec.extract.options, size=spec.resources.plearn_actors)


# --------------------------------------------------------------------------------------
# entry points


def run_sweep(spec: SweepSpec, address: str | None = None, storage: str | None = None,
              verbose: bool = False) -> SweepOutcome:
    """Train every grid cell, score every checkpoint; returns when all are scored.

    Prints a header, then one line per event (``verbose``: Tune's and Ray's own output
    too). Ray is shut down before returning when this call started it, after the W&B
    runs are finished and their services stopped.
    """
    from ray import tune

    experiment_dir = experiment_location(spec, storage)
    check_new_experiment(experiment_dir)
    experiment_dir.makedirs()
    (experiment_dir / SPEC_FILE).write_text(spec.source)
    run_id = new_run_id(experiment_dir)
    console = _console(spec, experiment_dir)
    console.header(spec, experiment_dir)
    started = init_ray(spec, address, experiment_dir, verbose=verbose)
    try:
        pool = _pool(spec, experiment_dir)
        tuner = tune.Tuner(
            trainable_for(spec),
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_trials),
            run_config=_run_config(spec, experiment_dir, pool, console=console, verbose=verbose,
                                   run_id=run_id),
        )
        with _tune_output(verbose), _own_staging_dir(spec.name):
            results = tuner.fit()
        return _finish(spec, experiment_dir, pool, num_trials=len(results),
                       num_errors=len(results.errors), console=console, unfinished=num_unfinished(results))
    finally:
        _shutdown(started)


def resume_sweep(experiment_dir: str | Path | Location, address: str | None = None,
                 verbose: bool = False) -> SweepOutcome:
    """Continue an interrupted sweep: finished trials stay finished, the rest resume from
    their last checkpoint, and every unscored checkpoint is scored."""
    from ray import tune

    from qworld.sweep.callbacks import GridWandbCallback, SweepConsole

    experiment_dir = Location.of(experiment_dir)
    spec = load_spec_of(experiment_dir)
    console = _console(spec, experiment_dir)
    _label_trials_from_disk(console, experiment_dir)
    started = init_ray(spec, address, experiment_dir, verbose=verbose)
    try:
        pool = _pool(spec, experiment_dir)
        fs = None if experiment_dir.is_local else experiment_dir.fs
        path = str(experiment_dir.local_path) if experiment_dir.is_local else experiment_dir.path
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            tuner = tune.Tuner.restore(path, trainable=trainable_for(spec), resume_errored=True,
                                       param_space=param_space(spec), storage_filesystem=fs)
            # The restored run config holds the pickled callbacks without the pool: attach ours.
            for cb in tuner._local_tuner.get_run_config().callbacks or []:
                if hasattr(cb, "pool"):
                    cb.pool = pool
                if isinstance(cb, SweepConsole):
                    console = cb
                if isinstance(cb, GridWandbCallback) and not experiment_dir.is_local:
                    cb.dir = wandb_dir(experiment_dir, cb.run_id)  # this machine's folder
            with _tune_output(verbose), _own_staging_dir(spec.name):
                results = tuner.fit()
            num_trials, num_errors, unfinished = len(results), len(results.errors), num_unfinished(results)
        else:
            num_trials, num_errors, unfinished = len(list_trials(experiment_dir)), 0, 0
        return _finish(spec, experiment_dir, pool, num_trials=num_trials, num_errors=num_errors,
                       console=console, unfinished=unfinished)
    finally:
        _shutdown(started)


_STAGING_LOCKS: dict[str, Any] = {}  # sweep name -> this driver's locked file


def _stamp() -> str:
    return time.strftime("%Y-%m-%d_%H-%M-%S")  # Tune's staging folders are named to the second


@contextlib.contextmanager
def _own_staging_dir(name: str):
    """Tune stages a driver's files on its node in ``<session>/artifacts/<second>/<name>/``:
    two sweeps of one name started on one node within the same second would share it (and
    report each other's trials). Drivers of that name on this node take turns from here until
    Tune has named the folder (:class:`StagingDirClaimed`, a callback, releases the turn in
    its ``setup``), and each gives its turn up only once the clock has moved to the next
    second, so every driver's folder is its own. Released at the end of the block whatever
    happens."""
    import fcntl

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    fh = (Path(tempfile.gettempdir()) / f"qworld-tune-staging-{safe}.lock").open("a")
    fcntl.flock(fh, fcntl.LOCK_EX)
    _STAGING_LOCKS[name] = fh
    try:
        yield
    finally:
        release_staging_dir(name)


def release_staging_dir(name: str) -> None:
    import fcntl

    fh = _STAGING_LOCKS.pop(name, None)
    if fh is None:
        return
    # Tune took its second before this call: the next driver must start in a later one
    stamp = _stamp()
    while _stamp() == stamp:
        time.sleep(0.05)
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


def _shutdown(started: bool) -> None:
    """Stop the Ray this process started (its W&B users have finished by now)."""
    if started:
        import ray

        ray.shutdown()


def extract_sweep(experiment_dir: str | Path, methods=None, tasks=None, address=None,
                  rescore: bool = True, verbose: bool = False, last_only: bool = False) -> SweepOutcome:
    """Re-score every checkpoint of a finished sweep (``last_only``: each trial's last) with
    (new) methods, no retraining. New ``methods`` / ``tasks`` are recorded in the experiment's
    sweep file: a later ``qworld resume`` scores its new checkpoints with them."""
    import dataclasses

    experiment_dir = Location.of(experiment_dir)
    spec = load_spec_of(experiment_dir)
    extract = spec.extract
    if methods:  # the same methods for every family
        extract = dataclasses.replace(extract, methods=tuple(methods), per_algorithm={})
    if tasks is not None:
        extract = dataclasses.replace(extract, tasks=extract.tasks_named(tasks))  # a defined task by its name
    if methods:  # options of methods no longer asked for would be refused (and are unused)
        extract = dataclasses.replace(extract, options={m: o for m, o in extract.options.items() if m in extract.methods})
    spec = dataclasses.replace(spec, extract=extract)
    from qworld.sweep.spec import _validate_cells

    _validate_cells(spec)
    if methods or tasks is not None:
        _record_extract(experiment_dir, spec.extract, methods=bool(methods), tasks=tasks is not None)
    console = _console(spec, experiment_dir)
    _label_trials_from_disk(console, experiment_dir)
    started = init_ray(spec, address, experiment_dir, verbose=verbose)
    try:
        pool = _pool(spec, experiment_dir)
        checkpoints = list_checkpoints(experiment_dir)
        if last_only:  # sorted by path: a trial's last is its highest index
            checkpoints = list({trial_id: (trial_id, ckpt, steps) for trial_id, ckpt, steps in checkpoints}.values())
        for trial_id, ckpt, env_steps in checkpoints:
            pool.submit(trial_id, ckpt, env_steps, force=rescore)
        return _finish(spec, experiment_dir, pool, num_trials=len(list_trials(experiment_dir)),
                       num_errors=0, console=console)
    finally:
        _shutdown(started)


def _record_extract(experiment_dir: Location, extract, methods: bool, tasks: bool) -> None:
    """Write the methods (with their options) and / or tasks ``qworld extract`` was given into
    the experiment's sweep file, so that ``qworld resume`` (and a later ``extract``) scores
    with them too."""
    import yaml

    raw = yaml.safe_load((experiment_dir / SPEC_FILE).read_text())
    section = dict(raw.get("extract") or {})
    if methods:
        section["methods"] = list(extract.methods)
        section["options"] = {m: dict(o) for m, o in extract.options.items()}
        if not section["options"]:
            section.pop("options")
    if tasks:
        section["tasks"] = extract.tasks_as_written()
    raw["extract"] = section
    (experiment_dir / SPEC_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))


def _label_trials_from_disk(console, experiment_dir: Path) -> None:
    """Give the console each trial's grid-cell label from its params.json."""
    for trial_id, trial_dir in list_trials(experiment_dir):
        try:
            config = json.loads((trial_dir / "params.json").read_text())
        except (OSError, ValueError):
            continue
        console.remember(trial_id, config)


def _finish(spec, experiment_dir: Path, pool, num_trials: int, num_errors: int,
            console=None, unfinished: int = 0) -> SweepOutcome:
    def drain():
        for trial_id, index, scores in pool.drain():
            if scores is not None and console is not None:
                console.scored(trial_id, index, scores)

    drain()
    # Anything Tune wrote that the callback did not hand over (a resumed driver, a
    # checkpoint written while the driver died) is scored now.
    # A checkpoint whose stored rows carry another checkpoint_uid (its number was written
    # again after a rollback) is scored again, replacing the stale rows. Damaged result files
    # are set aside here (kept), so their checkpoints are scored again too.
    scored = store.scored_uids(experiment_dir, set_aside=True)
    checkpoints = _checkpoints_with_uids(experiment_dir)
    from qworld.sweep.score import checkpoint_index

    for trial_id, ckpt, env_steps, uid in checkpoints:
        key = (trial_id, checkpoint_index(ckpt))
        if key not in scored:
            pool.submit(trial_id, ckpt, env_steps)
        elif store.is_stale(scored[key], uid):
            pool.submit(trial_id, ckpt, env_steps, force=True)
    drain()
    store.conform_schema(experiment_dir)  # every fragment with the same columns, for any reader
    if spec.wandb.mode != "disabled":
        from qworld.sweep.callbacks import log_worldmodel_runs

        run_id = run_id_of(experiment_dir)
        log_worldmodel_runs(experiment_dir, spec.name, spec.wandb.project, spec.wandb_group,
                            spec.wandb.mode, run_id=run_id, dir=wandb_dir(experiment_dir, run_id))
        upload_wandb_runs(experiment_dir, run_id)
    return SweepOutcome(experiment_dir, num_trials, num_errors, len(checkpoints),
                        _num_scored(experiment_dir, checkpoints), unfinished)


def _num_scored(experiment_dir, checkpoints) -> int:
    """Keys with rows in the store, less those whose rows belong to an earlier checkpoint of
    the same number (a different ``checkpoint_uid``)."""
    from qworld.sweep.score import checkpoint_index

    scored = store.scored_uids(experiment_dir)
    on_disk = {(t, checkpoint_index(c)): uid for t, c, _, uid in checkpoints}
    return len([k for k, uid in scored.items() if not store.is_stale(uid, on_disk.get(k))])


# --------------------------------------------------------------------------------------
# reading an experiment dir (no Ray needed)


def load_spec_of(experiment_dir: str | Path | Location) -> SweepSpec:
    """The sweep file kept in an experiment (a local path or a URI), validated."""
    import dataclasses

    import yaml

    from qworld.sweep.spec import SweepSpecError, parse_sweep

    loc = Location.of(experiment_dir) / SPEC_FILE
    try:
        text = loc.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{experiment_dir} is not a qworld experiment dir (no {SPEC_FILE})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SweepSpecError(f"{loc}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{loc}: the top level must be a mapping of sections")
    return dataclasses.replace(parse_sweep(raw), source=yaml.safe_dump(raw, sort_keys=False))


def _public(loc: Location):
    """A ``Path`` on local disk (as callers have always had), the ``Location`` elsewhere."""
    return loc.local_path if loc.is_local else loc


def _first_line(loc: Location, limit: int = 1 << 20) -> str:
    """The first line of a file, reading no more of it than needed (result.json grows by a
    line per iteration; on an object store it is not downloaded whole)."""
    stream = loc.fs.open_input_stream(loc.path)
    try:
        data = b""
        while b"\n" not in data and len(data) < limit:
            chunk = stream.read(65536)
            if not chunk:
                break
            data += chunk
    finally:
        stream.close()
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def list_trials(experiment_dir: str | Path | Location) -> list:
    """(trial_id, trial dir) of every trial that reported at least once. The trial dir is a
    ``Path`` for a local experiment, a ``Location`` for one on an object store."""
    out = []
    for trial_dir in Location.of(experiment_dir).list(kind="dir"):
        try:
            first = _first_line(trial_dir / "result.json")
        except FileNotFoundError:  # not a trial dir, or nothing reported yet
            continue
        try:
            out.append((json.loads(first)["trial_id"], _public(trial_dir)))
        except (ValueError, KeyError, TypeError):  # nothing reported yet, or a line still being written
            continue
    return out


def _checkpoints_with_uids(experiment_dir) -> list[tuple[str, str, int | None, str | None]]:
    """(trial_id, checkpoint, env steps, checkpoint_uid) for every checkpoint."""
    out = []
    for trial_id, trial_dir in list_trials(experiment_dir):
        for ckpt in Location.of(trial_dir).list("checkpoint_*", kind="dir"):
            out.append((trial_id, str(ckpt), *_checkpoint_info(ckpt)))
    return out


def list_checkpoints(experiment_dir: str | Path | Location) -> list[tuple[str, str, int | None]]:
    """(trial_id, checkpoint, env steps at that checkpoint) for every checkpoint; the checkpoint
    is its local path, or its URI on an object store (``Location.of(ckpt)`` reads it; Tune's
    ``Checkpoint(Location.of(ckpt).path, Location.of(ckpt).fs)`` is it)."""
    return [(t, c, steps) for t, c, steps, _ in _checkpoints_with_uids(experiment_dir)]


def _checkpoint_info(ckpt: str | Path | Location) -> tuple[int | None, str | None]:
    """(env steps, checkpoint_uid) from a checkpoint's ``qworld_config.json``: every family
    writes both into every checkpoint (Tune's result.json does not say which iteration a
    checkpoint belongs to); (None, None) when it is unreadable."""
    try:
        config = json.loads((Location.of(ckpt) / CHECKPOINT_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(config, dict):
        return None, None
    return config.get(K.ENV_STEPS), config.get(K.CHECKPOINT_UID)


def _checkpoint_env_steps(ckpt: str | Path | Location) -> int | None:
    return _checkpoint_info(ckpt)[0]
