"""Statistics behind the figures, checked against scipy and hand computations."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from peft_utils.stats import (
    accuracy_interval,
    ema_span,
    mean_interval,
    per_method_summary,
    wilson_interval,
)


# --------------------------------------------------------------------------------------------------------------
# Intervals over seeds
# --------------------------------------------------------------------------------------------------------------
def test_mean_interval_matches_hand_computation_and_scipy() -> None:
    # Two seeds 0.90 and 0.92: sd = 0.02/sqrt(2), sem = 0.01, t(0.975, 1 dof) = 12.7062 -> half width 0.127062.
    mean, sd, low, high = mean_interval([0.90, 0.92])
    assert mean == pytest.approx(0.91) and sd == pytest.approx(0.02 / math.sqrt(2))
    assert (low, high) == pytest.approx((0.91 - 0.127062, 0.91 + 0.127062), abs=1e-6)
    # Five seeds: t(0.975, 4) = 2.7764 (printed tables), and scipy's own interval helper agrees.
    values = np.array([0.88, 0.90, 0.91, 0.89, 0.93])
    result = mean_interval(values)
    sem = values.std(ddof=1) / math.sqrt(5)
    assert result.high - result.mean == pytest.approx(2.7764 * sem, rel=1e-4)
    assert (result.low, result.high) == pytest.approx(scipy_stats.t.interval(0.95, 4, loc=values.mean(), scale=sem))
    assert mean_interval(values, confidence=0.8).high < result.high  # lower confidence, narrower interval


@pytest.mark.parametrize("bad", [[0.9], [], [0.9, float("nan")], [[0.9, 0.8], [0.7, 0.6]]])
def test_mean_interval_rejects_too_few_or_missing_values(bad: list) -> None:
    with pytest.raises(ValueError, match="at least two finite values"):
        mean_interval(bad)


def test_accuracy_interval_wilson_for_one_run_t_for_seeds() -> None:
    one = accuracy_interval(pd.Series([0.9]), pd.Series([872]))
    assert one.kind == "Wilson" and (one.low, one.high) == pytest.approx(wilson_interval(0.9, 872))
    seeds = accuracy_interval(pd.Series([0.90, np.nan, 0.92]), pd.Series([872, 872, 872]))  # NaN ignored
    assert seeds.kind == "t over 2 seeds" and seeds.mean == pytest.approx(0.91)
    assert seeds.low == pytest.approx(0.91 - 0.127062, abs=1e-6) and seeds.high == 1.0  # clipped to [0, 1]
    assert accuracy_interval(pd.Series([], dtype=float), pd.Series([], dtype=float)).kind == "none"
    no_size = accuracy_interval(pd.Series([0.8]), pd.Series([np.nan]))
    assert no_size.kind == "none" and no_size.mean == 0.8 and math.isnan(no_size.low)


def test_ema_span_is_five_percent_within_bounds() -> None:
    assert [ema_span(n) for n in (0, 10, 100, 1000, 10_000)] == [2, 2, 5, 50, 200]


def test_per_method_summary_aggregates_seeds() -> None:
    runs = pd.DataFrame([
        {"method": "lora", "final_accuracy": 0.90, "n_eval": 872, "train_time_s": 10.0, "peak_memory_bytes": 5e8,
         "memory_kind": "rss", "trainable_params": 300, "size.disk_bytes": 1200, "size.disk_kind": "adapter"},
        {"method": "lora", "final_accuracy": 0.92, "n_eval": 872, "train_time_s": 14.0, "peak_memory_bytes": 7e8,
         "memory_kind": "rss", "trainable_params": 300, "size.disk_bytes": 1200, "size.disk_kind": "adapter"},
        {"method": "full", "final_accuracy": 0.93, "n_eval": 872, "train_time_s": 30.0, "peak_memory_bytes": 2e9,
         "memory_kind": "cuda", "trainable_params": 1000, "size.disk_bytes": 4000, "size.disk_kind": "full"},
    ])
    table = per_method_summary(runs, ["full", "lora"])
    assert list(table.index) == ["full", "lora"]  # the caller's order
    lora = table.loc["lora"]
    assert lora["n_runs"] == 2 and lora["accuracy"] == pytest.approx(0.91) and lora["interval"] == "t over 2 seeds"
    assert lora["train_time_s"] == 12.0 and lora["peak_memory_bytes"] == 7e8  # mean time, max memory
    assert lora["disk_bytes"] == 1200 and lora["disk_kind"] == "adapter" and lora["memory_kind"] == "rss"
    assert math.isnan(lora["samples_per_s"]) and math.isnan(lora["total_params"])  # never recorded: NaN
    assert table.loc["full", "interval"] == "Wilson"
    assert per_method_summary(runs, []).empty
