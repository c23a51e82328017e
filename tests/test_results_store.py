"""The results store on its own (no Ray): the one declared schema (issue 23 item 4), damage
proven by parsing (item 5), a checkpoint's identity in its rows (item 6), and the readers
(store, status, run's listing, qworld_analysis) on local disk and on a real S3 server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from qworld import metrics as K
from qworld.layout import CHECKPOINT_CONFIG_FILE, SPEC_FILE, STORE_DAMAGED_DIR, STORE_DIR
from qworld.sweep import run, store
from qworld.sweep.location import Location
from qworld.sweep.status import status_table

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
GARBAGE = b"\x00disk full\xff" * 37


def grid(trial_id, index, **extra):
    return {K.SWEEP: "s", K.TRIAL_ID: trial_id, K.ENV: "qworld/FourRooms-v0", K.ALGORITHM: "pqn",
            K.VARIANT: "windy", K.GOAL_TYPE: "indicator", K.NUM_GOALS: 4, K.HEAD: "all_goals", K.SEED: 0,
            K.CHECKPOINT_INDEX: index, K.ENV_STEPS: 256 * (index + 1), K.CHECKPOINT_UID: f"uid-{trial_id}-{index}",
            **extra}


def finite_rows(trial_id, index, algorithm="pqn"):
    return [{**grid(trial_id, index, **{K.ALGORITHM: algorithm}), K.METHOD: m, K.ORACLE: m == "known_support",
             K.ERROR: None, K.P_MSE: 1e-3 * (i + 1), K.Q_NMSE: 1e-4, K.M_RANK: 68, K.IDENTIFIABLE_CASE: "full_rank",
             K.POLICY_SUCCESS: 1.0, "corner_9_1_doorway/task": "corner_9_1_doorway",
             "corner_9_1_doorway/plan_success": 1.0, f"{K.RARE}/{K.P_MSE}": float("nan")}
            for i, m in enumerate(("pinv", "known_support"))]


def continuous_rows(trial_id, index):
    return [{**grid(trial_id, index, **{K.ENV: "qworld/MountainCar-v0", K.VARIANT: None, K.GOAL_TYPE: "position",
                                        K.NUM_GOALS: 8}),
             K.METHOD: "successor", K.ORACLE: False, K.ERROR: None, K.WM_NMSE: 2e-4, K.Q_NMSE: 0.01,
             f"{K.WM_DELTA_NMSE}_position": 3e-3, f"{K.INTERIOR}/{K.FRACTION}": 0.9,
             f"{K.BASELINE_IDENTITY}/{K.WM_NMSE}": 1.0, "fast_car/return_ratio": 0.95,
             f"fast_car/{K.STAR}/{K.PLAN_SUCCESS}": 1.0}]


def load_row(trial_id, index):  # a checkpoint that could not be read: the first fragment of the dir
    return [{K.SWEEP: "s", K.TRIAL_ID: trial_id, K.CHECKPOINT_INDEX: index, K.ENV_STEPS: None,
             K.CHECKPOINT_UID: None, K.CHECKPOINT_PATH: "/x/checkpoint_000000", K.METHOD: K.LOAD_METHOD,
             K.ERROR: "OSError: truncated file"}]


def mixed_experiment(root) -> int:
    """An error row, normal finite rows, a continuous row and another family, one dir."""
    store.write_rows(root, load_row("a_00000", 0))  # sorts first: the schema a reader sees first
    store.write_rows(root, finite_rows("a_00000", 1))
    store.write_rows(root, finite_rows("b_00001", 1, algorithm="dqn"))
    store.write_rows(root, continuous_rows("c_00002", 1))
    return 1 + 2 + 2 + 1


# --------------------------------------------------------------------------------------
# item 4: one declared schema


def test_every_fragment_is_written_with_the_declared_types(tmp_path):
    mixed_experiment(tmp_path)
    schemas = [pq.read_schema(p) for p in sorted((tmp_path / STORE_DIR).iterdir())]
    declared = K.results_schema()
    for schema in schemas:
        assert schema.names[:len(declared)] == declared.names  # every declared column, in order
        for field in schema:
            assert field.type == K.results_schema([field.name]).field(field.name).type
    assert schemas[0].field(K.ERROR).type == pa.string() == schemas[1].field(K.ERROR).type
    assert schemas[0].field(K.ENV_STEPS).type == pa.int64()
    assert schemas[1].field("corner_9_1_doorway/task").type == pa.string()
    assert schemas[3].field(f"{K.WM_DELTA_NMSE}_position").type == pa.float64()


def test_a_directory_reader_reads_a_mixed_experiment(tmp_path):
    n = mixed_experiment(tmp_path)
    path = tmp_path / STORE_DIR
    # types agree: no "Unsupported cast" whatever fragment a reader meets first
    assert len(pd.read_parquet(path)) == n
    assert ds.dataset(path).to_table().num_rows == n
    # at the end of a sweep the fragments get one schema: every column reaches every reader
    rewritten = store.conform_schema(tmp_path)
    assert len(rewritten) == 4
    assert len({pq.read_schema(p) for p in path.iterdir()}) == 1
    frame = pd.read_parquet(path)
    assert len(frame) == n and frame[K.ERROR].notna().sum() == 1
    assert frame[f"{K.WM_DELTA_NMSE}_position"].notna().sum() == 1
    assert frame["corner_9_1_doorway/plan_success"].notna().sum() == 4
    assert set(frame[K.ALGORITHM].dropna()) == {"pqn", "dqn"}
    table = ds.dataset(path).to_table()
    assert table.num_rows == n and set(frame.columns) == set(table.column_names)
    # rows, their attempt metadata and qworld's own reader are unchanged by the rewrite
    assert len(store.read_store(tmp_path)) == n and store.conform_schema(tmp_path) == []
    duckdb = pytest.importorskip("duckdb")
    with duckdb.connect() as con:
        assert con.execute(f"select count(*) from read_parquet('{path}/*.parquet')").fetchone()[0] == n


def test_polars_reads_a_conformed_experiment(tmp_path):
    polars = pytest.importorskip("polars")
    n = mixed_experiment(tmp_path)
    store.conform_schema(tmp_path)
    assert polars.read_parquet(str(tmp_path / STORE_DIR / "*.parquet")).height == n


def test_fragments_of_an_older_experiment_are_read_and_conformed(tmp_path):
    """Before the declared schema, pandas decided each fragment's types: an all-null ``error``
    was a null column, a filled one a string: the issue's ``pd.read_parquet`` failure."""
    path = tmp_path / STORE_DIR
    path.mkdir()
    for index, error in ((0, None), (1, "ValueError: x")):
        rows = [{K.SWEEP: "s", K.TRIAL_ID: "t_00000", K.CHECKPOINT_INDEX: index, K.METHOD: "pinv",
                 K.P_MSE: 0.1, K.ENV_STEPS: 256, K.ERROR: error}]
        pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False),
                       path / f"trial=t_00000-ckpt={index:06d}.parquet")
    with pytest.raises((pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)):
        pd.read_parquet(path)
    assert list(store.read_store(tmp_path)[K.ERROR].isna()) == [True, False]
    assert store.scored_uids(tmp_path) == {("t_00000", 0): None, ("t_00000", 1): None}
    store.conform_schema(tmp_path)
    assert list(pd.read_parquet(path)[K.ERROR].isna()) == [True, False]


