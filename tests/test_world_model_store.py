"""Stored world models (``worldmodels_p/``) and the report figures that read them.

No Ray: ``store.write_world_models`` / ``qworld_analysis.load_world_model`` on synthetic
arrays, ``score_checkpoint`` on a stand-in checkpoint whose Q is exact, the figures drawn
straight from arrays and a small synthetic experiment dir.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from qworld import metrics as K
from qworld.sweep import store
from qworld_analysis import load, load_world_model, write_report
from qworld_analysis import plots
from qworld_analysis.report import draw_safety_routes, route_choice
from qworld_envs import four_rooms
from tolerances import EPS32, float32_mse_atol

ENV_ID = "qworld/FourRooms-v0"
TASK = "corner_9_1_doorway"


def random_model(shape, seed=0) -> np.ndarray:
    """``[S, A, S]`` rows drawn from a Dirichlet: dense, not float32-representable."""
    return np.random.default_rng(seed).dirichlet(np.ones(shape[-1]), size=shape[:-1])


def shut_doorway(P: np.ndarray, mdp, cell=(7, 5)) -> np.ndarray:
    """A model that believes the doorway ``cell`` is a wall: moves into it stay put."""
    door = mdp.cell_to_state[cell]
    wrong = P.copy()
    for s in range(mdp.num_states):
        for a in range(mdp.num_actions):
            if s != door and wrong[s, a, door] > 0:
                wrong[s, a, s] += wrong[s, a, door]
                wrong[s, a, door] = 0.0
    return wrong


# --------------------------------------------------------------------------------------
# the store


def test_round_trip_and_layout(tmp_path):
    P = four_rooms("windy").P  # 1/2, 1/4: exact in float32, so exact after the round trip
    noisy = random_model(P.shape)
    path = store.write_world_models(tmp_path, "a1b2c_00003", 7, {"known_support": P, "pinv": noisy})
    assert path == tmp_path / "worldmodels_p" / "trial=a1b2c_00003-ckpt=000007.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no tmp file left
    back = load_world_model(tmp_path, "a1b2c_00003", 7, "known_support")
    assert back.dtype == np.float64 and back.shape == P.shape
    np.testing.assert_array_equal(back, P)
    dense = load_world_model(tmp_path, "a1b2c_00003", 7, "pinv")
    # float32 storage: one rounding (EPS32 / 2) and the loader's renormalisation by a row sum
    # within EPS32 / 2 of 1, relative to each entry; 2 EPS32 covers the second order
    np.testing.assert_allclose(dense, noisy, rtol=2 * EPS32, atol=0)
    np.testing.assert_allclose(dense.sum(-1), 1.0, atol=1e-12)
    assert store.world_model_keys(tmp_path) == {("a1b2c_00003", 7)}
    # odd trial ids get the same safe name as the rows' parquet file
    store.write_world_models(tmp_path, "run/1 x", 0, {"pinv": P})
    np.testing.assert_array_equal(load_world_model(tmp_path, "run/1 x", 0, "pinv"), P)
    assert (tmp_path / "worldmodels_p" / "trial=run_1_x-ckpt=000000.npz").is_file()


def test_missing_keys_name_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match="no world models are stored"):
        load_world_model(tmp_path, "a1b2c_00000", 0, "pinv")
    P = four_rooms("deterministic").P
    store.write_world_models(tmp_path, "a1b2c_00000", 2, {"pinv": P, "column_match": P})
    store.write_world_models(tmp_path, "a1b2c_00000", 5, {"pinv": P})
    with pytest.raises(KeyError, match=r"'sgd'.*stored methods: \['column_match', 'pinv'\]"):
        load_world_model(tmp_path, "a1b2c_00000", 2, "sgd")
    with pytest.raises(FileNotFoundError, match=r"checkpoint 3; stored checkpoints of this trial: \[2, 5\]"):
        load_world_model(tmp_path, "a1b2c_00000", 3, "pinv")
    with pytest.raises(FileNotFoundError, match=r"trial 'zzz'.*stored trials: \['a1b2c_00000'\]"):
        load_world_model(tmp_path, "zzz", 2, "pinv")
    with pytest.raises(ValueError, match=r"P_hat\[S, A, S\]"):
        store.write_world_models(tmp_path, "a1b2c_00000", 2, {"pinv": P[0]})


def test_rescoring_replaces_the_file(tmp_path):
    P = four_rooms("deterministic").P
    store.write_world_models(tmp_path, "t", 1, {"pinv": P, "sgd": P})
    store.write_world_models(tmp_path, "t", 1, {"sgd": shut_doorway(P, four_rooms("deterministic"))})
    with pytest.raises(KeyError, match=r"stored methods: \['sgd'\]"):
        load_world_model(tmp_path, "t", 1, "pinv")
    assert not np.array_equal(load_world_model(tmp_path, "t", 1, "sgd"), P)
    # nothing extracted this time (e.g. every method failed): the stale models go too
    assert store.write_world_models(tmp_path, "t", 1, {}) is None
    assert store.world_model_keys(tmp_path) == set()


def test_rows_rewritten_while_a_reader_sets_the_damaged_file_aside_stay_in_place(tmp_path, monkeypatch, capsys):
    """A reader finds a key's file damaged; before it moves it to ``damaged/``, a scorer
    renames fresh good rows into place (a new inode). The reader's move must leave those
    rows where they are: the key stays scored, nothing is set aside, nothing is reported.

    The race is made deterministic by running the scorer's write inside ``store._set_aside``,
    which a reader that sets damage aside (``set_aside=True``: resume, extract) calls between
    reading a damaged file and moving it."""
    def rows(p_mse):
        return [{K.SWEEP: "s", K.TRIAL_ID: "t_00001", K.CHECKPOINT_INDEX: 0, K.METHOD: m,
                 K.P_MSE: p_mse + i, K.ENV_STEPS: 256} for i, m in enumerate(("pinv", "column_match"))]

    victim = store.write_rows(tmp_path, rows(0.5))
    victim.write_bytes(b"\x00disk full\xff" * 37)  # damaged in place (the same inode)
    set_aside, raced = store._set_aside, []

    def rescored_meanwhile(path, *args, **kwargs):
        raced.append(path)
        store.write_rows(tmp_path, rows(0.25))  # the scorer's atomic rename lands here
        return set_aside(path, *args, **kwargs)

    monkeypatch.setattr(store, "_set_aside", rescored_meanwhile)
    store.read_store(tmp_path, set_aside=True)  # this reader read the damaged bytes
    monkeypatch.undo()
    assert [str(p) for p in raced] == [str(victim)]
    assert victim.is_file() and store.damaged_files(tmp_path) == []
    assert "damaged results file" not in capsys.readouterr().err
    assert store.scored_keys(tmp_path) == {("t_00001", 0)}
    assert store.read_store(tmp_path).set_index(K.METHOD)[K.P_MSE].to_dict() == {"pinv": 0.25, "column_match": 1.25}


def test_score_checkpoint_hands_out_every_extracted_model(tmp_path, monkeypatch):
    import qworld.agents
    from qworld.worldmodel.bellman import solve_goal_q
    from qworld.sweep.score import score_checkpoint
    from qworld_envs import make_finite_problem

    env_kwargs = {"variant": "deterministic", "goal_type": "indicator", "num_goals": 4, "goal_seed": 0}
    task = make_finite_problem(ENV_ID, **env_kwargs)
    Q, _ = solve_goal_q(task.mdp.P, task.goals.rewards, 0.9, task.goals.terminal)

    class ExactQ:  # a checkpoint whose agent knows Q exactly
        config = {"env_id": ENV_ID, "env_kwargs": env_kwargs, "gamma": 0.9, "head": "all_goals", "seed": 0}

        def q_table(self):
            return Q

    monkeypatch.setattr(qworld.agents, "load_q", lambda path: ExactQ())
    models: dict = {}
    rows = score_checkpoint(tmp_path / "checkpoint_000004", sweep="s", trial_id="t0",
                            methods=["column_match", "pinv", "no_such_method"], world_models=models)
    assert [r[K.METHOD] for r in rows] == ["column_match", "pinv", "no_such_method"]
    assert rows[2][K.ERROR] and sorted(models) == ["column_match", "pinv"]  # a failure stores nothing
    path = store.write_world_models(tmp_path, "t0", rows[0][K.CHECKPOINT_INDEX], models)
    assert path.name == "trial=t0-ckpt=000004.npz"
    for row in rows[:2]:  # the stored model is the one each row scored
        stored = load_world_model(tmp_path, "t0", 4, row[K.METHOD])
        np.testing.assert_allclose(stored, models[row[K.METHOD]], rtol=2 * EPS32, atol=0)  # as above
        assert row[K.P_MSE] == pytest.approx(np.mean((stored - task.mdp.P) ** 2), rel=0,
                                             abs=float32_mse_atol(stored, task.mdp.P))


# --------------------------------------------------------------------------------------
# figures


def png(path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    return data


def test_safety_route_figure_depends_on_the_models(tmp_path):
    mdp = four_rooms("windy")
    good, bad = mdp.P, shut_doorway(mdp.P, mdp)
    draw = lambda models, name: png(plots.plot_safety_routes(models, tmp_path / name, TASK, "windy"))  # noqa: E731
    a = draw({"L = 4": good, "L = 17": good}, "a.png")
    assert a == draw({"L = 4": good, "L = 17": good}, "a2.png")  # same data, same bytes
    b = draw({"L = 4": good, "L = 17": bad}, "b.png")
    assert a != b
    # the pixels differ inside the second panel (its route), not in the first
    from matplotlib.image import imread

    ia, ib = imread(tmp_path / "a.png"), imread(tmp_path / "b.png")
    diff = np.abs(ia - ib).sum(axis=-1) > 0
    assert ia.shape == ib.shape and diff[:, ia.shape[1] // 2:].sum() > 100 and diff[:, :ia.shape[1] // 2].sum() == 0
    with pytest.raises(plots.NoDataError):
        plots.plot_safety_routes({}, tmp_path / "none.png", TASK, "windy")


def test_paper_values_marked_on_matching_cells(tmp_path):
    assert plots.paper_p_mse("windy", 4) == 1.3e-3 and plots.paper_p_mse("deterministic", 1) == 0.0
    assert plots.paper_p_mse("windy", 3) is None and plots.paper_p_mse("windy", 4, "dense") is None

    def frame(goals):
        rows = [{K.TRIAL_ID: f"t{L}_{seed}", K.VARIANT: "windy", K.GOAL_TYPE: "indicator",
                 K.NUM_GOALS: L, K.SEED: seed, K.METHOD: "pinv", K.CHECKPOINT_INDEX: k,
                 K.ENV_STEPS: 1000 * (k + 1), K.P_MSE: 1e-2 / (k + 1) / L * (1 + seed)}
                for L in goals for seed in (0, 1) for k in range(3)]
        import pandas as pd

        return pd.DataFrame(rows)

    matching, other = frame((1, 4)), frame((2, 3))
    with_ref = png(plots.plot_error_vs_steps(matching, tmp_path / "a.png"))
    assert with_ref != png(plots.plot_error_vs_steps(matching, tmp_path / "b.png", paper=None))
    # no (variant, L) of the paper: the default draws exactly what paper=None draws
    assert (png(plots.plot_error_vs_steps(other, tmp_path / "c.png"))
            == png(plots.plot_error_vs_steps(other, tmp_path / "d.png", paper=None)))


# --------------------------------------------------------------------------------------
# the report on a small experiment dir


def make_experiment(root, variant="windy", goals=(4, 17), seeds=(0, 1, 2),
                    methods=("pinv", "known_support"), models=True):
    """One trial per (L, seed), two checkpoints; pinv's error shrinks with L and seed."""
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(f"name: wm\nenv:\n  id: {ENV_ID}\nsweep:\n  num_goals: {list(goals)}\n")
    mdp = four_rooms(variant)
    P, bad = mdp.P, shut_doorway(mdp.P, mdp)
    for i, (L, seed) in enumerate((L, s) for L in goals for s in seeds):
        trial_id = f"a1b2c_{i:05d}"
        trial = root / f"PQN_qworld_FourRooms-v0_{trial_id}_{i}"
        trial.mkdir()
        kwargs = {"variant": variant, "goal_type": "indicator", "num_goals": L, "goal_seed": 0}
        (trial / "params.json").write_text(json.dumps({"env_id": ENV_ID, "env_kwargs": kwargs,
                                                       "head": "all_goals", "seed": seed, "gamma": 0.99}))
        (trial / "result.json").write_text(json.dumps({"trial_id": trial_id, "training_iteration": 1,
                                                       K.TRAIN_ENV_STEPS: 512}) + "\n")
        for k in range(2):
            # the middle seed's pinv model at L = 17 believes (7,5) is shut: its route differs
            pinv = bad if (L, seed, k) == (17, 1, 1) else P
            rows = [{K.SWEEP: "wm", K.TRIAL_ID: trial_id, K.CHECKPOINT_INDEX: k, K.ENV_STEPS: 512 * (k + 1),
                     K.METHOD: m, K.ERROR: None, K.VARIANT: variant, K.NUM_GOALS: L,
                     K.P_MSE: (0.0 if m == "known_support" else 1e-3 / L / (k + 1) * (1 + seed)),
                     f"{TASK}/{K.PLAN_SUCCESS}": 1.0} for m in methods]
            if models:
                store.write_world_models(root, trial_id, k, {"pinv": pinv, "known_support": P})
            store.write_rows(root, rows)
    return root


