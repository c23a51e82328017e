"""Submission to a running Ray cluster, as the README documents it:

    ray start --head ...
    ray job submit --working-dir . -- qworld sweep tune_configs/smoke.yaml --storage /shared/...
    ray stop

The head runs on this machine, bound to loopback, with its own temp dir, ports and auth
token, so it never touches another Ray on the machine; it is stopped by killing exactly the
processes of that temp dir (``ray stop`` would stop every Ray here, the test session's too).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import live
from conftest import SMOKE, SMOKE_METHODS
import pytest

from qworld import metrics as K
from qworld.layout import CHECKPOINT_CONFIG_FILE
from qworld.sweep import store
from qworld.sweep.run import list_checkpoints, list_trials

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ray


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(args: list[str], env: dict) -> None:
    """``ray start ...``; a failure shows Ray's own words (its stderr), not only an exit code."""
    proc = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True,
                          timeout=live.HANG_GUARD_S)
    assert proc.returncode == 0, f"ray start {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _kill_cluster(temp_dir: Path) -> None:
    """SIGKILL exactly the processes of this cluster's temp dir and what they started (the
    dashboard's module processes do not name the temp dir), and wait until they are gone."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
                victims += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=live.HANG_GUARD_S)


@pytest.fixture
def cluster(tmp_path):
    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp_dir = Path(f"/tmp/qw-{secrets.token_hex(3)}")
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    gcs, dashboard, agent, metrics_port, client = _free_ports(5)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    try:  # a start that fails half-way leaves processes too
        _ray_start(
            ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics_port}",
             f"--ray-client-server-port={client}", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"],
            env)
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _kill_cluster(temp_dir)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_job_submitted_to_a_running_cluster_runs_the_sweep(cluster, tmp_path):
    env, address = cluster
    storage = tmp_path / "shared"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--", "qworld", "sweep", "tune_configs/smoke.yaml", "--storage", str(storage),
           "--set", "wandb.mode=disabled"]

    def submitted():
        # The head's job agent comes up some time after `ray start` returns: an event, not a
        # count of tries; every other outcome (success or failure) is the job's own.
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=live.HANG_GUARD_S, cwd=ROOT)
        return None if "No available agent" in proc.stdout + proc.stderr else proc

    proc = live.wait_until(submitted, None, "a job agent on the head")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "succeeded" in proc.stdout.lower()
    experiment = storage / "smoke"
    assert len(list_trials(experiment)) == 2
    rows = store.read_store(experiment)
    assert len(rows) == len(list_checkpoints(experiment)) * len(SMOKE_METHODS)
    assert rows[K.ERROR].isna().all()


# --------------------------------------------------------------------------------------
# A 2-node cluster (head + worker, 1 CPU each, token auth) on an S3-compatible server


@pytest.fixture
def two_nodes(tmp_path, s3_server, monkeypatch):
    """Head and worker as separate ``ray start`` processes on loopback, 1 CPU each, token
    auth, their own temp dirs, both given the S3 server's AWS variables (trial workers write
    checkpoints there). Yields (env for a driver, GCS address, the worker node's raylet pid)."""
    import psutil

    endpoint, aws = s3_server
    for key, value in aws.items():  # this process reads the experiment too
        monkeypatch.setenv(key, value)
    temp_dirs = [Path(f"/tmp/qw-{secrets.token_hex(3)}") for _ in range(2)]
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {**os.environ, **aws, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{BIN}:{os.environ['PATH']}", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent, metrics_port, client, w_agent, w_metrics, w_manager, w_runtime, h_runtime = _free_ports(10)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=150000000",
              "--disable-usage-stats"]
    try:  # a start that fails half-way leaves processes too
        _ray_start(
            ["--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
             f"--metrics-export-port={metrics_port}", f"--ray-client-server-port={client}",
             f"--runtime-env-agent-port={h_runtime}", f"--temp-dir={temp_dirs[0]}", *common],
            env)
        _ray_start(
            [f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={w_agent}",
             f"--metrics-export-port={w_metrics}", f"--node-manager-port={w_manager}",
             f"--runtime-env-agent-port={w_runtime}", f"--temp-dir={temp_dirs[1]}", *common],
            env)
        raylets = [p for p in psutil.process_iter(["pid", "cmdline"])
                   if "raylet" in " ".join(p.info["cmdline"] or [])[:200]
                   and f"--node_manager_port={w_manager}" in " ".join(p.info["cmdline"] or [])]
        assert len(raylets) == 1, "the worker node's raylet"
        yield env, f"127.0.0.1:{gcs}", raylets[0].pid
    finally:
        for temp_dir in temp_dirs:
            _kill_cluster(temp_dir)
        subprocess.run(["rm", "-rf", *map(str, temp_dirs)], check=False)


def _bucket(s3_server) -> str:
    import uuid

    from conftest import s3_make_bucket

    name = f"qworld-{uuid.uuid4().hex[:12]}"
    s3_make_bucket(s3_server[0], name)
    return f"s3://{name}"


def _sweep(env, address, storage, *extra, log=None):
    cmd = [sys.executable, "-m", "qworld.cli", "sweep", str(SMOKE),
           "--address", address, "--storage", storage, "--set", "wandb.mode=disabled", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _assert_scored_once_on(experiment: str, methods=SMOKE_METHODS):
    """Every checkpoint of the experiment (on any storage) has one row per method, read back
    three ways: the store, qa.load and pd.read_parquet of the dataset."""
    import pandas as pd
    import pyarrow.fs as pafs
    import qworld_analysis as qa

    from qworld.sweep.location import Location
    from qworld.sweep.score import checkpoint_index

    checkpoints = {(t, checkpoint_index(c)) for t, c, _ in list_checkpoints(experiment)}
    assert checkpoints
    rows = store.read_store(experiment)
    assert sorted(zip(rows[K.TRIAL_ID], rows[K.CHECKPOINT_INDEX], rows[K.METHOD])) == sorted(
        (t, i, m) for t, i in checkpoints for m in methods)
    assert rows[K.ERROR].isna().all(), rows[K.ERROR].dropna().tolist()
    assert len(qa.load(experiment)) == len(rows)
    loc = Location.of(experiment)
    dataset = pd.read_parquet((loc / "worldmodels.parquet").path, filesystem=loc.fs)
    assert len(dataset) == len(rows)
    attempts = store.read_attempts(experiment)
    finished = attempts[attempts["finished"].notna()].groupby([K.TRIAL_ID, K.CHECKPOINT_INDEX]).size()
    assert set(finished.index) == checkpoints and (finished == 1).all(), finished
    assert isinstance(loc.fs, pafs.S3FileSystem)
    return rows


def _no_local_s3_dir(*roots: Path):
    for root in roots:
        assert not [p for p in Path(root).rglob("s3:*")], f"a local path named s3: under {root}"


def _checkpoint_configs(experiment: str) -> list[tuple[str, dict]]:
    """(trial_id, qworld_config.json) of every checkpoint of the experiment, on any storage."""
    import json

    from qworld.sweep.location import Location

    out = []
    for trial_id, ckpt, _ in list_checkpoints(experiment):
        try:
            out.append((trial_id, json.loads((Location.of(str(ckpt)) / CHECKPOINT_CONFIG_FILE).read_text())))
        except (OSError, ValueError):  # still being uploaded
            continue
    return out


def test_smoke_sweep_on_two_nodes_writes_everything_to_object_storage(two_nodes, s3_server, tmp_path):
    env, address, _ = two_nodes
    storage = f"{_bucket(s3_server)}/exp"
    experiment = f"{storage}/smoke"
    proc = _sweep(env, address, storage, "--set", "wandb.mode=offline")
    out, _ = proc.communicate(timeout=live.HANG_GUARD_S)
    assert proc.returncode == 0, out[-4000:]
    assert f"experiment dir: {experiment}" in out
    rows = _assert_scored_once_on(experiment)
    assert len(set(rows[K.TRIAL_ID])) == 2
    # one trial per node (1 CPU each): each checkpoint names the node that saved it
    nodes = {trial_id: config[K.WRITTEN_BY]["node_id"] for trial_id, config in _checkpoint_configs(experiment)}
    assert len(nodes) == 2 and len(set(nodes.values())) == 2, nodes
    status = subprocess.run([sys.executable, "-m", "qworld.cli", "status", experiment], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=live.HANG_GUARD_S)
    n = len(rows) // len(SMOKE_METHODS)
    assert status.returncode == 0 and status.stdout.startswith(f"2 trials, {n} checkpoints, {n} scored"), \
        status.stdout + status.stderr
    # the driver's offline W&B runs were copied into the experiment (qworld sync reads them there)
    from qworld.sweep.location import Location

    runs = (Location.of(experiment) / "wandb").list("offline-run-*", kind="dir")
    assert len(runs) == 4, runs  # a training run and a world-model run per trial
    _no_local_s3_dir(ROOT, tmp_path, Path.cwd())


def test_two_sweeps_of_one_name_on_one_cluster_keep_their_own_rows(two_nodes, s3_server, tmp_path):
    env, address, _ = two_nodes
    bucket = _bucket(s3_server)
    storages = [f"{bucket}/a", f"{bucket}/b"]
    procs = [_sweep(env, address, s, "--set", "sweep.variant=[windy]") for s in storages]
    outs = [p.communicate(timeout=live.HANG_GUARD_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    trial_ids = []
    for storage in storages:
        experiment = f"{storage}/smoke"
        rows = _assert_scored_once_on(experiment)
        [(trial_id, _)] = list_trials(experiment)
        assert set(rows[K.TRIAL_ID]) == {trial_id}
        trial_ids.append(trial_id)
    assert trial_ids[0] != trial_ids[1]


def test_killed_worker_node_its_trial_finishes_on_the_head(two_nodes, s3_server, tmp_path):
    """Two trials, one per node. Once the worker node's trial has a checkpoint the driver is
    frozen (SIGSTOP: Tune hands no trial another iteration, so that trial is mid-run however
    fast the machine), the worker node is SIGKILLed (raylet and its workers), the driver goes
    on: the trial is retried on the head from its last checkpoint and finishes there."""
    import psutil

    from qworld.sweep.location import Location

    env, address, worker_raylet = two_nodes
    storage = _bucket(s3_server)
    experiment = f"{storage}/smoke"
    budget = 16384
    log_path = tmp_path / "driver.log"
    with log_path.open("w") as log:
        proc = _sweep(env, address, storage, "--set", f"stop.env_steps={budget}", "--set", "checkpoint.every=4",
                      "--set", "resources.max_failures=3", log=log)
        try:
            # Two checkpoints, not one: the driver registers a checkpoint when the actor's save()
            # returns, and a checkpoint can be in storage before that. The actor only trains on
            # past a checkpoint once the driver has that save back, so when a second one is in
            # storage the driver holds at least the first, and the restart cannot be from scratch.
            def worker_trial_checkpoints():
                pids = set(live.pids_of("ray::PQN", worker_raylet))
                hits = [(t, c) for t, c in _checkpoint_configs(experiment) if c[K.WRITTEN_BY]["pid"] in pids]
                return len(hits) >= 2 and hits[0]

            victim, config = live.wait_until(worker_trial_checkpoints, proc,
                                             "two checkpoints of the worker node's trial", poll=0.5)
            worker_node = config[K.WRITTEN_BY]["node_id"]
            os.kill(proc.pid, signal.SIGSTOP)
            node = psutil.Process(worker_raylet)
            doomed = [node, *node.children(recursive=True)]
            for p in doomed:
                p.kill()
            psutil.wait_procs(doomed, timeout=live.HANG_GUARD_S)
            # read once nothing on the node can write: a train() in flight when the driver froze
            # may still have uploaded one more checkpoint
            saved = sorted(c[K.ENV_STEPS] for t, c in _checkpoint_configs(experiment) if t == victim)
            steps_at_kill, registered = saved[-1], saved[-2]  # the driver holds at least the one before last
            assert steps_at_kill < budget
            os.kill(proc.pid, signal.SIGCONT)
            proc.wait(timeout=live.HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-4000:]
    _assert_scored_once_on(experiment)
    configs = _checkpoint_configs(experiment)
    final = {}
    for trial_id, c in configs:
        final[trial_id] = max(final.get(trial_id, 0), c[K.ENV_STEPS])
    assert len(final) == 2 and min(final.values()) >= budget, final  # both finished
    after = [c for t, c in configs if t == victim and c[K.ENV_STEPS] > steps_at_kill]
    assert after and all(c[K.WRITTEN_BY]["node_id"] != worker_node for c in after)  # on the head
    trial_dir = dict(list_trials(experiment))[victim]
    assert "Failure # 1" in (Location.of(str(trial_dir)) / "error.txt").read_text()
    # restored, not retrained: the one restart goes on from a checkpoint the driver held, never
    # from scratch. Rows after that checkpoint may rightly run twice: the last checkpoint in
    # storage may be one whose save() the frozen driver never got back (CI saw it: 4 rows twice).
    rows = [__import__("json").loads(line) for line in
            (Location.of(str(trial_dir)) / "result.json").read_text().splitlines() if line.strip()]
    steps = [r[K.TRAIN_ENV_STEPS] for r in rows]
    restarts = [steps[i] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) <= 1 and all(s > registered for s in restarts) and max(steps) >= budget, \
        (steps, registered)
