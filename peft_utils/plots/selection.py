"""Which runs a figure draws: the comparison, the sweep, and the per-series summary of them."""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from peft_utils.methods import ordered_methods
from peft_utils.stats import per_method_summary, run_series, runs_in_group
from peft_utils.store import COMPARISON_GROUP, SWEEP_GROUP


def comparison_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that belong to the method comparison (group ``"comparison"``)."""
    return runs_in_group(runs, COMPARISON_GROUP)


def sweep_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of the LoRA rank/alpha sweep (group ``"sweep"``)."""
    return runs_in_group(runs, SWEEP_GROUP)


def rows_of_runs(frame: pd.DataFrame, run_ids: Iterable[str]) -> pd.DataFrame:
    """The step or eval rows of ``frame`` that belong to the runs ``run_ids``."""
    if frame.empty or "run_id" not in frame.columns:
        return frame.iloc[0:0]
    return frame[frame["run_id"].isin(set(run_ids))]


def method_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`~peft_utils.stats.per_method_summary` of ``runs``: one row per series, in display order."""
    return per_method_summary(runs, ordered_methods(run_series(runs)))


def methods_with(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """The ``method_summary`` rows that have ``column``: a figure draws only series whose number was recorded."""
    table = method_summary(runs)
    return table if table.empty else table[table[column].notna()]