def test_an_undeclared_text_column_is_refused_at_write_time(tmp_path):
    rows = [{**grid("t", 0), K.METHOD: "pinv", "some_new_score": "high"}]
    with pytest.raises(ValueError, match="'some_new_score' is declared float64"):
        store.write_rows(tmp_path, rows)
    assert not (tmp_path / STORE_DIR).exists()


# --------------------------------------------------------------------------------------
# item 5: a fragment that cannot be read is not damage


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   OSError("AWS Error NETWORK_CONNECTION during GetObject operation")])
def test_an_unreadable_fragment_is_reported_and_never_moved(tmp_path, monkeypatch, capsys, error):
    for index in range(3):
        store.write_rows(tmp_path, finite_rows("t_00000", index))
    victim = store._key_file(tmp_path, "t_00000", 1)
    content = victim.read_bytes()
    read_bytes = Location.read_bytes

    def failing(self):
        if self.name == victim.name:
            raise error
        return read_bytes(self)

    monkeypatch.setattr(Location, "read_bytes", failing)
    for read in (lambda: store.read_store(tmp_path), lambda: store.scored_keys(tmp_path, set_aside=True),
                 lambda: store.is_scored(tmp_path, "t_00000", 1), lambda: status_table(tmp_path)):
        with pytest.raises(store.StoreReadError, match=f"cannot read results file {victim}"):
            read()
    monkeypatch.undo()
    assert victim.read_bytes() == content and not (tmp_path / STORE_DAMAGED_DIR).exists()
    assert "damaged" not in capsys.readouterr().err
    assert store.scored_keys(tmp_path) == {("t_00000", i) for i in range(3)}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_fragment_without_read_permission_stays(tmp_path):
    store.write_rows(tmp_path, finite_rows("t_00000", 0))
    victim = store._key_file(tmp_path, "t_00000", 0)
    victim.chmod(0)
    try:
        with pytest.raises(store.StoreReadError, match="Permission"):
            store.scored_keys(tmp_path, set_aside=True)
        assert victim.exists() and not (tmp_path / STORE_DAMAGED_DIR).exists()
    finally:
        victim.chmod(0o644)


