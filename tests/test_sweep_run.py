"""Sweeps end to end with a real Ray, real checkpoints, real parquet and real W&B run files.

Each sweep runs as the user runs it (`python -m qworld.cli sweep ...` in a subprocess with
its own local Ray), so killing its driver is a real kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import live
from conftest import SMOKE, SMOKE_METHODS
import pandas as pd
import pytest

from qworld import metrics as K
from qworld.sweep import store
from qworld.sweep.location import Location
from qworld.sweep.run import run_id_of
from qworld.sweep.run import list_checkpoints, list_trials, load_spec_of
from qworld.sweep.score import checkpoint_index, score_checkpoint

ROOT = Path(__file__).resolve().parents[1]
METHODS = SMOKE_METHODS

pytestmark = pytest.mark.ray


def qworld(*args, timeout=600, check=True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "qworld.cli", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"qworld {args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def assert_scored_once(experiment_dir: Path, methods=METHODS) -> pd.DataFrame:
    """Every checkpoint on disk has exactly one row per method, and nothing else is there."""
    rows = store.read_store(experiment_dir)
    steps_on_disk = {(t, checkpoint_index(c)): s for t, c, s in list_checkpoints(experiment_dir)}
    on_disk = set(steps_on_disk)
    assert on_disk, "no checkpoints were written"
    keys = set(zip(rows[K.TRIAL_ID], rows[K.CHECKPOINT_INDEX]))
    assert keys == on_disk
    # each row was scored from its own checkpoint: its env_steps are the checkpoint's
    for (trial_id, index, steps) in zip(rows[K.TRIAL_ID], rows[K.CHECKPOINT_INDEX], rows[K.ENV_STEPS]):
        assert steps_on_disk[(trial_id, index)] is not None and steps == steps_on_disk[(trial_id, index)], \
            (trial_id, index, steps, steps_on_disk[(trial_id, index)])
    per_key = rows.groupby([K.TRIAL_ID, K.CHECKPOINT_INDEX])[K.METHOD].apply(sorted)
    assert all(list(m) == sorted(methods) for m in per_key), per_key
    assert len(rows) == len(on_disk) * len(methods)
    return rows


@pytest.fixture(scope="module")
def smoke_dir(smoke_experiment) -> Path:
    """conftest's session smoke sweep (W&B offline): read it, or copy it before changing it."""
    return smoke_experiment.path


def test_console_is_a_short_progress_view_ending_in_the_final_table(smoke_experiment):
    experiment_dir, out, err = smoke_experiment.path, smoke_experiment.stdout, smoke_experiment.stderr
    for text in (out, err):
        assert "Traceback" not in text and "ConnectionResetError" not in text
    # none of Tune's / RLlib's tables: per-trial config tables, progress tables, boxes
    for marker in ("started with configuration", "Configuration for experiment", "Trial status",
                   "│", "╭", "new API stack", "WARNING", "Checkpoint successfully created"):
        assert marker not in out + err, marker
    lines = out.splitlines()
    assert len(lines) + len(err.splitlines()) < 60, out + err
    # header: the sweep, its trials, where results go
    assert lines[0].startswith("qworld sweep smoke: 2 trials") and f"results -> {experiment_dir}" in out
    trial_ids = {t for t, _ in list_trials(experiment_dir)}
    for trial_id in trial_ids:  # one line per event
        assert any(f"trial {trial_id} started" in ln for ln in lines)
        assert any(f"trial {trial_id}" in ln and "finished: 8 iterations, 2,048 env steps" in ln for ln in lines)
        assert sum(f"scored {trial_id}" in ln and "q_nmse" in ln and "p_mse pinv" in ln for ln in lines) == 2
    # the final table: one block per grid cell, one row per method, plan success per task
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Final checkpoints"))
    header = lines[start + 1].split()
    assert header == ["variant", "seeds", "env_steps", "q_nmse", "method", "p_mse", "corner_9_9_doorway"]
    rows = lines[start + 2:start + 2 + 2 * len(METHODS)]
    assert [r.split()[0] for r in rows] == ["deterministic", *METHODS[1:], "windy", *METHODS[1:]]
    assert rows[0].split()[4] == "pinv" and rows[0].split()[1:3] == ["1", "2,048"]


def test_sweep_help_keeps_a_verbose_flag():
    proc = qworld("sweep", "--help")
    assert "--verbose" in proc.stdout and "Tune" in proc.stdout


