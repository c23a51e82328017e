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
