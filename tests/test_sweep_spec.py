"""Sweep files: every shipped file validates; every bad file fails before Ray, naming its field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from live import HANG_GUARD_S
import yaml

from qworld.sweep.spec import SweepSpecError, load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "tune_configs").glob("*.yaml"))


def smoke_raw() -> dict:
    return yaml.safe_load((ROOT / "tune_configs" / "smoke.yaml").read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_sweep_files_validate(path):
    spec = load_sweep(path)
    assert spec.name == path.stem
    assert len(spec.cells()) >= 1


def test_cells_are_the_cartesian_product_and_land_in_env_kwargs():
    raw = smoke_raw()
    raw["sweep"] = {"variant": ["deterministic", "windy"], "num_goals": [1, 8, 68], "seed": [0, 1]}
    spec = parse_sweep(raw)
    cells = spec.cells()
    assert len(cells) == 12
    env_id, env_kwargs, agent = spec.cell_config(cells[-1])
    assert env_kwargs["variant"] == "windy" and env_kwargs["num_goals"] == 68
    assert "seed" not in agent and "variant" not in agent


def test_override_changes_a_field():
    spec = load_sweep(ROOT / "tune_configs" / "smoke.yaml", ["stop.env_steps=999", "agent.lr=0.5"])
    assert spec.stop["env_steps"] == 999
    assert spec.agent["lr"] == 0.5


def test_the_full_file_in_the_spec_docstring_is_valid():
    # the module docstring shows "a full file": a user copying it must get a sweep, not exit 2
    import qworld.sweep.spec as spec_module

    block = spec_module.__doc__.split("A sweep file (all sections but ``name`` and ``env`` optional)::", 1)[1]
    text = "\n".join(line[4:] for line in block.splitlines()[1:] if line.startswith("    ") or not line.strip())
    spec = parse_sweep(yaml.safe_load(text))
    assert spec.name == "fourrooms_demo" and len(spec.cells()) == 2 * 2 * 2 * 2


@pytest.mark.parametrize("item, hint", [
    ("lr=0.01", "did you mean --set agent.lr=0.01?"),
    ("env_steps=5000", "did you mean --set stop.env_steps=5000?"),
    ("num_goals=[4, 8]", "did you mean --set goals.num_goals=[4, 8] or --set sweep.num_goals=[4, 8]?"),
])
def test_override_without_its_section_names_the_section(item, hint):
    with pytest.raises(SweepSpecError) as err:
        load_sweep(ROOT / "tune_configs" / "smoke.yaml", [item])
    assert f"unknown section {item.split('=')[0]!r}" in str(err.value) and str(err.value).endswith(hint)
    with pytest.raises(SweepSpecError) as err:
        load_sweep(ROOT / "tune_configs" / "smoke.yaml", ["nonsense=1"])
    assert "did you mean" not in str(err.value)


def _set(raw, dotted, value):
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return raw


def _delete(raw, dotted):
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    del node[last]
    return raw


BAD_INPUTS = [
    # (description, mutation, the field the message must name, a word of the allowed values)
    ("unknown section", lambda r: _set(r, "trainer", {}), "trainer", "allowed"),
    ("unknown env", lambda r: _set(r, "env.id", "qworld/Nope-v0"), "env.id", "qworld/FourRooms-v0"),
    ("unknown variant", lambda r: _set(r, "sweep.variant", ["deterministic", "stormy"]), "variant", "windy"),
    ("unknown goal type", lambda r: _set(r, "goals.goal_type", "treasure"), "goals.goal_type", "indicator"),
    ("goal seed spelled as in code", lambda r: _set(r, "goals.seed", 3), "goals.seed", "goal_seed"),
    ("too many indicator goals", lambda r: _set(r, "sweep.num_goals", [8, 80]), "sweep.num_goals", "1..68"),
    ("non-positive num_goals", lambda r: _set(r, "goals.num_goals", 0), "goals.num_goals", "positive"),
    ("unknown method", lambda r: _set(r, "extract.methods", ["pinv", "magic"]), "extract.methods", "column_match"),
    ("unknown safety task", lambda r: _set(r, "extract.tasks", ["the_moon"]), "extract.tasks", "allowed"),
    ("stop key that is no metric", lambda r: _set(r, "stop", {"episodes": 10}), "stop.episodes", "env_steps"),
    ("zero budget", lambda r: _set(r, "stop.env_steps", 0), "stop.env_steps", "positive"),
    ("negative budget", lambda r: _set(r, "stop.env_steps", -5), "stop.env_steps", "positive"),
    ("unknown agent key", lambda r: _set(r, "agent.learning_rate", 0.1), "agent.learning_rate", "lr"),
    ("unknown sweep axis", lambda r: _set(r, "sweep.colour", ["red"]), "sweep.colour", "variant"),
    ("empty sweep axis", lambda r: _set(r, "sweep.variant", []), "sweep.variant", "non-empty"),
    ("bad wandb mode", lambda r: _set(r, "wandb.mode", "cloudy"), "wandb.mode", "offline"),
    ("no checkpoint at all", lambda r: _set(r, "checkpoint", {"every": 0, "at_end": False}), "checkpoint", "no checkpoint"),
    ("missing env", lambda r: _delete(r, "env"), "env", "required"),
    ("bad resources", lambda r: _set(r, "resources.plearn_actors", 0), "resources.plearn_actors", ">= 1"),
    ("bad agent value", lambda r: _set(r, "agent.head", "octopus"), "head", "all_goals"),
    ("bad name", lambda r: _set(r, "name", "a b/c"), "name", "letters"),
    ("bad q_output", lambda r: _set(r, "agent.q_output", "tanh"), "agent.q_output", "'auto', 'linear', 'sigmoid'"),
    ("bad q_output axis", lambda r: _set(r, "sweep.q_output", ["linear", "relu"]), "agent.q_output", "'auto'"),
    ("family on an env it cannot run", lambda r: _set(r, "agent", {"algorithm": "d3g"}), "env_id", "qworld/MountainCar-v0"),
    ("methods for an unknown family", lambda r: _set(r, "extract.methods", {"pqn": ["pinv"], "ppo": ["pinv"]}),
     "extract.methods.ppo", "pqn"),
    ("a family of the sweep without methods",
     lambda r: _set(_set(r, "sweep.algorithm", ["pqn", "dqn"]), "extract.methods", {"pqn": ["pinv", "supervised"]}),
     "extract.methods", "'dqn'"),
    ("unknown planner", lambda r: _set(_set(_set(r, "env", {"id": "qworld/MountainCar-v0"}), "goals",
                                              {"goal_type": "position", "num_goals": 4}),
                                         "extract", {"methods": ["successor"], "options": {"successor": {"planner": "rrt"}}}),
     "extract.options.successor.planner", "mpc"),
    ("bad mpc option", lambda r: _set(_set(_set(r, "env", {"id": "qworld/MountainCar-v0"}), "goals",
                                           {"goal_type": "position", "num_goals": 4}),
                                      "extract", {"methods": ["successor"],
                                                  "options": {"successor": {"planner": "mpc", "mpc": {"horizn": 4}}}}),
     "extract.options.successor.mpc", "horizon"),
    ("goal inference on dense goals",
     lambda r: _set(_set(r, "goals.goal_type", "dense"), "extract.tasks", ["goal_inference"]), "goals.goal_type",
     "indicator"),
    ("goal inference with one goal",
     lambda r: _set(_set(r, "sweep.num_goals", [1, 4]), "extract.tasks", ["goal_inference"]), "sweep.num_goals",
     "num_goals >= 2"),
    ("explicit method of another kind", lambda r: _set(r, "extract.methods", ["forward_model"]), "extract.methods",
     "supervised"),
    ("bad extraction option value", lambda r: _set(r, "extract", {"methods": ["moves"],
                                                                  "options": {"moves": {"action_weight": 2}}}),
     "extract.options.moves: action_weight", "'auto' or a number in (0, 1]"),
    ("unknown extraction option", lambda r: _set(r, "extract", {"methods": ["moves"],
                                                                "options": {"moves": {"action_weigth": 0.5}}}),
     "extract.options.moves", "action_weight"),
    ("bad moves openings", lambda r: _set(r, "extract", {"methods": ["moves"], "options": {"moves": {"openings": "ajar"}}}),
     "extract.options.moves", "binary, free"),
]


@pytest.mark.parametrize("desc,mutate,field,allowed", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_field_and_allowed_values(desc, mutate, field, allowed):
    raw = mutate(copy.deepcopy(smoke_raw()))
    with pytest.raises(SweepSpecError) as info:
        parse_sweep(raw)
    message = str(info.value)
    assert field in message, message
    assert allowed in message, message


def test_cli_exits_2_and_launches_nothing(tmp_path):
    raw = smoke_raw()
    raw["sweep"]["num_goals"] = [8, 80]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "storage"
    proc = subprocess.run(
        [sys.executable, "-m", "qworld.cli", "sweep", str(bad), "--storage", str(storage)],
        capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2, proc.stderr
    assert "sweep.num_goals" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    assert not storage.exists()  # nothing launched, nothing written


def _cell_q_output(spec, cell) -> str:
    from qworld.agents.pqn import PQNConfig

    env_id, env_kwargs, agent = spec.cell_config(cell)
    return PQNConfig().training(env_id=env_id, env_kwargs=env_kwargs, **agent).resolved_q_output()


def test_q_output_auto_fits_each_case_of_one_sweep_file():
    raw = smoke_raw()
    raw["sweep"] = {"cases": [{"variant": "windy", "goal_type": "indicator", "num_goals": 4},
                              {"variant": "deterministic", "goal_type": "dense", "num_goals": 1}],
                    "seed": [0, 1]}
    spec = parse_sweep(raw)
    assert "q_output" not in spec.agent  # the default: "auto"
    got = {(c["goal_type"], c["seed"]): _cell_q_output(spec, c) for c in spec.cells()}
    assert got == {("indicator", 0): "sigmoid", ("indicator", 1): "sigmoid",
                   ("dense", 0): "linear", ("dense", 1): "linear"}
    explicit = parse_sweep({**raw, "agent": {**raw["agent"], "q_output": "linear"}})
    assert {_cell_q_output(explicit, c) for c in explicit.cells()} == {"linear"}


def sweep_smoke_with(override: str, storage: Path) -> subprocess.CompletedProcess:
    """``qworld sweep smoke.yaml --set override`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "qworld.cli", "sweep", str(ROOT / "tune_configs" / "smoke.yaml"),
         "--storage", str(storage), "--set", override],
        capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_cli_bad_q_output_exits_2_naming_the_field(tmp_path):
    storage = tmp_path / "storage"
    proc = sweep_smoke_with("agent.q_output=tanh", storage)
    assert proc.returncode == 2, proc.stderr
    assert "agent.q_output" in proc.stderr and "'auto', 'linear', 'sigmoid'" in proc.stderr
    assert not storage.exists()


def test_a_case_may_set_its_own_agent_keywords():
    raw = smoke_raw()
    raw["sweep"] = {"cases": [{"variant": "windy", "num_goals": 4},
                              {"variant": "deterministic", "goal_type": "dense", "num_goals": 1, "gamma": 0.9}],
                    "seed": [0]}
    spec = parse_sweep(raw)
    agents = [spec.cell_config(c)[2] for c in spec.cells()]
    assert [a.get("gamma") for a in agents] == [None, 0.9]
    with pytest.raises(SweepSpecError, match=r"sweep.cases\[0\].gama: unknown key"):
        parse_sweep({**raw, "sweep": {"cases": [{"variant": "windy", "gama": 0.9}]}})
    with pytest.raises(SweepSpecError, match="sweep.gamma: with sweep.cases"):
        parse_sweep({**raw, "sweep": {**raw["sweep"], "gamma": [0.9, 0.99]}})


def test_agent_keywords_of_a_case_reach_its_trials_through_tune():
    from ray.tune.search.variant_generator import generate_variants

    from qworld.sweep.run import param_space

    raw = smoke_raw()
    raw["sweep"] = {"cases": [{"variant": "windy", "num_goals": 4},
                              {"variant": "deterministic", "goal_type": "dense", "num_goals": 1, "gamma": 0.9}],
                    "seed": [0, 1]}
    trials = [cfg["config"] for _, cfg in generate_variants({"config": param_space(parse_sweep(raw))})]
    got = sorted((c["env_kwargs"]["variant"], c["seed"], c["gamma"]) for c in trials)
    assert got == [("deterministic", 0, 0.9), ("deterministic", 1, 0.9), ("windy", 0, 0.99), ("windy", 1, 0.99)]
    with pytest.raises(SweepSpecError, match="share their env/goal keys"):
        parse_sweep({**raw, "sweep": {"cases": [{"variant": "windy", "gamma": 0.9}, {"variant": "windy", "gamma": 0.99}]}})


def test_gpus_per_trial_without_a_gpu_exits_2_before_tune(tmp_path):
    """Catches a sweep that asks for a GPU this machine lacks and leaves its trials PENDING
    forever; a cluster address skips the check (its nodes hold the GPUs)."""
    from qworld.sweep.spec import check_local_resources

    spec = parse_sweep({**smoke_raw(), "resources": {"gpus_per_trial": 1}})
    with pytest.raises(SweepSpecError, match=r"resources.gpus_per_trial: 1 .* 0 GPUs"):
        check_local_resources(spec, address=None, gpus_found=0, environ={})
    check_local_resources(spec, address=None, gpus_found=1, environ={})
    check_local_resources(spec, address="ray://head:10001", gpus_found=0, environ={})
    check_local_resources(parse_sweep(smoke_raw()), address=None, gpus_found=0, environ={})  # CPU sweeps pass
    import torch

    if torch.cuda.device_count() == 0:  # this machine: the CLI refuses, launching nothing
        storage = tmp_path / "storage"
        proc = sweep_smoke_with("resources.gpus_per_trial=1", storage)
        assert proc.returncode == 2, proc.stderr
        assert "resources.gpus_per_trial" in proc.stderr and "0 GPUs" in proc.stderr
        assert not storage.exists()


def test_gpu_pre_check_is_skipped_inside_a_ray_job(monkeypatch, tmp_path):
    """Catches the README's own cluster command (``ray job submit ... qworld sweep ... --set
    resources.gpus_per_trial=1``) exiting 2 when the job's driver lands on a CPU node: Ray sets
    RAY_ADDRESS for every job driver and qworld joins that cluster, whose GPUs are the ones that
    count. ``RAY_ADDRESS=local`` (a new local Ray) is still checked."""
    from qworld.sweep.spec import check_local_resources, cluster_address

    spec = parse_sweep({**smoke_raw(), "resources": {"gpus_per_trial": 1}})
    for job_address in ("auto", "10.0.0.1:6379", "ray://head:10001", "http://head:8265"):
        assert cluster_address(None, {"RAY_ADDRESS": job_address}) == job_address
        check_local_resources(spec, address=None, gpus_found=0, environ={"RAY_ADDRESS": job_address})
    assert cluster_address("head:6379", {"RAY_ADDRESS": "auto"}) == "head:6379"  # --address wins
    for local in ({}, {"RAY_ADDRESS": ""}, {"RAY_ADDRESS": "local"}):
        assert cluster_address(None, local) is None
        with pytest.raises(SweepSpecError, match="resources.gpus_per_trial"):
            check_local_resources(spec, address=None, gpus_found=0, environ=local)

    # The CLI as a job driver runs it: the check reads the process environment, and the sweep is
    # launched (run_sweep replaced: no Ray here) instead of exiting 2.
    import torch

    import qworld.sweep.run
    from qworld.cli import main

    class Launched(Exception):
        pass

    def fake_run_sweep(spec, address=None, storage=None, verbose=False):
        raise Launched(spec.resources.gpus_per_trial)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(qworld.sweep.run, "run_sweep", fake_run_sweep)
    argv = ["sweep", str(ROOT / "tune_configs" / "smoke.yaml"), "--storage", str(tmp_path),
            "--set", "resources.gpus_per_trial=1"]
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(Launched):
        main(argv)
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(argv) == 2


def test_methods_per_family_reach_the_scorer_as_a_mapping(monkeypatch, tmp_path):
    """extract.methods as {family: [...]}: the union is validated and listed, the scorer is
    handed the mapping and scores each checkpoint with its own family's methods only."""
    import numpy as np

    import qworld.agents
    from qworld import metrics as K
    from qworld.worldmodel.bellman import solve_goal_q
    from qworld.sweep.score import score_checkpoint
    from qworld_envs import make_finite_problem

    raw = _set(_set(smoke_raw(), "sweep.algorithm", ["pqn", "dqn"]), "extract.methods",
               {"pqn": ["pinv", "supervised"], "dqn": ["pinv"]})
    raw["agent"] = {}
    spec = parse_sweep(raw)
    assert spec.extract.methods == ("pinv", "supervised")
    assert spec.extract.plan() == {"pqn": ("pinv", "supervised"), "dqn": ("pinv",)}

    env_kwargs = {"variant": "deterministic", "num_goals": 8, "goal_seed": 0}
    problem = make_finite_problem("qworld/FourRooms-v0", **env_kwargs)
    Q, _ = solve_goal_q(problem.mdp.P, problem.goals.rewards, 0.9, problem.goals.terminal)

    class Agent:
        config = {"env_id": "qworld/FourRooms-v0", "env_kwargs": env_kwargs, "gamma": 0.9, "algorithm": "dqn"}

        def q_table(self):
            return Q

    monkeypatch.setattr(qworld.agents, "load_q", lambda path: Agent())
    rows = score_checkpoint(tmp_path / "checkpoint_000000", sweep="s", trial_id="t", methods=spec.extract.plan())
    assert [r[K.METHOD] for r in rows] == ["pinv"] and rows[0][K.ALGORITHM] == "dqn"
    assert np.isfinite(rows[0][K.P_MSE])
