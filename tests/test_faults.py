"""Faults on disk and repeated kills during a live sweep (issue 12, items 6 and 9).

- A damaged results file (garbage, or a copy cut short) costs one checkpoint: every reader
  goes on with the other rows, names the file and sets it aside, and ``qworld resume``
  scores exactly that checkpoint again.
- Chaos: during one real sweep, trial workers and P-learning actors are SIGKILLed at seeded
  random moments, then the driver, then ``qworld resume``. The attempt records
  (``scoring_attempts/``) make a second scoring of a checkpoint visible.

The chaos test is a long run (marked ``long``: ``make test-long`` runs it, ``make test`` leaves
it out; every kind of kill it repeats is also tested alone in ``make test``). By default it
kills each kind twice (``QWORLD_CHAOS_KILLS=2``); ``QWORLD_CHAOS_KILLS=6 pytest
tests/test_faults.py -k chaos -s`` runs it longer and prints the figures of README's
Reliability section. It is driven by events (``live``), so the
machine's speed changes how long it takes, never what it checks.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import live
from conftest import SMOKE, SMOKE_METHODS
import pandas as pd
import pytest

from qworld import metrics as K
from qworld.layout import CHECKPOINT_CONFIG_FILE, STORE_DAMAGED_DIR
from qworld.sweep import store
from qworld.sweep.run import list_checkpoints
from qworld.sweep.score import checkpoint_index
from qworld.sweep.status import status_table

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("pinv", "column_match")
GARBAGE = b"\x00disk full\xff" * 37


def qworld(*args, timeout=live.HANG_GUARD_S, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "qworld.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qworld {args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def rows_of(trial_id: str, index: int, methods=METHODS, p_mse=0.1) -> list[dict]:
    return [{K.SWEEP: "s", K.TRIAL_ID: trial_id, K.CHECKPOINT_INDEX: index, K.METHOD: m,
             K.P_MSE: p_mse + i, K.ENV_STEPS: 256 * (index + 1)} for i, m in enumerate(methods)]


# --------------------------------------------------------------------------------------
# the store alone (no Ray)


@pytest.mark.parametrize("damage", ["garbage", "cut_short", "wrong_rows"])
def test_a_damaged_file_costs_its_checkpoint_only(tmp_path, capsys, damage):
    for index in range(3):
        store.write_rows(tmp_path, rows_of("t_00000", index))
    victim = store.write_rows(tmp_path, rows_of("t_00001", 0))
    good = victim.read_bytes()
    if damage == "garbage":
        victim.write_bytes(GARBAGE)
    elif damage == "cut_short":
        victim.write_bytes(good[: len(good) // 2])
    else:  # a whole parquet file under another key's name
        victim.write_bytes(store._key_file(tmp_path, "t_00000", 0).read_bytes())
    damaged = victim.read_bytes()

    # a reader (status, report, qa.load) names the damage and moves nothing
    assert store.scored_keys(tmp_path) == {("t_00000", i) for i in range(3)}
    assert len(store.read_store(tmp_path)) == 3 * len(METHODS)
    assert status_table(tmp_path).startswith("0 trials, 0 checkpoints, 3 scored")
    err = capsys.readouterr().err
    assert err.count(f"damaged results file {victim}") == 3 and "left in place" in err and "qworld resume" in err
    assert victim.read_bytes() == damaged and store.damaged_files(tmp_path) == []
    assert not (tmp_path / STORE_DAMAGED_DIR).exists()

    # the scoring side (resume, extract, an actor about to score it) sets it aside
    assert store.scored_keys(tmp_path, set_aside=True) == {("t_00000", i) for i in range(3)}
    err = capsys.readouterr().err
    assert f"damaged results file {victim}" in err and "moved to" in err
    kept = tmp_path / STORE_DAMAGED_DIR / victim.name
    assert store.damaged_files(tmp_path) == [kept] and kept.read_bytes() == damaged  # kept, not deleted
    assert not victim.exists()
    rows = store.read_store(tmp_path)
    assert len(rows) == 3 * len(METHODS) and set(rows[K.TRIAL_ID]) == {"t_00000"}
    assert store.read_rows(tmp_path, "t_00001", 0) is None

    # damaged again after a re-score: both damaged copies are kept
    store.write_rows(tmp_path, rows_of("t_00001", 0))
    assert store.is_scored(tmp_path, "t_00001", 0)
    victim.write_bytes(GARBAGE)
    assert not store.is_scored(tmp_path, "t_00001", 0, set_aside=False) and victim.exists()
    assert not store.is_scored(tmp_path, "t_00001", 0)  # asked before scoring: set aside
    assert len(store.damaged_files(tmp_path)) == 2 and not victim.exists()


def test_a_failed_write_leaves_the_old_rows_and_no_partial_file(tmp_path):
    target = store.write_rows(tmp_path, rows_of("t_00000", 0, p_mse=0.5))

    def disk_full(fh):
        fh.write(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store._write_atomic(target, disk_full)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no .tmp left behind

    def fsync_fails(fd):  # the disk fills up while the whole file is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync_fails)
        with pytest.raises(OSError, match="No space left"):
            store.write_rows(tmp_path, rows_of("t_00000", 0, p_mse=0.7))
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert store.read_rows(tmp_path, "t_00000", 0)[K.P_MSE].tolist() == [0.5, 1.5]


def test_attempt_records_show_every_scoring(tmp_path):
    first = store.begin_attempt(tmp_path, "t_00000", 3, "/x/checkpoint_000003")
    store.write_rows(tmp_path, rows_of("t_00000", 3), attempt=first)
    store.end_attempt(tmp_path, "t_00000", 3, first, 2)
    killed = store.begin_attempt(tmp_path, "t_00000", 4)  # its process dies here
    second = store.begin_attempt(tmp_path, "t_00000", 3, force=True)
    store.write_rows(tmp_path, rows_of("t_00000", 3), attempt=second)
    store.end_attempt(tmp_path, "t_00000", 3, second, 2)
    attempts = store.read_attempts(tmp_path)
    assert list(attempts["attempt"]) == [first, killed, second]
    assert (attempts["pid"] == os.getpid()).all()
    assert attempts.set_index("attempt")["finished"].isna().to_dict() == {first: False, killed: True, second: False}
    assert attempts.set_index("attempt")["force"].to_dict() == {first: False, killed: False, second: True}
    assert store.fragment_attempt(tmp_path, "t_00000", 3) == second  # the rows name their attempt
    assert store.fragment_attempt(tmp_path, "t_00000", 4) is None
    # one small file per event, none appended to (object stores cannot append)
    names = sorted(p.name for p in store.attempts_path(tmp_path).iterdir())
    assert len(names) == 5 and all(n.endswith(("-begin.json", "-end.json")) for n in names)
    # an older experiment's JSON-lines record, with a line cut short by a kill, still reads
    old = store.attempts_path(tmp_path) / "trial=t_00000-ckpt=000009-20250101T000000-1-abcdef01.jsonl"
    old.write_text(json.dumps({"event": "started", "attempt": "20250101T000000-1-abcdef01", K.TRIAL_ID: "t_00000",
                               K.CHECKPOINT_INDEX: 9, "pid": 1, "time": 1.0}) + '\n{"event": "fini')
    back = store.read_attempts(tmp_path).set_index("attempt")
    assert back.loc[killed, K.CHECKPOINT_INDEX] == 4
    assert back.loc["20250101T000000-1-abcdef01", K.CHECKPOINT_INDEX] == 9
    assert pd.isna(back.loc["20250101T000000-1-abcdef01", "finished"])


# --------------------------------------------------------------------------------------
# a real sweep: damaged file -> status, load, resume


@pytest.fixture(scope="module")
def smoke_dir(smoke_experiment) -> Path:
    """conftest's session smoke sweep: copied before it is damaged."""
    return smoke_experiment.path


