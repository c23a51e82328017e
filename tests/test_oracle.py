"""The oracle study and its CLI entry (qworld.worldmodel.oracle, qworld.cli)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qworld import metrics as K
from qworld.cli import main
from qworld.worldmodel.oracle import COLUMNS, oracle_study

torch.set_num_threads(1)


def test_cli_oracle_default_out_names_its_env_and_says_where(tmp_path, capsys, monkeypatch):
    # Catches an undocumented results/oracle.parquet that a study of another env overwrites.
    from qworld.cli.oracle import default_oracle_out

    assert default_oracle_out("qworld/FourRooms-v0") == Path("results/oracle.parquet")
    assert default_oracle_out("qworld/FrozenLake-v1") == Path("results/oracle_FrozenLake-v1.parquet")
    assert default_oracle_out("qworld/TabularMDP-v0", {"path": "/x/my mdp.npz"}) == Path("results/oracle_my_mdp.parquet")
    monkeypatch.chdir(tmp_path)
    assert main(["oracle", "--env", "FrozenLake-v1", "--env-kwargs", '{"map_name": "4x4"}', "--num-goals", "4",
                 "--methods", "pinv", "--tasks", "none"]) == 0
    written = tmp_path / "results" / "oracle_FrozenLake-v1.parquet"
    assert written.is_file() and not (tmp_path / "results" / "oracle.parquet").exists()
    assert str(written) in capsys.readouterr().out


def test_cli_oracle_writes_parquet(tmp_path, capsys):
    out = tmp_path / "sub" / "oracle.parquet"
    rc = main(
        ["oracle", "--variants", "deterministic", "windy", "--num-goals", "4", "68"]
        + ["--methods", "pinv", "column_match", "--out", str(out)]
    )
    assert rc == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 2 * 2 * 2
    assert set(zip(df[K.VARIANT], df[K.NUM_GOALS], df[K.METHOD])) == {
        (v, L, m) for v in ("deterministic", "windy") for L in (4, 68) for m in ("pinv", "column_match")
    }
    assert df[K.ERROR].isna().all()
    row = lambda v, L, m: df[(df[K.VARIANT] == v) & (df[K.NUM_GOALS] == L) & (df[K.METHOD] == m)].iloc[0]
    # Table 1 in miniature: pinv needs L = S, column matching is exact on deterministic dynamics.
    assert row("windy", 68, "pinv")[K.P_MAX_ERR] < 1e-8
    assert row("windy", 4, "pinv")[K.P_MAX_ERR] > 1e-2
    assert row("windy", 4, "pinv")[K.IDENTIFIABLE_CASE] == "not identifiable"
    assert row("deterministic", 68, "column_match")[K.P_MAX_ERR] == 0.0
    assert row("windy", 68, "pinv")[K.PLAN_SUCCESS] == pytest.approx(1.0)
    assert (df[K.TASK] == "corner_9_1_doorway").all()
    printed = capsys.readouterr().out
    assert "p_mse" in printed and "8 rows" in printed


def test_a_failing_method_lands_in_the_error_column(monkeypatch):
    from qworld.worldmodel.plearn import finite

    real = finite.extract

    def flaky(Q, M, method, **kw):
        if method == "column_match":
            raise RuntimeError("boom")
        return real(Q, M, method, **kw)

    monkeypatch.setattr(finite, "extract", flaky)
    df = oracle_study(variants=["windy"], num_goals_list=[2], methods=["pinv", "column_match"], tasks="all")
    assert len(df) == 2 * 2  # two doorway tasks are meant for windy
    bad = df[df[K.METHOD] == "column_match"]
    assert bad[K.ERROR].str.contains("RuntimeError: boom").all() and bad[K.P_MSE].isna().all()
    good = df[df[K.METHOD] == "pinv"]
    assert good[K.ERROR].isna().all() and np.isfinite(good[K.P_MSE]).all()
