"""Learner families (``qworld.agents.families``): RLlib's DQN as shipped next to PQN, and
the ``algorithm`` sweep axis. Real Ray, tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from live import HANG_GUARD_S
from tolerances import forward_atol
import yaml

from qworld import metrics as K
from qworld.agents.families import ALGORITHMS, all_keywords, family
from qworld.layout import CHECKPOINT_CONFIG_FILE, MODULE_SUBDIR
from qworld.sweep.spec import SweepSpecError, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
ENV_KWARGS = {"variant": "deterministic", "goal_type": "indicator", "num_goals": 8, "goal_seed": 0}


def smoke_raw() -> dict:
    return yaml.safe_load(SMOKE.read_text())


# --------------------------------------------------------------------------------------
# registry and spec (no Ray)


def test_registry_names_each_family_with_its_keywords():
    assert set(ALGORITHMS) >= {"pqn", "dqn"}
    assert family(None).name == "pqn" and family("DQN").name == "dqn"
    assert "lambda_" in family("pqn").keywords() and "lambda_" not in family("dqn").keywords()
    assert {"buffer_capacity", "target_update_freq"} <= set(family("dqn").keywords())
    assert "algorithm" in all_keywords()
    with pytest.raises(ValueError, match="allowed"):
        family("sac")


def test_agent_config_doc_is_generated_from_the_field_tables():
    from qworld.agents.families import fields_markdown

    assert (ROOT / "docs" / "AGENT_CONFIG.md").read_text() == fields_markdown(), \
        "run: python -m qworld.agents.families --docs > docs/AGENT_CONFIG.md"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_field_is_declared_once_and_the_config_derives_from_it(name):
    """A family's FIELDS table gives the attributes and defaults, training()'s keywords (those
    a sweep file may set), the checks and the trial config; the class spells no field again."""
    import inspect
    import re

    cls = family(name).config_class()
    config = cls()
    for f in cls.FIELDS:
        assert getattr(config, f.name) == f.default, f.name
        assert f.doc, f"{name}.{f.name} has no doc"
        if f.alias:
            assert getattr(config, f.alias) == f.default, f"{f.name} is not stored in RLlib's {f.alias}"
    params = list(inspect.signature(cls.training).parameters)
    assert params[1:-1] == list(cls.training_keywords()) == list(family(name).keywords())
    assert cls.training_keywords() == tuple(f.name for f in cls.FIELDS if f.keyword)
    head = 1 + len(cls.CONFIG_HEAD)  # "algorithm", then e.g. "head"
    assert list(config.qworld_config())[head:head + len(cls.FIELDS)] == list(cls.field_names())
    source = inspect.getsource(cls)
    assert "def training" not in source and "def qworld_errors" not in source
    init = inspect.getsource(cls.__init__)
    assert not [f.name for f in cls.FIELDS if re.search(rf"self\.{f.name}\s*=", init)]
    # every check names its field, in the family's own words
    for f in cls.FIELDS:
        if f.check is None:
            continue
        bad = cls()
        setattr(bad, f.name, object())
        errors = [e for e in bad.qworld_errors() if e.startswith(f.name)]
        assert errors, f"{name}.{f.name}: an object() passes its check"


def test_spec_without_algorithm_is_pqn_and_the_axis_crosses_families():
    from qworld.agents.mixed import AnyFamily
    from qworld.agents.pqn import PQN
    from qworld.sweep.run import param_space, spec_families, trainable_for

    spec = parse_sweep(smoke_raw())
    assert spec_families(spec) == ["pqn"] and trainable_for(spec) is PQN
    assert "algorithm" not in param_space(spec)  # exactly as before the axis existed
    raw = smoke_raw()
    raw["sweep"]["algorithm"] = ["pqn", "dqn"]
    spec = parse_sweep(raw)
    assert spec_families(spec) == ["pqn", "dqn"] and trainable_for(spec) is AnyFamily
    assert param_space(spec)["algorithm"] == {"grid_search": ["pqn", "dqn"]}


@pytest.mark.parametrize("edit, field, allowed", [
    (lambda r: r["sweep"].update(algorithm=["pqn", "sac"]), "sweep.algorithm", "['d3g', 'dqn', 'iqlearn', 'mrq', 'pqn']"),
    (lambda r: r["agent"].update(algorithm="sac"), "agent.algorithm", "['d3g', 'dqn', 'iqlearn', 'mrq', 'pqn']"),
    (lambda r: r["agent"].update(algorithm="dqn", lambda_=0.5), "agent.lambda_", "buffer_capacity"),
    (lambda r: (r["agent"].update(lambda_=0.5), r["sweep"].update(algorithm=["pqn", "dqn"])),
     "agent.lambda_", "'dqn'"),
    (lambda r: r["agent"].update(algorithm="dqn", buffer_capacity=0), "agent.buffer_capacity", ">= 1"),
])
def test_spec_rejects_unknown_family_and_foreign_keywords(edit, field, allowed):
    raw = smoke_raw()
    edit(raw)
    with pytest.raises(SweepSpecError) as err:
        parse_sweep(raw)
    message = str(err.value)
    assert message.startswith(field) and allowed in message, message


def test_cli_exits_2_on_an_unknown_family(tmp_path):
    raw = smoke_raw()
    raw["sweep"]["algorithm"] = ["pqn", "sac"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "storage"
    proc = subprocess.run([sys.executable, "-m", "qworld.cli", "sweep", str(bad), "--storage", str(storage)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2, proc.stderr
    assert "sweep.algorithm" in proc.stderr and "pqn" in proc.stderr
    assert not storage.exists()


# --------------------------------------------------------------------------------------
# DQN through Ray: train, checkpoint, load_q without Ray


@pytest.mark.ray
def test_dqn_trains_checkpoints_and_load_q_restores_equal_q(tmp_path, ray_session):
    import ray

    from qworld.agents import load_q
    from qworld.agents.dqn import GoalDQNConfig, GoalInputQ

    config = (GoalDQNConfig()
              .training(env_kwargs=ENV_KWARGS, hidden_sizes=[32, 32], learning_starts=200,
                        total_env_steps=3000)
              .debugging(seed=0))
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        assert result[K.TRAIN_ENV_STEPS] >= 2000
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        live = algo.q_function()
        obs = np.eye(live.module.obs_dim, dtype=np.float32)
        q_live = live.q(obs)  # [S, L, A]
        q_goal_live = live.q(obs, np.arange(len(obs)) % live.num_goals)
    finally:
        algo.stop()
    assert q_live.shape == (68, 8, 4) and np.isfinite(q_live).all()

    cfg = json.loads((Path(path) / CHECKPOINT_CONFIG_FILE).read_text())
    assert cfg["algorithm"] == "dqn" and cfg["env_id"] == "qworld/FourRooms-v0"
    assert cfg[K.NUM_GOALS] == 8 and cfg["gamma"] == 0.99 and cfg[K.ENV_STEPS] >= 2000
    assert len(cfg["goal_features"]) == 8
    assert (Path(path).joinpath(*MODULE_SUBDIR) / CHECKPOINT_CONFIG_FILE).is_file()

    ray.shutdown()  # load_q needs no Ray
    try:
        qfun = load_q(path)
        assert not ray.is_initialized()
        assert isinstance(qfun.module, GoalInputQ)
        assert (qfun.num_goals, qfun.num_actions, qfun.module.obs_dim) == (8, 4, 68)
        # the restored weights, the same batches, the same process: the same float32 results
        np.testing.assert_array_equal(qfun.q(obs), q_live)
        np.testing.assert_array_equal(qfun.q(obs, np.arange(len(obs)) % 8), q_goal_live)
        np.testing.assert_array_equal(qfun.q_table(), q_live.transpose(1, 0, 2))
        # q_goals agrees with the module on concat(obs, goal features), as the env observes
        import torch

        feats = qfun.module.goal_features
        concat = torch.cat([torch.as_tensor(obs[:5]), feats[[3] * 5]], -1)
        with torch.no_grad():
            direct = qfun.module.inner.compute_q_values({"obs": concat})["qf_preds"].numpy()
        # 5 rows against 68: hidden [32, 32] and the Q head, 3 Linear layers of fan-in <= obs +
        # goal features, summed in another order (tolerances.forward_atol)
        width = qfun.module.obs_dim + feats.shape[-1]
        np.testing.assert_allclose(direct, q_live[:5, 3], rtol=0, atol=forward_atol(q_live, depth=3, width=width))
    finally:
        ray_session.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}})


# --------------------------------------------------------------------------------------
# a smoke sweep crossing algorithm: [pqn, dqn]


@pytest.mark.ray
def test_smoke_sweep_crossing_families_scores_every_checkpoint_once(tmp_path):
    from qworld.sweep import store
    from qworld.sweep.run import list_checkpoints
    from qworld.sweep.score import checkpoint_index

    storage = tmp_path / "storage"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    # supervised needs the trial's experience log, which RLlib's DQN does not record
    args = [sys.executable, "-m", "qworld.cli", "sweep", str(SMOKE), "--storage", str(storage),
            "--set", "extract.methods=[pinv, column_match]",
            "--set", "sweep={algorithm: [pqn, dqn]}", "--set", "agent.learning_starts=256",
            "--set", "wandb.mode=disabled"]
    # learning_starts is DQN's: a crossed sweep may only set keywords of both families
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and "agent.learning_starts" in proc.stderr, proc.stderr
    args = args[:-4] + ["--set", "wandb.mode=disabled"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "new API stack" not in proc.stdout + proc.stderr

    experiment_dir = storage / "smoke"
    rows = store.read_store(experiment_dir)
    on_disk = {(t, checkpoint_index(c)): c for t, c, _ in list_checkpoints(experiment_dir)}
    assert on_disk and set(zip(rows[K.TRIAL_ID], rows[K.CHECKPOINT_INDEX])) == set(on_disk)
    assert len(rows) == 2 * len(on_disk)  # one row per method, each checkpoint exactly once
    assert rows[K.ERROR].isna().all(), rows[K.ERROR].dropna().tolist()
    families = rows.groupby(K.TRIAL_ID)[K.ALGORITHM].unique()
    assert sorted(v for vs in families for v in vs) == ["dqn", "pqn"]
    for (trial_id, _), ckpt in on_disk.items():  # the column is the checkpoint's own family
        cfg = json.loads((Path(ckpt) / CHECKPOINT_CONFIG_FILE).read_text())
        assert set(families[trial_id]) == {cfg["algorithm"]}

    from qworld_analysis import load
    from qworld_analysis.report import cell_columns

    frame = load(experiment_dir)
    assert K.ALGORITHM in cell_columns(frame, experiment_dir)
    assert set(frame[K.ALGORITHM]) == {"pqn", "dqn"}


def test_the_family_of_a_single_family_sweep_is_read_off_its_trial_dirs(tmp_path):
    """A single-family sweep's params.json is its Algorithm's config, without `algorithm`:
    qa.load read every such trial as pqn (D3G and DQN sweeps were mislabelled)."""
    from qworld.layout import TRIAL_DIR_FAMILIES, family_of_trial_dir

    assert TRIAL_DIR_FAMILIES == {fam.algo.rpartition(":")[2]: name for name, fam in ALGORITHMS.items()}
    assert family_of_trial_dir("D3G_qworld_MountainCar-v0_56bca_00000_0_seed=0_2026-12-01_16-58-21") == "d3g"
    assert family_of_trial_dir("GoalDQN_qworld_FourRooms-v0_1_2") == "dqn"
    assert family_of_trial_dir("PQN_qworld_FourRooms-v0_1_2") == "pqn"
    assert family_of_trial_dir("AnyFamily_qworld_FourRooms-v0_1_2") is None
    from qworld_analysis.load import _read_trials

    trial = tmp_path / "exp" / "GoalDQN_qworld_FourRooms-v0_a1b2c_00000_0"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"env_id": "qworld/FourRooms-v0"}))
    [read] = _read_trials(tmp_path / "exp")
    assert read["params"][K.ALGORITHM] == "dqn"
