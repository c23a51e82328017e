"""The example cluster files in cluster/ keep their promises (no cluster needed).

``example-cluster.yaml`` (Ray cluster launcher): valid for Ray's own launcher (its
ray-schema.json, then ``prepare_config`` + ``validate_config`` as ``ray up`` runs them); every
node gets the auth token, token mode and the storage settings before ``ray start``; head and
workers have their own setup (CUDA torch on the GPU workers only, the CPU build on the head);
``.venv`` and ``results`` are never copied to a node.

``kuberay-rayjob.yaml`` (KubeRay RayJob): runs ``qworld sweep tune_configs/smoke.yaml`` into
object storage; every Ray container (and the submitter) has token mode and the same token from a
Secret; head and workers read S3 credentials from a Secret through the standard AWS variables;
GPU workers, CPU head.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "cluster" / "example-cluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"


# --------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_yaml_is_valid_for_rays_own_launcher(launcher):
    """The file as written validates against the installed Ray's launcher schema, and again
    after the launcher fills it out for the local provider (what ``ray up`` does before it
    contacts any node)."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    validate_config(prepare_config(launcher))


def test_launcher_schema_check_catches_a_malformed_file(launcher):
    """Guards the guard: a misspelt section fails the same validation."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    broken = {**launcher, "worker_setup_command": launcher["worker_setup_commands"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _start_commands(launcher: dict, kind: str) -> str:
    """The command that runs ``ray start`` on ``kind`` ('head' or 'worker')."""
    (cmd,) = [c for c in launcher[f"{kind}_start_ray_commands"] if "ray start" in c]
    return cmd


def _mounted(launcher: dict, local: str) -> str:
    """The remote path a local file is mounted at (file mounts reach every node)."""
    hits = [remote for remote, src in launcher["file_mounts"].items() if src == local]
    assert hits, f"{local} is not in file_mounts"
    return hits[0]


def test_launcher_hands_every_node_the_token_and_the_storage(launcher):
    token_path = _mounted(launcher, "~/.ray/auth_token")  # what `ray get-auth-token --generate` writes
    env_file = _mounted(launcher, "~/.qworld/cluster.env")
    home = "/home/" + launcher["auth"]["ssh_user"]
    for kind in ("head", "worker"):
        cmd = _start_commands(launcher, kind)
        assert "RAY_AUTH_MODE=token" in cmd, kind
        assert f"RAY_AUTH_TOKEN_PATH={token_path.replace(home, '$HOME')}" in cmd, kind
        sourced = re.search(r"\.\s+(\S+cluster\.env)", cmd)
        assert sourced and sourced.group(1).replace("~", home) == env_file, kind
        assert "set -a" in cmd, f"{kind}: cluster.env must be exported to Ray's processes"
        assert cmd.index("set -a") < cmd.index("ray start")
    # The storage URI every process writes to is what cluster.env holds, as the header shows.
    header = LAUNCHER.read_text().split("cluster_name:")[0]
    assert re.search(r"QWORLD_STORAGE=s3://", header)
    assert '--storage "$QWORLD_STORAGE"' in header
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert var in header


def test_launcher_splits_head_and_worker_setup(launcher):
    common = " ".join(launcher.get("setup_commands", []))
    head = " ".join(launcher["head_setup_commands"])
    worker = " ".join(launcher["worker_setup_commands"])
    assert "torch" not in common, "torch differs by node kind: not in the common setup"
    assert "torch==2.13.0" in head and "/whl/cpu" in head and "cu1" not in head
    assert "torch==2.13.0" in worker and re.search(r"/whl/cu1\d+", worker) and "/whl/cpu" not in worker
    for cmds in (head, worker):  # qworld after torch, so pip keeps the torch build just installed
        assert "install -q -e ." in cmds and cmds.index("torch==") < cmds.index("install -q -e .")
    assert "--num-gpus=0" in _start_commands(launcher, "head")


def test_launcher_never_copies_venv_or_results(launcher):
    excluded = set(launcher["rsync_exclude"])
    assert {".venv", "results"} <= excluded
    assert launcher.get("rsync_filter") == [".gitignore"]
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in gitignore and "/results/" in gitignore


# --------------------------------------------------------------------------------------
# KubeRay RayJob


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _ray_containers(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in spec["workerGroupSpecs"]:
        out[f"worker:{group['groupName']}"] = group["template"]["spec"]["containers"][0]
    return out


def test_rayjob_runs_the_smoke_sweep_into_object_storage(rayjob):
    import ray

    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"].split("&&")[-1])
    assert argv[:3] == ["qworld", "sweep", "tune_configs/smoke.yaml"]
    storage = argv[argv.index("--storage") + 1]
    assert storage.startswith("s3://") and len(storage) > len("s3://")
    assert "--address" not in argv  # inside the job RAY_ADDRESS is set and qworld joins the cluster
    assert spec["rayClusterSpec"]["rayVersion"].rsplit(".", 1)[0] == ray.__version__.rsplit(".", 1)[0]
    assert (ROOT / "tune_configs" / "smoke.yaml").is_file()


def test_rayjob_token_reaches_every_ray_container_and_the_submitter(rayjob):
    containers = _ray_containers(rayjob)
    assert "head" in containers and any(k.startswith("worker:") for k in containers)
    containers["submitter"] = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    secrets = set()
    for kind, container in containers.items():
        env = _env(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", kind
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, f"one token for the whole cluster: {secrets}"


def test_rayjob_object_storage_credentials_come_from_a_secret(rayjob):
    for kind, container in _ray_containers(rayjob).items():
        env = _env(container)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert var in env, f"{kind}: {var}"
            assert "value" not in env[var], f"{kind}: {var} must come from a Secret, not the file"
            assert env[var]["valueFrom"]["secretKeyRef"]["name"]
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"].get("optional") is True


def test_rayjob_gpus_on_workers_only(rayjob):
    containers = _ray_containers(rayjob)
    head = containers.pop("head")
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"
    assert all(c["resources"]["limits"].get("nvidia.com/gpu") for c in containers.values())
    assert head["image"] != next(iter(containers.values()))["image"]  # CPU image on the head