@pytest.mark.ray
def test_damaged_fragment_of_a_real_sweep_is_set_aside_and_rescored(smoke_dir, tmp_path, capsys):
    import qworld_analysis as qa

    work = tmp_path / "smoke"
    shutil.copytree(smoke_dir, work)
    before = store.read_store(work)
    keys = sorted(set(zip(before[K.TRIAL_ID], before[K.CHECKPOINT_INDEX])))
    assert len(keys) == 4
    trial_id, index = keys[1]
    victim = store._key_file(work, trial_id, index)
    attempts_before = set(store.read_attempts(work)["attempt"])

    def damage():
        victim.write_bytes(GARBAGE)
        for kept in store.damaged_files(work):
            kept.unlink()  # test bookkeeping: each reader meets the damage afresh

    readers = {
        "read_store": lambda: len(store.read_store(work)),
        "qa.load": lambda: len(qa.load(work)),
        "status_table": lambda: status_table(work).splitlines()[0],
    }
    for name, read in readers.items():  # readers name the damage and move nothing
        damage()
        out = read()
        err = capsys.readouterr().err
        assert str(victim) in err and "left in place" in err and victim.read_bytes() == GARBAGE, name
        assert store.damaged_files(work) == [], name
        assert out in (3 * len(SMOKE_METHODS), "2 trials, 4 checkpoints, 3 scored"), (name, out)
    proc = qworld("status", work)
    assert proc.stdout.startswith("2 trials, 4 checkpoints, 3 scored") and str(victim) in proc.stderr
    assert "Traceback" not in proc.stderr and victim.read_bytes() == GARBAGE  # status is read-only

    qworld("resume", work)
    after = store.read_store(work)
    varying = [K.FIT_SECONDS, K.CHECKPOINT_PATH]  # timing; the copy's path for the re-scored one
    pd.testing.assert_frame_equal(  # the same Q scored again: the same rows, nothing lost
        after.drop(columns=varying, errors="ignore"),
        before.drop(columns=varying, errors="ignore"), check_like=True, rtol=1e-9)
    new = store.read_attempts(work)
    new = new[~new["attempt"].isin(attempts_before)]
    assert list(zip(new[K.TRIAL_ID], new[K.CHECKPOINT_INDEX])) == [(trial_id, index)]  # exactly that one
    assert new["finished"].notna().all()
    assert store.damaged_files(work)[0].read_bytes() == GARBAGE