def test_smoke_sweep_scores_every_checkpoint_once(smoke_dir):
    rows = assert_scored_once(smoke_dir)
    trials = list_trials(smoke_dir)
    assert len(trials) == 2  # the two grid cells of smoke.yaml
    assert set(rows[K.VARIANT]) == {"deterministic", "windy"}
    assert (rows[K.NUM_GOALS] == 8).all()
    assert rows[K.ERROR].isna().all(), rows[K.ERROR].dropna().tolist()
    for col in (K.P_MSE, K.P_TV, K.Q_NMSE, K.M_RANK, K.ENV_STEPS):
        assert rows[col].notna().all(), col
    # each row's p_mse is that of its own stored model against its own variant's true P (a
    # range check could not fail: any row-stochastic P_hat scores in [0, 1))
    import numpy as np
    from qworld_analysis import load_world_model
    from qworld_envs import make_finite_problem
    from tolerances import float32_mse_atol

    for _, row in rows.iterrows():
        P_hat = load_world_model(smoke_dir, row[K.TRIAL_ID], int(row[K.CHECKPOINT_INDEX]), row[K.METHOD])
        P = make_finite_problem("qworld/FourRooms-v0", variant=row[K.VARIANT]).mdp.P
        # the row scored the float64 model, the store keeps float32 (tolerances.float32_mse_atol)
        assert row[K.P_MSE] == pytest.approx(np.mean((P_hat - P) ** 2), rel=0, abs=float32_mse_atol(P_hat, P))
    assert "corner_9_9_doorway/plan_success" in rows.columns
    # env steps grow with the checkpoint index within each trial
    for _, g in rows[rows[K.METHOD] == "pinv"].groupby(K.TRIAL_ID):
        assert g.sort_values(K.CHECKPOINT_INDEX)[K.ENV_STEPS].is_monotonic_increasing