def test_route_choice_picks_the_honest_method_and_the_median_seed(tmp_path):
    exp = make_experiment(tmp_path / "exp")
    choice = route_choice(load(exp), exp, "windy")
    # known_support has the lower error but is an oracle
    assert choice["method"] == "pinv" and choice["task"] == TASK
    titles = [t for t, _, _ in choice["panels"]]
    assert [(tid, ck) for _, tid, ck in choice["panels"]] == [("a1b2c_00001", 1), ("a1b2c_00004", 1)]
    assert titles[0].startswith("L = 4 · seed 1 · p_mse") and "plan success 1.00" in titles[1]
    assert route_choice(load(exp), exp, "windy", method="known_support")["method"] == "known_support"


def test_report_draws_the_route_figure_and_labels_oracles(tmp_path):
    exp = make_experiment(tmp_path / "exp")
    out = tmp_path / "report"
    page = write_report(exp, out).read_text()
    route_png = png(out / "safety_routes_windy.png")
    assert "safety_routes_windy.png" in page and "Safety routes (windy, corner_9_1_doorway)" in page
    assert "known_support (oracle)" in page and "Oracle (handed the true support of P" in page
    assert len(re.findall(r"known_support \(oracle\)", page)) >= 2  # the line and the tables
    # the figure shows the stored models: the median seed's model at L = 17 is the bad one
    store.write_world_models(exp, "a1b2c_00004", 1, {"pinv": four_rooms("windy").P})
    redrawn = draw_safety_routes(route_choice(load(exp), exp, "windy"), exp, tmp_path / "again.png")
    assert png(redrawn) != route_png


def test_report_without_stored_models_says_why(tmp_path):
    exp = make_experiment(tmp_path / "old", goals=(4,), seeds=(0,), models=False)
    page = write_report(exp).read_text()
    assert not (exp / "report" / "safety_routes_windy.png").exists()
    assert re.search(r"Safety routes \(windy\): no world models stored in .*worldmodels_p", page)
    assert "qworld extract" in page
