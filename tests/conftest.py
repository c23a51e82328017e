"""Shared test set-up.

Threads: with 2 torch threads under load training slowed 15x in a probe, so tests use one.
W&B: offline mode must be in the environment before any Ray worker starts.
"""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


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
