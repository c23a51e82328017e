"""The sweep's console (event lines, the final per-cell table) and its driver-side W&B runs,
without Ray: fake Tune trials, a results store written by hand, real offline W&B files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml
from live import HANG_GUARD_S

from qworld import metrics as K
from qworld.sweep import store
from qworld.sweep.callbacks import GridWandbCallback, SweepConsole, result_summary
from qworld.cli.sweep import final_table

ROOT = Path(__file__).resolve().parents[1]
TASK = "corner_9_9_doorway"


class FakeTrial(SimpleNamespace):
    def __str__(self):
        return f"PQN_{self.trial_id}"


def fake_trial(trial_id: str, variant: str, tmp_path: Path | None = None, error: str | None = None):
    error_file = None
    if error is not None:
        error_file = tmp_path / f"{trial_id}-error.txt"
        error_file.write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{error}\n")
    return FakeTrial(
        trial_id=trial_id, config={"env_kwargs": {"variant": variant}, "seed": 0, "lr": 1e-3},
        error_file=str(error_file) if error_file else None,
        last_result={"training_iteration": 3, K.TRAIN_ENV_STEPS: 3072,
                     "learner": {"td_loss": 0.0123}, "env_runners": {"episode_success_mean": 0.5}})


def test_event_lines_name_the_trial_its_cell_and_its_numbers(tmp_path):
    out = io.StringIO()
    console = SweepConsole(tmp_path, grid_axes=("variant",), methods=("pinv", "sgd"), out=out)
    trial = fake_trial("abc_00001", "windy")
    console.on_trial_start(0, [], trial)
    console.on_trial_complete(0, [], trial)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("trial abc_00001 started: variant=windy")
    assert lines[1].endswith("trial abc_00001 (windy) finished: 3 iterations, 3,072 env steps, "
                             "td_loss 0.0123, success 0.5")


def test_scored_line_reads_q_nmse_from_the_store_and_prints_the_first_method(tmp_path):
    out = io.StringIO()
    console = SweepConsole(tmp_path, grid_axes=("variant",), methods=("pinv", "sgd"), out=out)
    console.remember("abc_00001", {"env_kwargs": {"variant": "windy"}})
    base = {K.TRIAL_ID: "abc_00001", K.CHECKPOINT_INDEX: 3, K.ENV_STEPS: 4096, K.Q_NMSE: 0.0125}
    store.write_rows(tmp_path, [{**base, K.METHOD: "sgd", K.P_MSE: 2e-3, K.ERROR: None},
                                {**base, K.METHOD: "pinv", K.P_MSE: 1e-3, K.ERROR: None}])
    console.scored("abc_00001", 3, {"sgd": 2e-3, "pinv": 1e-3})
    line = out.getvalue().strip()
    assert line.endswith("scored abc_00001 (windy) checkpoint 3 (4,096 env steps): "
                         "q_nmse 0.0125, p_mse pinv 1.00e-03")


def test_a_failed_trial_shows_its_error_on_stderr(tmp_path, capsys):
    console = SweepConsole(tmp_path, grid_axes=("variant",))
    trial = fake_trial("abc_00002", "teleport", tmp_path, error="ValueError: boom")
    console.on_trial_error(0, [], trial)
    err = capsys.readouterr().err
    assert "trial abc_00002 (teleport) ERRORED: ValueError: boom" in err
    assert "Traceback (most recent call last)" in err  # the whole error file, not hidden
    console.on_trial_recover(0, [], trial)
    assert "failed and is retried" in capsys.readouterr().err


def test_result_summary_skips_what_the_result_lacks():
    assert result_summary({}) == "no result"
    assert result_summary({"training_iteration": 2, K.TRAIN_ENV_STEPS: 10}) == "2 iterations, 10 env steps"


def test_final_table_one_block_per_cell_methods_as_rows_seeds_averaged(tmp_path):
    spec = yaml.safe_load((ROOT / "tune_configs" / "smoke.yaml").read_text())
    spec["sweep"] = {"variant": ["deterministic", "windy"], "seed": [0, 1]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    values = {("deterministic", 0): 0.1, ("deterministic", 1): 0.3, ("windy", 0): 0.5, ("windy", 1): 0.7}
    for i, ((variant, seed), q) in enumerate(values.items()):
        trial_id = f"t_{i:05d}"
        for ckpt, last in ((0, False), (1, True)):
            base = {K.SWEEP: "smoke", K.TRIAL_ID: trial_id, K.CHECKPOINT_INDEX: ckpt, K.VARIANT: variant,
                    K.NUM_GOALS: 8, K.SEED: seed, K.ENV_STEPS: 1024 * (ckpt + 1),
                    K.Q_NMSE: q if last else 9.0, K.ERROR: None}
            store.write_rows(tmp_path, [
                {**base, K.METHOD: "pinv", K.P_MSE: q / 10 if last else 1.0, f"{TASK}/{K.PLAN_SUCCESS}": float(seed)},
                {**base, K.METHOD: "column_match", K.P_MSE: q / 100, f"{TASK}/{K.PLAN_SUCCESS}": 1.0},
            ])
    lines = final_table(tmp_path).splitlines()
    assert lines[0].startswith("Final checkpoints (mean over seeds)")
    assert lines[1].split() == ["variant", "seeds", "env_steps", "q_nmse", "method", "p_mse", TASK]
    rows = [ln.split() for ln in lines[2:]]
    assert rows == [
        ["deterministic", "2", "2,048", "0.2", "pinv", "2.00e-02", "0.50"],
        ["column_match", "2.00e-03", "1.00"],
        ["windy", "2", "2,048", "0.6", "pinv", "6.00e-02", "0.50"],
        ["column_match", "6.00e-03", "1.00"],
    ]


def test_final_table_reports_error_rows(tmp_path):
    base = {K.TRIAL_ID: "t_00000", K.CHECKPOINT_INDEX: 0, K.VARIANT: "windy"}
    store.write_rows(tmp_path, [{**base, K.METHOD: "load", K.ERROR: "OSError: corrupt"}])
    text = final_table(tmp_path)
    assert "1 rows with errors" in text and "OSError: corrupt" in text


def read_records(run_dir: Path) -> list[dict]:
    wandb_bin = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_driver_wandb_runs_are_finished_with_the_trial_and_hold_every_result(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cb = GridWandbCallback(project="qworld", group="g", grid_axes=("variant",), dir=str(tmp_path),
                           mode="offline")
    ok, bad = fake_trial("ok_00000", "windy"), fake_trial("bad_00001", "teleport")
    for trial in (ok, bad):
        cb.log_trial_start(trial)
    for it in (1, 2, 3):
        for trial in (ok, bad):
            cb.log_trial_result(it, trial, {"training_iteration": it, K.TRAIN_ENV_STEPS: 100 * it,
                                            "learner": {"td_loss": 1.0 / it}, "trial_id": trial.trial_id,
                                            "config": {"huge": list(range(5))}, "done": False})
    cb.log_trial_end(ok, failed=False)
    cb.on_experiment_end([ok, bad])  # bad never ended: finished as failed, service stopped
    assert not cb._runs
    runs = {}
    for run_dir in (tmp_path / "wandb").glob("offline-run-*"):
        records = read_records(run_dir)
        [run] = [r["run"] for r in records if r["type"] == "run"]
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        exits = [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"]
        runs[run["run_id"]] = (run, history, exits)
    assert set(runs) == {"ok_00000", "bad_00001"}
    run, history, exits = runs["ok_00000"]
    assert run["run_group"] == "g" and run["tags"] == ["variant=windy", "algorithm=pqn"] and exits == [0]
    assert [h[K.TRAIN_ENV_STEPS] for h in history] == [100, 200, 300]
    assert all("learner/td_loss" in h and "done" not in h and "trial_id" not in h for h in history)
    assert runs["bad_00001"][2] == [1]
    # pickled with the experiment (Tuner.restore): no live runs travel
    import pickle

    assert pickle.loads(pickle.dumps(cb))._runs == {}


def test_final_table_labels_oracle_methods(tmp_path):
    base = {K.SWEEP: "s", K.TRIAL_ID: "t_00000", K.CHECKPOINT_INDEX: 0, K.VARIANT: "windy", K.SEED: 0,
            K.ENV_STEPS: 1024, K.Q_NMSE: 0.1, K.ERROR: None}
    store.write_rows(tmp_path, [{**base, K.METHOD: "moves", K.P_MSE: 1e-6},
                                {**base, K.METHOD: "known_support", K.P_MSE: 1e-4}])
    rows = final_table(tmp_path).splitlines()[2:]
    assert [("(oracle)" in ln) for ln in rows] == [("known_support" in ln) for ln in rows] and len(rows) == 2
    assert any("(oracle)" in ln for ln in rows)
