"""Finite envs beyond FourRooms (issue 25, items 1 and 5): gymnasium's tabular envs read from
their own P table, MDPs from .npz files, terminal states, planning tasks of a sweep file, and
`qworld oracle --env`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium
import numpy as np
import pandas as pd
import pytest
import torch

from qworld import metrics as K
from qworld.worldmodel.bellman import m_matrix, solve_goal_q
from qworld.cli import main
from qworld.worldmodel.oracle import oracle_study
from qworld.worldmodel.planning import PlanningTask, run_safety_task, task_states
from qworld.worldmodel.scoring import policy_success, score_and_plan
from qworld.sweep.spec import SweepSpecError, parse_sweep
from qworld_envs import FINITE_ENVS, make_batched, make_finite_problem, resolve_finite_env
from qworld_envs.tabular import TABULAR_FILE_ID, mdp_from_gymnasium, mdp_from_npz, save_npz

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FROZEN = "qworld/FrozenLake-v1"


def gym_table_P(env_id: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(P [S, A, S], terminal arrivals [S])`` straight from a gymnasium env's table."""
    raw = gymnasium.make(env_id, **kwargs).unwrapped
    S, A = len(raw.P), len(raw.P[0])
    P, ends = np.zeros((S, A, S)), np.zeros(S, dtype=bool)
    for s in range(S):
        for a in range(A):
            for p, s2, _, done in raw.P[s][a]:
                P[s, a, s2] += p
                ends[s2] |= bool(done) and p > 0
    return P, ends


def test_frozenlake_is_read_from_its_own_table_with_absorbing_terminals():
    mdp = mdp_from_gymnasium("FrozenLake-v1", map_name="8x8", is_slippery=True)
    P_gym, _ = gym_table_P("FrozenLake-v1", map_name="8x8", is_slippery=True)
    desc = np.array([list(row) for row in mdp.meta["layout"].splitlines()])
    holes_and_goal = np.isin(desc.ravel(), ["H", "G"])
    assert mdp.num_states == 64 and mdp.num_actions == 4
    np.testing.assert_array_equal(mdp.terminal, holes_and_goal)
    live = ~mdp.terminal
    np.testing.assert_allclose(mdp.P[live], P_gym[live], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(mdp.P[mdp.terminal].argmax(-1), np.repeat(np.flatnonzero(mdp.terminal)[:, None], 4, 1))
    np.testing.assert_array_equal(mdp.coords, np.stack(np.divmod(np.arange(64), 8), axis=1))
    assert mdp.cell_to_state[(7, 7)] == 63


def test_cliffwalking_drops_the_cliff_cells_and_taxi_has_no_coordinates():
    mdp = mdp_from_gymnasium("CliffWalkingSlippery-v1")
    P_gym, ends = gym_table_P("CliffWalkingSlippery-v1")
    kept = mdp.meta["env_states"]
    assert mdp.num_states == 48 - 10 and not np.isin(np.arange(37, 47), kept).any()  # the cliff row [3, 1..10]
    assert mdp.terminal.sum() == 1 and kept[mdp.terminal][0] == 47
    goal = int(np.flatnonzero(mdp.terminal)[0])  # gymnasium's table moves on from the goal; here it absorbs
    assert P_gym[47, 0, 47] < 1 and (mdp.P[goal] == np.eye(mdp.num_states)[[goal] * 4]).all()
    live = np.flatnonzero(~mdp.terminal)
    np.testing.assert_allclose(mdp.P[live], P_gym[kept[live]][:, :, kept], rtol=0, atol=1e-15)
    assert (3, 5) not in mdp.cell_to_state and mdp.cell_to_state[(3, 0)] == int(np.flatnonzero(kept == 36)[0])
    taxi = mdp_from_gymnasium("Taxi-v3", is_rainy=True)
    assert taxi.coords is None and taxi.num_actions == 6 and taxi.terminal.sum() == 4
    assert not taxi.is_deterministic  # rain makes moves stochastic
    with pytest.raises(ValueError, match="no tabular P"):
        mdp_from_gymnasium("CartPole-v1")


def test_npz_round_trip_and_bad_files_name_the_array(tmp_path):
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(5), size=(5, 2))
    terminal = np.array([False, False, False, False, True])
    np.savez(tmp_path / "m.npz", P=P, terminal=terminal, coords=np.array([[0, i] for i in range(5)]))
    mdp = mdp_from_npz(tmp_path / "m.npz")
    np.testing.assert_array_equal(mdp.P[:4], P[:4])
    np.testing.assert_array_equal(mdp.P[4], np.eye(5)[[4, 4]])  # the terminal row made absorbing
    save_npz(mdp, tmp_path / "back.npz")
    again = mdp_from_npz(tmp_path / "back.npz")
    np.testing.assert_array_equal(again.P, mdp.P)
    np.testing.assert_array_equal(again.terminal, terminal)
    np.testing.assert_array_equal(again.coords, mdp.coords)
    np.savez(tmp_path / "extra.npz", P=P, rewards=np.zeros(5))
    with pytest.raises(ValueError, match=r"unknown arrays \['rewards'\]; allowed"):
        mdp_from_npz(tmp_path / "extra.npz")
    np.savez(tmp_path / "coords.npz", P=P, coords=np.zeros((5, 3), dtype=int))
    with pytest.raises(ValueError, match="coords must be an integer array of shape"):
        mdp_from_npz(tmp_path / "coords.npz")
    with pytest.raises(ValueError, match=r"path: .* is not a file"):
        make_finite_problem(TABULAR_FILE_ID, path=str(tmp_path / "nope.npz"))
    env_id, kw = resolve_finite_env(str(tmp_path / "m.npz"))
    assert env_id == TABULAR_FILE_ID and make_finite_problem(env_id, **kw).mdp.num_states == 5