def test_status_of_a_damaged_experiment_moves_nothing(tmp_path, capsys):
    for index in range(2):
        store.write_rows(tmp_path, finite_rows("t_00000", index))
    victim = store._key_file(tmp_path, "t_00000", 1)
    victim.write_bytes(GARBAGE)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert status_table(tmp_path).startswith("0 trials, 0 checkpoints, 1 scored")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    err = capsys.readouterr().err
    assert f"damaged results file {victim}" in err and "left in place" in err
    import qworld_analysis as qa

    assert len(qa.load(tmp_path)) == 2 and victim.read_bytes() == GARBAGE


# --------------------------------------------------------------------------------------
# item 6: a checkpoint's identity in its rows


def fake_trial(exp: Location, trial_id="t_00000", name="PQN_x_00000") -> Location:
    trial = exp / name
    trial.child("result.json").write_text(json.dumps({K.TRIAL_ID: trial_id, "training_iteration": 1}) + "\n")
    trial.child("params.json").write_text(json.dumps({"env_id": "qworld/FourRooms-v0", "seed": 0,
                                                      "env_kwargs": {"variant": "windy"}}))
    return trial


def save_checkpoint(trial: Location, index: int, uid: str | None, steps: int = 256) -> str:
    ckpt = trial / f"checkpoint_{index:06d}"
    config = {K.ENV_STEPS: steps, **({K.CHECKPOINT_UID: uid} if uid else {})}
    ckpt.child(CHECKPOINT_CONFIG_FILE).write_text(json.dumps(config))
    ckpt.child("module.bin").write_bytes(b"weights")
    return str(ckpt)


class RecordingPool:
    def __init__(self):
        self.submitted = []

    def drain(self):
        return []

    def submit(self, trial_id, ckpt, env_steps, force=False):
        self.submitted.append((trial_id, ckpt, env_steps, force))


def finish(exp):
    pool = RecordingPool()
    spec = SimpleNamespace(wandb=SimpleNamespace(mode="disabled"))
    outcome = run._finish(spec, exp, pool, num_trials=1, num_errors=0)
    return pool.submitted, outcome


def test_save_to_path_gives_every_checkpoint_a_new_uid(tmp_path):
    from qworld.agents.checkpoint import QworldAlgorithmMixin

    class Saved:
        def save_to_path(self, path=None, **kwargs):
            Path(path).mkdir(parents=True, exist_ok=True)
            return path

    class Agent(QworldAlgorithmMixin, Saved):
        def qworld_config(self):
            return {K.ENV_STEPS: 7}

    uids = []
    for _ in range(2):  # the same checkpoint number written twice (a rollback)
        Agent().save_to_path(str(tmp_path / "checkpoint_000003"))
        config = json.loads((tmp_path / "checkpoint_000003" / CHECKPOINT_CONFIG_FILE).read_text())
        assert config[K.ENV_STEPS] == 7 and len(config[K.CHECKPOINT_UID]) == 32
        uids.append(config[K.CHECKPOINT_UID])
    assert uids[0] != uids[1]


def test_every_row_carries_its_checkpoints_uid(tmp_path):
    from qworld.sweep.score import score_checkpoint

    ckpt = save_checkpoint(Location.of(tmp_path) / "PQN_x", 3, "feedface" * 4)
    [row] = score_checkpoint(ckpt, sweep="s", trial_id="t", methods=["pinv"])  # no module: a load row
    assert row[K.METHOD] == K.LOAD_METHOD and row[K.CHECKPOINT_UID] == "feedface" * 4


def test_a_checkpoint_rewritten_after_a_rollback_is_scored_again(tmp_path):
    exp = Location.of(tmp_path / "exp")
    trial = fake_trial(exp)
    first = save_checkpoint(trial, 1, "a" * 32)
    store.write_rows(exp, [{**r, K.CHECKPOINT_UID: "a" * 32} for r in finite_rows("t_00000", 1)])
    assert store.is_scored(exp, "t_00000", 1, checkpoint_uid="a" * 32)
    assert finish(exp)[0] == []  # its rows are its own: nothing to do

    # the trial is rolled back and writes checkpoint 1 again: a new model under the old number
    second = save_checkpoint(trial, 1, "b" * 32, steps=320)
    assert second == first
    assert not store.is_scored(exp, "t_00000", 1, checkpoint_uid="b" * 32)
    assert "1 with stale rows" in status_table(exp).splitlines()[0]
    submitted, outcome = finish(exp)
    assert submitted == [("t_00000", second, 320, True)]  # forced: its key has (stale) rows
    assert outcome.num_checkpoints == 1 and outcome.num_scored == 0
    store.write_rows(exp, [{**r, K.CHECKPOINT_UID: "b" * 32} for r in finite_rows("t_00000", 1)])
    submitted, outcome = finish(exp)
    assert submitted == [] and outcome.num_scored == 1
    assert status_table(exp).startswith("1 trials, 1 checkpoints, 1 scored")


