"""qworld_analysis: experiment dirs -> DataFrames -> IQM / bootstrap CIs -> figures, reports.

Reads what ``qworld sweep`` writes (``params.json``, ``result.json``, ``worldmodels.parquet``,
``worldmodels_p/``, ``sweep.yaml``) with pandas and numpy alone: loading imports no Ray, no
torch and no agent code.

    import qworld_analysis as qa
    df = qa.load("results/fourrooms_paper")          # one row per (trial, checkpoint, method)
    P_hat = qa.load_world_model("results/fourrooms_paper", trial_id, 7, "pinv")  # [S, A, S]
    qa.summary(qa.final_checkpoints(df), by=["variant", "num_goals", "method"], metric="p_mse")
    qa.write_report("results/fourrooms_paper")       # results/fourrooms_paper/report/index.html

Figures are in :mod:`qworld_analysis.plots`; the report functions (which import matplotlib)
are loaded on first use.
"""

from qworld_analysis.load import (NotAnExperimentError, check_experiment, final_checkpoints, load, load_many,
                                  load_training_curves, load_trials, load_world_model, plan_columns)
from qworld_analysis.stats import iqm, mean, rank_correlation, stratified_bootstrap_ci, summary

_REPORT = ("compare", "summary_table", "write_report")


def __getattr__(name):
    if name in _REPORT:  # matplotlib is imported only when a report is asked for
        from qworld_analysis import report

        return getattr(report, name)
    raise AttributeError(f"module 'qworld_analysis' has no attribute {name!r}")


__all__ = [
    "NotAnExperimentError",
    "check_experiment",
    "compare",
    "final_checkpoints",
    "iqm",
    "load",
    "load_many",
    "load_training_curves",
    "load_trials",
    "load_world_model",
    "mean",
    "plan_columns",
    "rank_correlation",
    "stratified_bootstrap_ci",
    "summary",
    "summary_table",
    "write_report",
]