def read_wandb_run(run_dir: Path) -> list[dict]:
    """Every record of an offline run, read back with wandb's own reader."""
    wandb_bin = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=live.HANG_GUARD_S, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_runs_hold_the_logged_keys(smoke_dir):
    runs = sorted((smoke_dir / "wandb").glob("offline-run-*"))
    trial_ids = {t for t, _ in list_trials(smoke_dir)}
    training, worldmodel = {}, {}
    exit_codes = {}
    for run_dir in runs:
        records = read_wandb_run(run_dir)
        [wandb_file] = run_dir.glob("run-*.wandb")
        assert wandb_file.stat().st_size > 0
        exit_codes[run_dir.name] = [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"]
        [run] = [r["run"] for r in records if r["type"] == "run"]
        history = set()
        for r in records:
            if r["type"] == "history":
                history.update(r["history"]["item"])
        assert run["run_group"] == "smoke"
        assert any(t.startswith("variant=") for t in run["tags"]), run["tags"]
        # ids carry the experiment's run id: sweeps never resume each other's W&B runs
        prefix = f"{run_id_of(Location.of(smoke_dir))}-"
        assert run["run_id"].startswith(prefix) and len(prefix) > 8, run["run_id"]
        run_id = run["run_id"].removeprefix(prefix)
        if run_id.endswith("-worldmodel"):
            worldmodel[run_id.removesuffix("-worldmodel")] = history
        else:
            training[run_id] = history
    assert set(training) == trial_ids  # one training run per trial
    assert set(worldmodel) == trial_ids  # and one world-model run per trial
    # every run was finished (its exit record written), none cut off at teardown
    assert all(codes == [0] for codes in exit_codes.values()), exit_codes
    for keys in training.values():
        assert {K.TRAIN_ENV_STEPS, K.TRAIN_LOSS, K.TRAIN_EPSILON} <= keys, sorted(keys)
    for keys in worldmodel.values():
        assert {f"pinv/{K.P_MSE}", f"column_match/{K.P_MSE}", K.ENV_STEPS} <= keys, sorted(keys)


def test_a_second_sweep_into_an_experiment_is_refused_before_ray(smoke_dir):
    before = sorted(p.name for p in smoke_dir.iterdir())
    spec_before = (smoke_dir / "sweep.yaml").read_text()
    proc = qworld("sweep", SMOKE, "--storage", smoke_dir.parent, "--set", "stop.env_steps=4096", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "already holds an experiment" in proc.stderr and f"qworld resume {smoke_dir}" in proc.stderr
    assert sorted(p.name for p in smoke_dir.iterdir()) == before  # nothing touched
    assert (smoke_dir / "sweep.yaml").read_text() == spec_before


def test_load_q_reads_a_checkpoint_on_object_storage(smoke_dir, s3_bucket):
    """A checkpoint copied to S3 loads from its URI (through a temporary local copy that is
    removed afterwards) to the same Q as from disk."""
    import glob
    import tempfile

    import numpy as np
    import pyarrow.fs as pafs

    from qworld.agents import load_q

    [(_, ckpt, _), *_] = list_checkpoints(smoke_dir)
    loc = Location.of(f"{s3_bucket}/copy/{Path(ckpt).name}")
    pafs.copy_files(str(ckpt), loc.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=loc.fs)
    temps_before = set(glob.glob(f"{tempfile.gettempdir()}/qworld-ckpt-*"))
    from_s3, from_disk = load_q(loc.uri), load_q(ckpt)
    np.testing.assert_array_equal(from_s3.q_table(), from_disk.q_table())
    assert set(glob.glob(f"{tempfile.gettempdir()}/qworld-ckpt-*")) == temps_before


def test_status_and_rescore_without_duplicates(smoke_dir, tmp_path):
    work = tmp_path / "smoke"
    shutil.copytree(smoke_dir, work)
    out = qworld("status", work).stdout
    assert "2 trials" in out and "scored" in out
    before = store.read_store(work)
    qworld("extract", work, "--methods", "pinv", "column_match", "sparse_search")
    after = assert_scored_once(work, methods=("pinv", "column_match", "sparse_search"))
    # recorded: a later resume (or extract without --methods) scores with them too
    assert load_spec_of(work).extract.methods == ("pinv", "column_match", "sparse_search")
    merged = before.merge(after, on=[K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD], suffixes=("", "_new"))
    assert (merged[K.P_MSE] - merged[f"{K.P_MSE}_new"]).abs().max() < 1e-12  # same Q, same P^
    # --last: a new method on each trial's last checkpoint only, the other rows kept
    qworld("extract", work, "--last", "--methods", "known_support")
    rows = store.read_store(work)
    oracle = rows[rows[K.METHOD] == "known_support"]
    last = rows.groupby(K.TRIAL_ID)[K.CHECKPOINT_INDEX].max()
    assert sorted(oracle[K.TRIAL_ID]) == sorted(last.index)
    assert (oracle.set_index(K.TRIAL_ID)[K.CHECKPOINT_INDEX] == last).all()
    # a checkpoint's rows are its latest scoring: the earlier checkpoints keep theirs
    earlier = after[after[K.CHECKPOINT_INDEX] < after[K.TRIAL_ID].map(last)]
    kept = rows[rows[K.CHECKPOINT_INDEX] < rows[K.TRIAL_ID].map(last)]
    assert len(earlier) > 0 and len(kept) == len(earlier)


def test_corrupt_checkpoint_gives_an_error_row_and_the_rest_are_scored(smoke_dir, tmp_path):
    work = tmp_path / "smoke"
    shutil.copytree(smoke_dir, work)
    trial_id, victim, _ = list_checkpoints(work)[0]
    for f in Path(victim).rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    direct = score_checkpoint(victim, sweep="smoke", trial_id=trial_id, methods=METHODS)
    assert direct[0][K.METHOD] == K.LOAD_METHOD and direct[0][K.ERROR]
    qworld("extract", work)
    rows = store.read_store(work)
    bad = rows[(rows[K.TRIAL_ID] == trial_id) & (rows[K.CHECKPOINT_INDEX] == checkpoint_index(victim))]
    assert list(bad[K.METHOD]) == [K.LOAD_METHOD] and bad[K.ERROR].notna().all()
    good = rows[rows[K.METHOD] != K.LOAD_METHOD]
    assert good[K.ERROR].isna().all() and len(good) == (len(list_checkpoints(work)) - 1) * len(METHODS)


def test_killed_plearning_actor_restarts_and_scores_each_checkpoint_once(smoke_dir, tmp_path, ray_session):
    import ray

    from qworld.sweep.plearn_actor import PLearningPool

    work = tmp_path / "smoke"
    shutil.copytree(smoke_dir, work)
    shutil.rmtree(store.store_path(work))
    pool = PLearningPool(work, "smoke-kill", METHODS, size=1)
    pid_before = ray.get(pool.actors[0].pid.remote())
    for trial_id, ckpt, steps in list_checkpoints(work):
        pool.submit(trial_id, ckpt, steps)
    os.kill(pid_before, signal.SIGKILL)  # mid-queue: the first score is running or queued
    pool.drain(timeout=live.HANG_GUARD_S)
    assert not pool.pending
    assert ray.get(pool.actors[0].pid.remote()) != pid_before  # it was restarted
    assert_scored_once(work)
    ray.kill(pool.actors[0], no_restart=True)


def test_killed_trial_worker_is_retried_and_trains_on(tmp_path):
    """The worker is killed after a checkpoint of a sweep that cannot end on its own (so it
    is running, on any machine); Tune retries it from that checkpoint, it trains past it,
    and the test ends the sweep (Ctrl-C), after which every checkpoint is scored once."""
    storage = tmp_path / "storage"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qworld.cli", "sweep", str(SMOKE), "--storage", str(storage),
           "--set", f"stop.env_steps={live.UNBOUNDED}", "--set", "sweep.variant=[windy]",
           "--set", "wandb.mode=disabled"]
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    experiment = storage / "smoke"
    try:
        live.wait_until(lambda: live.checkpoint_dirs(experiment), proc, "a first checkpoint")
        victims = live.wait_until(lambda: live.pids_of("ray::PQN", proc.pid), proc, "a trial worker")
        steps_at_kill = max(live.trial_steps(experiment).values())
        os.kill(victims[0], signal.SIGKILL)
        live.wait_until(lambda: max(live.trial_steps(experiment).values()) > steps_at_kill
                        and list(experiment.glob("*/error.txt")), proc, "a checkpoint of the retried trial")
        rc = live.interrupt(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    # Ctrl-C is no success: exit 130, the scores so far and how to go on
    out = (tmp_path / "driver.log").read_text()
    assert rc == 130, out[-2000:]
    assert "trials: 1 (0 errored)" in out and "interrupted: 1 of 1 trials did not finish" in out
    assert f"qworld resume {experiment}" in out
    [(trial_id, trial_dir)] = list_trials(experiment)
    # Tune's own record of the retry (the console's "(0 errored)" says nothing of it)
    assert "Failure # 1" in (trial_dir / "error.txt").read_text()
    rows = assert_scored_once(experiment)
    assert rows[K.ENV_STEPS].max() > steps_at_kill


def test_killed_driver_resumes_without_retraining_finished_trials(tmp_path):
    """One trial at a time. The second trial's worker is frozen (SIGSTOP) as soon as it
    appears, so it cannot finish, however fast the machine; once Tune's saved state records
    the first as finished, the driver and everything it started are killed; then resume."""
    storage = tmp_path / "storage"
    budget = 4096  # 16 iterations, a checkpoint every 4: the frozen worker, not the budget, holds the race
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "qworld.cli", "sweep", str(SMOKE), "--storage", str(storage),
           "--set", f"stop.env_steps={budget}", "--set", "resources.max_concurrent_trials=1",
           "--set", "checkpoint.every=4", "--set", "wandb.mode=disabled"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    experiment = storage / "smoke"

    def finished_trials():
        return {trial_id: len(rows) for trial_id, trial_dir in list_trials(experiment)
                if (rows := live.result_rows(trial_dir)) and rows[-1][K.TRAIN_ENV_STEPS] >= budget}

    def first_trial_pids():
        return {r.get("pid") for _, trial_dir in list_trials(experiment) for r in live.result_rows(trial_dir)}

    try:
        first = live.wait_until(lambda: set(live.pids_of("ray::PQN", proc.pid)), proc, "the first trial's worker")
        second = live.wait_until(lambda: set(live.pids_of("ray::PQN", proc.pid)) - first - first_trial_pids(),
                                 proc, "the second trial's worker")
        for pid in second:
            os.kill(pid, signal.SIGSTOP)
        live.wait_until(lambda: live.terminated_trials(experiment), proc, "a trial recorded as finished")
        finished_before = finished_trials()
        assert set(finished_before) == live.terminated_trials(experiment)
    finally:
        live.kill_tree(proc)  # the driver and the local Ray it started, the frozen worker too
    assert len(finished_before) == 1, finished_before
    qworld("resume", experiment)
    trials = dict(list_trials(experiment))
    assert len(trials) == 2
    for trial_id, trial_dir in trials.items():
        rows = live.result_rows(trial_dir)
        assert rows[-1][K.TRAIN_ENV_STEPS] >= budget  # every trial ran to the end
        if trial_id in finished_before:  # finished trials were not retrained
            assert len(rows) == finished_before[trial_id]
    assert_scored_once(experiment)