# --------------------------------------------------------------------------------------
# chaos: repeated kills during one live sweep, then the driver, then resume

KINDS = {"trial worker": "ray::PQN", "P-learning actor": "ray::PLearningActor"}


@pytest.mark.ray
@pytest.mark.long  # `make test-long`: each kind of kill alone is in `make test` (test_sweep_run, test_cluster)
def test_chaos_repeated_kills_then_driver_kill_and_resume(tmp_path):
    """Driven by events, not the clock: the sweep's budget is unbounded, so it is running at
    every kill on any machine; each kill waits for a checkpoint newer than the last kill;
    the resumed sweep is ended by Ctrl-C once every trial has trained past where the killed
    driver left it."""
    kills_per_kind = int(os.environ.get("QWORLD_CHAOS_KILLS", "2"))
    seed = int(os.environ.get("QWORLD_CHAOS_SEED", "0"))
    rng = random.Random(seed)
    storage = tmp_path / "storage"
    experiment = storage / "smoke"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qworld.cli", "sweep", str(SMOKE), "--storage", str(storage),
           "--set", f"stop.env_steps={live.UNBOUNDED}", "--set", "checkpoint.every=2",
           "--set", f"resources.max_failures={kills_per_kind + 2}", "--set", "wandb.mode=disabled"]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    plan = [kind for kind in KINDS for _ in range(kills_per_kind)]
    rng.shuffle(plan)
    killed: dict[str, list[int]] = {kind: [] for kind in KINDS}
    dead_at_driver_kill: list[int] = []
    started = time.time()
    try:
        seen = set()
        for kind in plan + ["driver"]:
            # the next kill comes after a checkpoint newer than the last one
            seen = live.wait_until(lambda: (now := live.checkpoint_dirs(experiment)) - seen and now,
                                   driver, f"a new checkpoint before killing a {kind}")
            if kind == "driver":
                break
            pids = live.wait_until(lambda: live.pids_of(KINDS[kind], driver.pid), driver, f"a {kind} to kill")
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            killed[kind].append(victim)
        dead_at_driver_kill = [p.pid for p in live.descendants(driver.pid)]
        live.kill_tree(driver)  # the driver; its Ray goes with it
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
    before_resume = time.time() - started
    steps_at_kill = live.trial_steps(experiment)
    assert len(steps_at_kill) == 2, steps_at_kill

    resume_log = (tmp_path / "resume.log").open("w")
    resumed = subprocess.Popen([sys.executable, "-m", "qworld.cli", "resume", str(experiment)], cwd=ROOT,
                               env=env, stdout=resume_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        live.wait_until(lambda: all(live.trial_steps(experiment).get(t, 0) > s for t, s in steps_at_kill.items()),
                        resumed, "every trial trained past where the killed driver left it")
        live.interrupt(resumed)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
            resumed.wait()
        resume_log.close()
    resume_out = (tmp_path / "resume.log").read_text()
    # the message shows the traceback itself: RLlib's LearnerGroup.__del__ printed one here once
    # in ~46 runs, and the tail of the log did not reach it
    assert "Traceback" not in resume_out, resume_out[max(0, resume_out.find("Traceback") - 1500):][:6000]

    # every checkpoint on disk: one row per method, nothing else, env_steps of its checkpoint
    rows = store.read_store(experiment)
    checkpoints = {(t, checkpoint_index(c)): c for t, c, _ in list_checkpoints(experiment)}
    keys = set(zip(rows[K.TRIAL_ID], rows[K.CHECKPOINT_INDEX]))
    assert keys == set(checkpoints), (sorted(keys ^ set(checkpoints)), resume_out[-3000:])
    duplicates = rows.duplicated([K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD]).sum()
    assert duplicates == 0
    per_key = rows.groupby([K.TRIAL_ID, K.CHECKPOINT_INDEX])[K.METHOD].apply(sorted)
    assert all(list(m) == sorted(SMOKE_METHODS) for m in per_key), per_key[per_key.map(len) != len(SMOKE_METHODS)]
    assert rows[K.ERROR].isna().all(), rows[K.ERROR].dropna().tolist()
    wrong_steps = [(t, i, s, live.checkpoint_steps(checkpoints[(t, i)]))
                   for t, i, s in zip(rows[K.TRIAL_ID], rows[K.CHECKPOINT_INDEX], rows[K.ENV_STEPS])
                   if s != live.checkpoint_steps(checkpoints[(t, i)])]
    assert not wrong_steps, wrong_steps

    # scored once: one finished attempt per checkpoint as it is on disk (its uid), the one
    # whose rows are stored; a checkpoint number the resumed trial wrote again (rolled back
    # to an earlier checkpoint by the driver kill) has a new uid and is scored again, once.
    # Any attempt that did not finish was cut short by a kill (its process is one we killed).
    attempts = store.read_attempts(experiment)
    finished = attempts[attempts["finished"].notna()]
    uids = {key: live.checkpoint_uid(ckpt) for key, ckpt in checkpoints.items()}
    assert all(uids.values())
    assert (rows.groupby([K.TRIAL_ID, K.CHECKPOINT_INDEX])[K.CHECKPOINT_UID].first().to_dict() == uids)
    per_uid = finished.groupby([K.TRIAL_ID, K.CHECKPOINT_INDEX, K.CHECKPOINT_UID]).size()
    assert (per_uid == 1).all(), per_uid[per_uid > 1]
    current = {(t, i, uids[(t, i)]) for t, i in checkpoints}
    assert current <= set(per_uid.index)
    rescored = len(per_uid) - len(current)  # rows of overwritten checkpoints, since replaced
    for (trial_id, index), uid in uids.items():
        [attempt] = finished[(finished[K.TRIAL_ID] == trial_id) & (finished[K.CHECKPOINT_INDEX] == index)
                             & (finished[K.CHECKPOINT_UID] == uid)]["attempt"]
        assert store.fragment_attempt(experiment, trial_id, index) == attempt
    cut_short = attempts[attempts["finished"].isna()]
    killed_pids = set(killed["P-learning actor"]) | set(dead_at_driver_kill)
    assert set(cut_short["pid"]) <= killed_pids, cut_short
    assert not attempts["force"].any()

    figures = {
        "seed": seed, **{f"{kind} kills": len(pids) for kind, pids in killed.items()}, "driver kills": 1,
        "env steps per trial at the driver kill": sorted(steps_at_kill.values()),
        "checkpoints": len(checkpoints), "rows": len(rows), "duplicates": int(duplicates),
        "lost": len(set(checkpoints) - keys), "attempts": len(attempts),
        "attempts cut short by a kill": len(cut_short), "checkpoints rewritten after the rollback": rescored,
        "seconds until resume": round(before_resume), "seconds in all": round(time.time() - started),
    }
    print("chaos figures:", json.dumps(figures))
    assert all(len(pids) == kills_per_kind for pids in killed.values())


# --------------------------------------------------------------------------------------
# a replay family's trial killed: restored with its replay buffer

MRQ_AGENT = ("{algorithm: mrq, num_envs: 4, rollout_length: 16, batch_size: 32, updates_per_iteration: 2, "
             "learning_starts: 64, zs_dim: 16, za_dim: 8, zsa_dim: 16, enc_hidden: [32], value_hidden: [32], "
             "num_bins: 17}")


@pytest.mark.ray
def test_a_killed_replay_trial_resumes_with_its_buffer(tmp_path):
    """An MR.Q trial's worker is SIGKILLed once a checkpoint of it is on disk and the trial has
    trained past it (so Tune holds that checkpoint); Tune restores the trial from it, and the
    restored trial's first result reports the buffer it had: ``replay/size`` equals the env
    steps sampled in every result (no wrap at the default capacity), also the first after the
    restart (an empty buffer would hold that one iteration's 64 steps). Driven by events,
    like the chaos test above; one cell, so a minute or so."""
    storage = tmp_path / "storage"
    experiment = storage / "smoke"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qworld.cli", "sweep", str(SMOKE), "--storage", str(storage),
           "--set", f"stop.env_steps={live.UNBOUNDED}", "--set", "checkpoint.every=2",
           "--set", "resources.max_failures=2", "--set", "wandb.mode=disabled",
           "--set", f"agent={MRQ_AGENT}", "--set", "sweep.variant=[windy]"]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def steps(row: dict) -> int:
        return row["env_runners"]["num_env_steps_sampled_lifetime"]

    def after_restore(rows: list[dict]) -> list[dict]:
        return [r for r in rows if r.get("iterations_since_restore") == 1 and r["training_iteration"] > 1]

    try:
        ckpt = live.wait_until(lambda: sorted(live.checkpoint_dirs(experiment)), driver, "a checkpoint of the trial")[0]
        trial = ckpt.parent
        saved = live.checkpoint_steps(ckpt)
        live.wait_until(lambda: any(steps(r) > saved for r in live.result_rows(trial)), driver,
                        "a result after the checkpoint")
        for worker in live.wait_until(lambda: live.pids_of("ray::MRQ", driver.pid), driver, "the MR.Q trial worker"):
            os.kill(worker, signal.SIGKILL)
        live.wait_until(lambda: after_restore(live.result_rows(trial)), driver, "a result of the restored trial")
        live.interrupt(driver)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
    rows = live.result_rows(trial)
    [first] = after_restore(rows)[:1]
    assert steps(first) > 64 and first["replay"]["size"] == steps(first), first["replay"]
    assert all(r["replay"]["size"] == steps(r) for r in rows), [(r["replay"]["size"], steps(r)) for r in rows]
