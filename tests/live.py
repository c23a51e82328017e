"""Driving a live sweep from a test by its events, never by the clock (imported as ``live``).

A test that needs a sweep to be *running* when it acts (kills a worker, kills the driver)
does not size a budget for this machine and hope: the sweep's budget is ``UNBOUNDED``, every
action waits for an event on disk (a checkpoint, a finished trial, a process), and the test
ends the sweep itself (:func:`interrupt`: Ctrl-C, after which qworld scores everything on
disk). Waits have no deadline of their own; they stop early only when the driver exits,
and ``HANG_GUARD_S`` exists only to turn a hang into a failure: no run on any machine comes
near it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from qworld import metrics as K
from qworld.layout import CHECKPOINT_CONFIG_FILE

UNBOUNDED = 10**12  # env steps: a trial never ends on its own; the test ends it
HANG_GUARD_S = 1800.0
POLL_S = 0.05


def wait_until(predicate: Callable[[], object], driver: subprocess.Popen | None, what: str,
               poll: float = POLL_S):
    """Poll ``predicate`` until it returns something truthy (returned). Fails at once if the
    driver exits first (the event can no longer come)."""
    started = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the sweep exited ({driver.returncode}) before {what}")
        if time.monotonic() - started > HANG_GUARD_S:
            raise AssertionError(f"hung: no {what} after {HANG_GUARD_S:.0f} s")
        time.sleep(poll)


def descendants(root: int) -> list:
    import psutil

    try:
        return psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def pids_of(pattern: str, root: int) -> list[int]:
    """This driver's own processes whose command line holds ``pattern`` (never another
    sweep's on the same machine)."""
    import psutil

    out = []
    for proc in descendants(root):
        try:
            text = " ".join(proc.cmdline() or []) + " " + (proc.name() or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if pattern in text:
            out.append(proc.pid)
    return sorted(out)


def checkpoint_dirs(experiment: Path) -> set[Path]:
    """Checkpoints whose config has landed (the last file a family writes)."""
    return {c.parent for c in Path(experiment).glob(f"*/checkpoint_*/{CHECKPOINT_CONFIG_FILE}")}


def checkpoint_steps(ckpt: Path) -> int | None:
    try:
        return json.loads((Path(ckpt) / CHECKPOINT_CONFIG_FILE).read_text())[K.ENV_STEPS]
    except (OSError, ValueError, KeyError):
        return None


def checkpoint_uid(ckpt: Path) -> str | None:
    try:
        return json.loads((Path(ckpt) / CHECKPOINT_CONFIG_FILE).read_text())[K.CHECKPOINT_UID]
    except (OSError, ValueError, KeyError):
        return None


def trial_steps(experiment: Path) -> dict[Path, int]:
    """Trial dir -> the most env steps of any of its checkpoints."""
    out: dict[Path, int] = {}
    for ckpt in checkpoint_dirs(experiment):
        steps = checkpoint_steps(ckpt) or 0
        out[ckpt.parent] = max(out.get(ckpt.parent, 0), steps)
    return out


def result_rows(trial_dir: Path) -> list[dict]:
    rows = []
    try:
        lines = (Path(trial_dir) / "result.json").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line Tune is still writing
            pass
    return rows


def interrupt(driver: subprocess.Popen) -> int:
    """Ctrl-C to the driver alone (Tune stops its trials and saves its state; qworld scores
    what is on disk), then wait for it to exit; returns its exit code."""
    os.kill(driver.pid, signal.SIGINT)
    started = time.monotonic()
    while driver.poll() is None:
        if time.monotonic() - started > HANG_GUARD_S:
            driver.kill()
            raise AssertionError("hung: the sweep did not exit after Ctrl-C")
        time.sleep(POLL_S)
    return driver.returncode


def kill_tree(driver: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its local Ray), nothing else."""
    import psutil

    tree = descendants(driver.pid)
    if driver.poll() is None:
        os.kill(driver.pid, signal.SIGKILL)
    for proc in tree:  # all at once, as a crash of its machine would: a frozen (SIGSTOP) worker too
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    driver.wait()
    psutil.wait_procs(tree, timeout=HANG_GUARD_S)


def terminated_trials(experiment: Path) -> set[str]:
    """Trial ids Tune's saved experiment state records as finished (what ``qworld resume``
    will not run again), from the newest ``experiment_state-*.json``."""
    states = sorted(Path(experiment).glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
        trials = [json.loads(trial_state) for trial_state, _ in data["trial_data"]]
    except (OSError, ValueError, KeyError, TypeError):  # being written
        return set()
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}