def test_rows_without_a_uid_still_count_as_scored(tmp_path):
    """Experiments scored before uids existed (no column), and checkpoints saved before them."""
    exp = Location.of(tmp_path / "exp")
    trial = fake_trial(exp)
    save_checkpoint(trial, 1, "c" * 32)
    save_checkpoint(trial, 2, None)
    old = [{k: v for k, v in r.items() if k != K.CHECKPOINT_UID} for r in finite_rows("t_00000", 1)]
    store.write_rows(exp, old)
    store.write_rows(exp, finite_rows("t_00000", 2))
    assert store.scored_uids(exp) == {("t_00000", 1): None, ("t_00000", 2): "uid-t_00000-2"}
    assert finish(exp)[0] == []


# --------------------------------------------------------------------------------------
# item 1: the readers on local disk and on S3


@pytest.fixture(params=["local", "s3"])
def experiment(request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray local folder named "s3:" would land here
    if request.param == "local":
        return Location.of(tmp_path / "results" / "smoke")
    bucket = request.getfixturevalue("s3_bucket")
    return Location.of(f"{bucket}/results/smoke")


def test_readers_go_through_the_location(experiment, tmp_path, capsys):
    import qworld_analysis as qa

    (experiment / SPEC_FILE).write_text(SMOKE.read_text())
    trial = fake_trial(experiment)
    ckpts = [save_checkpoint(trial, i, f"{i}" * 32, steps=256 * i) for i in (1, 2)]
    for i in (1, 2):
        store.write_rows(experiment, [{**r, K.CHECKPOINT_UID: f"{i}" * 32} for r in finite_rows("t_00000", i)])
    store.write_world_models(experiment, "t_00000", 1, {"pinv": __import__("numpy").full((2, 1, 2), 0.5)})
    attempt = store.begin_attempt(experiment, "t_00000", 2, ckpts[1])
    store.end_attempt(experiment, "t_00000", 2, attempt, 2)

    assert run.load_spec_of(experiment.uri).name == "smoke"
    [(trial_id, trial_dir)] = run.list_trials(experiment.uri)
    assert trial_id == "t_00000" and str(trial_dir) == trial.uri
    assert run.list_checkpoints(experiment.uri) == [("t_00000", ckpts[0], 256), ("t_00000", ckpts[1], 512)]
    assert all(c.startswith(experiment.uri + "/") for c in ckpts)
    assert status_table(experiment.uri).startswith("1 trials, 2 checkpoints, 2 scored")
    frame = qa.load(experiment.uri)
    assert len(frame) == 4 and set(frame[K.CHECKPOINT_UID]) == {"1" * 32, "2" * 32}
    assert qa.load_world_model(experiment.uri, "t_00000", 1, "pinv").shape == (2, 1, 2)
    assert store.read_attempts(experiment.uri)["finished"].notna().all()
    assert qa.load_trials(experiment.uri)["num_checkpoints"].tolist() == [2]
    if experiment.is_local:
        assert len(pd.read_parquet(experiment.local_path / STORE_DIR)) == 4
    else:  # pandas reads the bucket itself through the same filesystem
        assert len(pd.read_parquet((experiment / STORE_DIR).path, filesystem=experiment.fs)) == 4
        assert not list(Path.cwd().glob("s3*"))

    # damage on an object store: readers name it; the scoring side sets it aside (copy + delete)
    victim = store._key_loc(experiment, "t_00000", 2)
    victim.write_bytes(GARBAGE)
    assert store.scored_keys(experiment) == {("t_00000", 1)} and victim.exists()
    assert store.scored_keys(experiment, set_aside=True) == {("t_00000", 1)} and not victim.exists()
    [kept] = store.damaged_files(experiment)
    assert Location.of(kept).read_bytes() == GARBAGE
    assert "moved to" in capsys.readouterr().err


def test_report_of_an_experiment_on_s3_is_written_locally(s3_bucket, tmp_path, monkeypatch):
    from qworld.cli.analysis import _cmd_report

    monkeypatch.chdir(tmp_path)
    exp = Location.of(f"{s3_bucket}/results/smoke")
    (exp / SPEC_FILE).write_text(SMOKE.read_text())
    fake_trial(exp)
    store.write_rows(exp, finite_rows("t_00000", 1))
    assert _cmd_report(SimpleNamespace(experiment_dir=exp.uri, out=None)) == 0
    assert (tmp_path / "smoke-report" / "index.html").is_file()
    assert not list(tmp_path.glob("s3*"))
    shutil.rmtree(tmp_path / "smoke-report")
    assert _cmd_report(SimpleNamespace(experiment_dir=exp.uri, out=str(tmp_path / "out"))) == 0
    assert (tmp_path / "out" / "index.html").is_file()