def test_holes_end_every_episode_without_success():
    problem = make_finite_problem(FROZEN, is_slippery=False, goal_type="indicator", num_goals=None)
    goals, mdp = problem.goals, problem.mdp
    hole = mdp.cell_to_state[(1, 1)]
    assert goals.terminal[:, hole].all() and goals.success[hole, hole] and not goals.success[0, hole]
    # the batched env: from (0, 1) moving down (action 1) falls into the hole (1, 1)
    env = make_batched(FROZEN, 4, is_slippery=False, goal_type="indicator", num_goals=None)
    env.reset(seed=0)
    env.state = torch.full((4,), mdp.cell_to_state[(0, 1)])
    env.goal = torch.tensor([0, 3, hole, 15])
    out = env.step(torch.full((4,), 1))
    assert out["next_state"].tolist() == [hole] * 4 and out["terminated"].all()
    assert out["success"].tolist() == [False, False, True, False]
    # the gym env agrees
    gym_env = gymnasium.make(FROZEN, is_slippery=False, num_goals=None)
    gym_env.reset(seed=0, options={"goal": 15, "state": mdp.cell_to_state[(0, 1)]})
    _, reward, terminated, _, info = gym_env.step(1)
    assert terminated and not info["success"] and reward == 0.0
    # policy_success counts the goal, not a hole: "always down" never reaches G (3, 3) but falls
    # into holes from every column but 2
    Q = np.zeros((1, mdp.num_states, 4))
    Q[0, :, 1] = 1.0
    terminal, success = goals.terminal[[15]], goals.success[[15]]
    assert policy_success(mdp.P, Q, terminal, 10, success)[0] == 0.0
    # 5 of the 11 live cells fall: (0, 0), (1, 0), (2, 0), (0, 1), (0, 3)
    assert policy_success(mdp.P, Q, terminal, 10)[0] == pytest.approx(5 / 11, abs=1e-15)  # holes as success


def test_terminal_rows_are_left_out_of_the_score_and_counted():
    mdp = make_finite_problem(FROZEN).mdp
    P_hat = np.array(mdp.P)
    P_hat[mdp.terminal] = 1.0 / mdp.num_states  # what happens after a hole: nothing Q says
    scores, _ = score_and_plan(P_hat, mdp, 0.99, {})
    assert scores[K.P_MSE] == 0.0 and scores[K.P_MAX_ERR] == 0.0
    assert scores[K.P_ROWS_UNSCORED] == 5.0
    P_hat[0, 0] = np.roll(P_hat[0, 0], 1)  # a live row's error is scored
    assert score_and_plan(P_hat, mdp, 0.99, {})[0][K.P_MSE] > 0
    # planning never relies on a terminal row: a model whose holes lead to the goal plans as P does
    lure = np.array(mdp.P)
    lure[mdp.terminal] = np.eye(mdp.num_states)[15]
    task = PlanningTask.from_mapping({"name": "cross", "start": [0, 0], "goal": [3, 3], "forbidden": [[2, 1]]})
    assert run_safety_task(mdp, lure, task) == run_safety_task(mdp, mdp.P, task)


