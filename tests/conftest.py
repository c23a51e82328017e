"""Shared test set-up.

Threads: with 2 torch threads under load training slowed 15x in a probe, so tests use one.
W&B: offline mode must be in the environment before any Ray worker starts.
The smoke sweep (``smoke_experiment``) runs once per test session, for every xdist worker.
"""

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)


# The suite's wall time is that of its slower xdist worker. Workers take whole files
# (`--dist loadfile`) in collection order (`--no-loadscope-reorder`: xdist would otherwise put
# the files with the most tests first), so the longest files go first and the short ones fill
# in at the end (longest-processing-time-first). Ordered by their measured seconds of test time
# (BENCHMARKS.md "Test suite"); files not listed follow in collection order.
LONGEST_FILES_FIRST = (
    "test_cluster.py", "test_sweep_run.py", "test_families_learn.py", "test_faults.py", "test_pqn.py",
    "test_families.py", "test_iqlearn.py", "test_continuous.py", "test_continuous_agent.py",
    "test_analysis.py", "test_d3g.py", "test_sweep_spec.py", "test_mrq.py", "test_location.py",
    "test_layering.py", "test_packaging.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps each file's order


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray runtime for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's standalone server, HTTP on 127.0.0.1, a free port) for the whole
    session: ``(endpoint_url, env)``, ``env`` the AWS variables a client (or a Ray node) needs.
    Apply ``env`` with ``monkeypatch.setenv`` (or use ``s3_bucket``); make buckets with
    ``s3_make_bucket(endpoint_url, name)``."""
    import logging
    import socket

    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "qworld-test",
           "AWS_SECRET_ACCESS_KEY": "qworld-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        yield endpoint, env
    finally:
        server.stop()


def s3_make_bucket(endpoint: str, name: str) -> None:
    """Create a bucket on the test server (through pyarrow: no boto3 needed)."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="qworld-test",
                           secret_key="qworld-test-secret", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir(name)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh, empty bucket on the session's S3 server with the AWS environment applied:
    its ``s3://`` URI."""
    import uuid

    endpoint, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"qworld-{uuid.uuid4().hex[:12]}"
    s3_make_bucket(endpoint, name)
    return f"s3://{name}"


# --------------------------------------------------------------------------------------
# one real smoke sweep for the whole session, read by test_sweep_run, test_faults, test_analysis

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"
SMOKE_METHODS = tuple(yaml.safe_load(SMOKE.read_text())["extract"]["methods"])  # what every smoke row is scored by


@dataclass(frozen=True)
class SmokeExperiment:
    """``qworld sweep tune_configs/smoke.yaml`` as a user runs it (own local Ray, W&B offline):
    its experiment dir and its console. Read it only: a test that changes files copies
    ``path`` first (``shutil.copytree``); the session fails at teardown if its files changed."""

    path: Path
    stdout: str
    stderr: str


def _fingerprint(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in root.rglob("*") if f.is_file())


@pytest.fixture(scope="session")
def smoke_experiment(tmp_path_factory) -> SmokeExperiment:
    """Run once: under xdist the first worker to ask runs it into the session's shared temp
    dir (the workers' common parent) while the others wait on a file lock, then all read it."""
    import json
    import subprocess
    import sys

    from filelock import FileLock

    from live import HANG_GUARD_S

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is popen-gwN in the session's
        shared = shared.parent
    root = shared / "smoke_experiment"
    done = root / "console.json"
    with FileLock(str(shared / "smoke_experiment.lock")):
        if not done.is_file():
            root.mkdir(exist_ok=True)
            env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
            proc = subprocess.run([sys.executable, "-m", "qworld.cli", "sweep", str(SMOKE),
                                   "--storage", str(root / "storage")],
                                  cwd=SMOKE.parents[1], env=env, capture_output=True, text=True,
                                  timeout=HANG_GUARD_S)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            experiment = root / "storage" / "smoke"
            done.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr,
                                        "files": _fingerprint(experiment)}))
    console = json.loads(done.read_text())
    experiment = SmokeExperiment(root / "storage" / "smoke", console["stdout"], console["stderr"])
    yield experiment
    changed = _fingerprint(experiment.path) != [tuple(f) for f in console["files"]]
    assert not changed, f"a test changed the shared smoke experiment {experiment.path}: copy it first"
