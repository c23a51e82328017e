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
import pytest

from qworld import metrics as K
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


def _kill_cluster(temp_dir: Path) -> None:
    """SIGKILL exactly the processes of this cluster's temp dir, and wait until they are gone."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
                proc.send_signal(signal.SIGKILL)
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
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
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics_port}",
         f"--ray-client-server-port={client}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, text=True, timeout=180)
    try:
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
    assert len(rows) == len(list_checkpoints(experiment)) * 2  # pinv + column_match
    assert rows[K.ERROR].isna().all()