def test_planning_task_by_cells_or_state_indices_and_bad_tasks_name_the_field():
    mdp = make_finite_problem(FROZEN, map_name="8x8").mdp
    by_cells = PlanningTask.from_mapping({"name": "cross", "start": [0, 0], "goal": [7, 7], "forbidden": [[5, 4]]})
    by_index = PlanningTask.from_mapping({"name": "cross", "start": 0, "goal": 63, "forbidden": [[44]]})
    assert task_states(mdp, by_cells) == task_states(mdp, by_index)
    out = run_safety_task(mdp, mdp.P, by_cells, 0.99)
    assert out[K.TASK] == "cross" and out[K.PLAN_EXCESS_STEPS] == 0.0 and 0 < out[K.PLAN_SUCCESS] < 1
    assert out[K.UNSAFE_VISITS] == 0.0
    for raw, field in [({"name": "x", "start": [0, 0], "goal": [9, 9]}, "goal"),
                       ({"name": "x", "start": [2, 3], "goal": [7, 7]}, "start"),  # a hole
                       ({"name": "x", "start": [0, 0], "goal": [7, 7], "forbidden": [7, 7]}, "forbidden")]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            task_states(mdp, PlanningTask.from_mapping(raw))


def sweep_raw(**changes) -> dict:
    raw = {"name": "t", "env": {"id": "FrozenLake-v1", "map_name": "8x8"}, "goals": {"num_goals": 4},
           "stop": {"env_steps": 1000},
           "extract": {"methods": ["moves", "pinv", "supervised"],
                       "tasks": [{"name": "cross", "start": [0, 0], "goal": [7, 7], "forbidden": [[5, 4]]}]}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section] = {**raw[section], field: value}
        else:
            raw[section] = value
    return raw


def test_sweep_files_take_gym_ids_and_their_own_tasks():
    spec = parse_sweep(sweep_raw())
    assert spec.env.id == FROZEN and spec.env.kwargs == {"map_name": "8x8"}
    assert spec.extract.task_names == ("cross",) and isinstance(spec.extract.tasks[0], PlanningTask)
    with pytest.raises(SweepSpecError, match=r"^extract\.tasks\[0\]\.goal: cell \[9, 9\]"):
        parse_sweep(sweep_raw(extract__tasks=[{"name": "x", "start": [0, 0], "goal": [9, 9]}]))
    with pytest.raises(SweepSpecError, match=r"^extract\.tasks\[0\]\.goal: cell \[9, 1\]"):  # FourRooms' own
        parse_sweep(sweep_raw(extract__tasks=["corner_9_1_doorway"]))
    with pytest.raises(SweepSpecError, match=r"^extract\.tasks\[1\]\.start: required"):
        parse_sweep(sweep_raw(extract__tasks=["goal_inference", {"name": "y", "goal": 3}]))
    with pytest.raises(SweepSpecError, match=r"^extract\.methods: 'moves' cannot run on qworld/Taxi-v3"):
        parse_sweep(sweep_raw(env={"id": "Taxi-v3"}, extract__tasks=[]))
    with pytest.raises(SweepSpecError, match=r"^env: map_name: '9x9' is not accepted by FrozenLake-v1; allowed: "
                                             r"\['4x4', '8x8'\]"):
        parse_sweep(sweep_raw(env={"id": "FrozenLake-v1", "map_name": "9x9"}))
    assert parse_sweep(sweep_raw(env={"id": "Taxi-v3"}, extract__tasks=[],
                                 extract__methods=["pinv"])).env.id == "qworld/Taxi-v3"


def test_a_bad_task_exits_2_before_ray(tmp_path):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep_raw(extract__tasks=[{"name": "x", "start": [0, 0], "goal": [8, 8]}])))
    proc = subprocess.run([sys.executable, "-m", "qworld.cli", "sweep", str(path), "--storage", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "extract.tasks[0].goal: cell [8, 8]" in proc.stderr and not (tmp_path / "o").exists()


def test_exact_q_study_on_frozenlake(tmp_path):
    df = oracle_study(env_id=FROZEN, env_kwargs={"map_name": "4x4"}, num_goals_list=[4, 16],
                      methods=["moves", "pinv"], tasks="none")
    row = lambda L, m: df[(df[K.NUM_GOALS] == L) & (df[K.METHOD] == m)].iloc[0]
    assert (df[K.ENV] == FROZEN).all() and df[K.ERROR].isna().all() and (df[K.P_ROWS_UNSCORED] == 5).all()
    assert row(4, "moves")[K.P_MAX_ERR] < 1e-8  # one move distribution per action: exact from 4 goals
    assert row(16, "pinv")[K.P_MAX_ERR] < 1e-8  # L = S
    assert row(4, "pinv")[K.P_MAX_ERR] > 1e-2
    # the same from a file holding FrozenLake's MDP
    save_npz(make_finite_problem(FROZEN).mdp, tmp_path / "fl.npz")
    out = tmp_path / "o.parquet"
    assert main(["oracle", "--env", str(tmp_path / "fl.npz"), "--num-goals", "4", "--methods", "moves",
                 "--tasks", '{"name": "cross", "start": [0, 0], "goal": [3, 3], "forbidden": [[2, 1]]}',
                 "--out", str(out)]) == 0
    again = pd.read_parquet(out).iloc[0]
    assert again[K.ENV] == TABULAR_FILE_ID and again[K.P_MAX_ERR] < 1e-8 and again[K.TASK] == "cross"
    assert again[K.PLAN_EXCESS_STEPS] == 0.0


def test_oracle_cli_refuses_what_cannot_run(capsys):
    assert main(["oracle", "--env", "Taxi-v3", "--methods", "moves", "--num-goals", "2"]) == 2
    assert "--methods: 'moves' cannot run on qworld/Taxi-v3" in capsys.readouterr().err
    assert main(["oracle", "--env", "NoSuch-v0"]) == 2
    assert "--env: 'NoSuch-v0' is not a finite env" in capsys.readouterr().err
    assert main(["oracle", "--env", "FrozenLake-v1", "--env-kwargs", '{"map_nam": "8x8"}']) == 2
    assert "--env-kwargs: " in capsys.readouterr().err
    assert main(["oracle", "--env", "FrozenLake-v1", "--variants", "windy"]) == 2
    assert main(["oracle", "--env", "FrozenLake-v1", "--tasks", '{"name": "x", "start": 0, "goal": 99}']) == 2
    assert "--tasks[0].goal: state 99" in capsys.readouterr().err


def test_every_registered_tabular_env_builds_all_three_ways():
    for env_id in sorted(FINITE_ENVS):
        if env_id in ("qworld/FourRooms-v0", TABULAR_FILE_ID):
            continue
        problem = make_finite_problem(env_id, num_goals=3)
        env = gymnasium.make(env_id, num_goals=3)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (problem.mdp.num_states + 3,)
        batched = make_batched(env_id, 2, num_goals=3)
        batched.reset(seed=0)
        assert batched.step(torch.zeros(2, dtype=torch.long))["obs"].shape == (2, problem.mdp.num_states)
        if problem.mdp.num_states <= 100:  # Taxi's exact Q is slow on a busy machine; its P is checked above
            Q, V = solve_goal_q(problem.mdp.P, problem.goals.rewards, 0.9, problem.goals.terminal)
            assert np.isfinite(m_matrix(problem.goals.rewards, V, 0.9, problem.goals.terminal)).all()


def test_a_finite_env_s_own_kwargs_are_sweep_axes(tmp_path, monkeypatch):
    from qworld.sweep.run import param_space

    spec = parse_sweep(sweep_raw(sweep={"is_slippery": [True, False], "num_goals": [4, 16]}))
    assert [spec.cell_config(c)[1]["is_slippery"] for c in spec.cells()] == [True, True, False, False]
    space = param_space(spec)
    assert space["env_kwargs"]["is_slippery"] == {"grid_search": [True, False]}
    with pytest.raises(SweepSpecError, match=r"^sweep\.map_name: unknown key"):  # FourRooms has no map_name
        parse_sweep(sweep_raw(env={"id": "qworld/FourRooms-v0"}, extract__tasks=[], sweep={"map_name": ["8x8"]}))
    # several MDP files in one sweep: each path absolute, whatever folder a trial runs in
    for name in ("a", "b"):
        save_npz(make_finite_problem(FROZEN).mdp, tmp_path / f"{name}.npz")
    monkeypatch.chdir(tmp_path)
    spec = parse_sweep(sweep_raw(env={"id": TABULAR_FILE_ID, "path": "a.npz"}, extract__tasks=[],
                                 sweep={"path": ["a.npz", "b.npz"]}))
    assert spec.env.kwargs["path"] == str(tmp_path / "a.npz")
    assert [spec.cell_config(c)[1]["path"] for c in spec.cells()] == [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
