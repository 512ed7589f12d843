"""Statistics behind the figures, checked against scipy, closed-form formulas and hand computations."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from peft_utils.stats import (
    accuracy_interval,
    comparison_pairs,
    crossed_resamples,
    ema_span,
    paired_bootstrap,
    paired_comparisons,
    paired_differences,
    per_method_summary,
    reading,
    runs_in_group,
    summarise_resamples,
    wilson_interval,
)


def _simulated_pair(n: int, p_a_only: float, p_b_only: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n sentences drawn from a known model: A alone right w.p. p_a_only, B alone w.p. p_b_only, else both right."""
    u = np.random.default_rng(seed).random(n)
    a_only, b_only = u < p_a_only, (u >= p_a_only) & (u < p_a_only + p_b_only)
    return ~b_only, ~a_only


# --------------------------------------------------------------------------------------------------------------
# Intervals over seeds
# --------------------------------------------------------------------------------------------------------------
def test_t_interval_over_seeds_matches_hand_computation_and_scipy() -> None:
    # Two seeds 0.40 and 0.42: sem = 0.01, t(0.975, 1 dof) = 12.7062 -> half width 0.127062.
    two = accuracy_interval(pd.Series([0.40, 0.42]), pd.Series([872, 872]))
    assert (two.mean, two.low, two.high) == pytest.approx((0.41, 0.41 - 0.127062, 0.41 + 0.127062), abs=1e-6)
    # Five seeds: t(0.975, 4) = 2.7764 (printed tables), and scipy's own interval helper agrees.
    values = np.array([0.88, 0.90, 0.91, 0.89, 0.93])
    result = accuracy_interval(pd.Series(values), pd.Series([872] * 5))
    sem = values.std(ddof=1) / math.sqrt(5)
    assert result.high - result.mean == pytest.approx(2.7764 * sem, rel=1e-4)
    assert (result.low, result.high) == pytest.approx(scipy_stats.t.interval(0.95, 4, loc=values.mean(), scale=sem))


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
    assert math.isnan(lora["fp32_bytes"])  # never recorded: NaN
    assert table.loc["full", "interval"] == "Wilson"
    assert per_method_summary(runs, []).empty


# --------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------------------------
def test_bootstrap_difference_and_interval_match_the_normal_approximation() -> None:
    a, b = _simulated_pair(872, 0.08, 0.04, seed=1)
    result = paired_bootstrap(a, b)
    assert result.difference == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    assert result.low < 0.04 < result.high  # the true difference of the generating model
    # Closed form for a paired difference of proportions: var = (p10 + p01 - (p10 - p01)^2) / n.
    p10, p01 = float((a & ~b).mean()), float((~a & b).mean())
    half = 1.959964 * math.sqrt((p10 + p01 - (p10 - p01) ** 2) / len(a))
    assert result.high - result.low == pytest.approx(2 * half, rel=0.08)
    assert (result.low + result.high) / 2 == pytest.approx(result.difference, abs=0.004)


def test_bootstrap_interval_shrinks_with_more_sentences() -> None:
    widths = []
    for n in (200, 3200):
        result = paired_bootstrap(*_simulated_pair(n, 0.08, 0.04, seed=2))
        widths.append(result.high - result.low)
    assert widths[0] / widths[1] == pytest.approx(4.0, rel=0.2)  # 16x the sentences, sqrt(16) = 4x narrower


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    a, b = _simulated_pair(872, 0.08, 0.04, seed=3)
    first = paired_bootstrap(a, b, n_resamples=10_000, seed=7)
    assert paired_bootstrap(a, b, n_resamples=10_000, seed=7) == first
    other = paired_bootstrap(a, b, n_resamples=10_000, seed=8)
    assert other != first and other.low == pytest.approx(first.low, abs=0.005)
    narrow = paired_bootstrap(a, b, confidence=0.5)
    assert first.low < narrow.low < narrow.high < first.high


def test_bootstrap_resamples_sentences_with_all_their_seeds() -> None:
    a, b = _simulated_pair(872, 0.08, 0.04, seed=4)
    single = paired_bootstrap(a, b)
    # Four seeds that agree everywhere are one seed's information: the same interval, not a narrower one.
    four = paired_bootstrap(np.tile(a, (4, 1)), np.tile(b, (4, 1)))
    assert (four.low, four.high) == pytest.approx((single.low, single.high), abs=0.003)
    # Treating the concatenated 4 x 872 rows as independent sentences would halve the width (sqrt(4)).
    concatenated = paired_bootstrap(np.tile(a, 4), np.tile(b, 4))
    assert (single.high - single.low) / (concatenated.high - concatenated.low) == pytest.approx(2.0, rel=0.1)
    # Seeds that disagree: the difference pooled over seeds is the mean of the per-seed differences.
    a_seeds, b_seeds = np.stack([a, np.roll(a, 1), np.roll(a, 2)]), np.tile(b, (3, 1))
    pooled = paired_bootstrap(a_seeds, b_seeds)
    assert pooled.difference == pytest.approx(np.mean([row.mean() - b.mean() for row in a_seeds]))


def test_bootstrap_counts_the_spread_between_seeds() -> None:
    """Seeds whose differences disagree (A 4 points ahead on one seed, behind on another) widen the interval past
    what the sentences alone give, as the issue's re-derivation found for the all-linear table."""
    rows = [_simulated_pair(872, 0.02 + shift, 0.04, seed=20 + i) for i, shift in enumerate((0.0, 0.04, 0.08))]
    a, b = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    crossed = paired_bootstrap(a, b)
    # seeds averaged first, then sentences resampled (the earlier cluster bootstrap): the seeds' spread is lost
    sentences_only = crossed_resamples([paired_differences(a, b).mean(axis=0, keepdims=True)], [1.0], 10_000, 0)
    width = np.subtract(*np.quantile(sentences_only, [0.975, 0.025]))
    assert crossed.difference == pytest.approx(sentences_only.mean(), abs=0.002)
    assert crossed.high - crossed.low > 1.5 * width


def test_crossed_resamples_match_resampling_cells_by_index() -> None:
    """The count-weighted mean equals an explicit draw of seed and sentence indices: the same distribution from an
    independent, direct implementation of the pigeonhole bootstrap (Owen 2007)."""
    rng = np.random.default_rng(11)
    matrix = (rng.random((3, 300)) < 0.9).astype(float) - (rng.random((3, 300)) < 0.88) + rng.normal(0, 0.02, (3, 1))
    direct = np.empty(20_000)
    for r in range(len(direct)):
        seeds, sentences = rng.integers(0, 3, 3), rng.integers(0, 300, 300)
        direct[r] = matrix[np.ix_(seeds, sentences)].mean()
    ours = crossed_resamples([matrix], [1.0], 20_000, seed=0)
    assert np.quantile(ours, [0.025, 0.5, 0.975]) == pytest.approx(np.quantile(direct, [0.025, 0.5, 0.975]), abs=0.004)
    assert ours.std() == pytest.approx(direct.std(), rel=0.05)
    # Two matrices with weights 1 and -1: their seeds resampled apart, sentences together; the centre is the
    # difference of the two means.
    other = matrix[::-1] * 0.5
    contrast = crossed_resamples([matrix, other], [1.0, -1.0], 20_000, seed=1)
    assert contrast.mean() == pytest.approx(matrix.mean() - other.mean(), abs=0.003)


def test_bootstrap_p_agrees_with_the_interval() -> None:
    def p_value(resamples: np.ndarray) -> float:
        return summarise_resamples(0.0, resamples).p_value

    assert p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.5)  # 2 x 1/4
    assert p_value(np.ones(100)) == 0.0 and p_value(np.zeros(10)) == 1.0
    for seed in range(6):
        a, b = _simulated_pair(300, 0.05 + 0.01 * seed, 0.07, seed=30 + seed)
        result = paired_bootstrap(a, b, seed=seed)
        assert (result.p_value < 0.05) == (result.low > 0 or result.high < 0)


@pytest.mark.parametrize("test", [paired_bootstrap, paired_differences])
def test_paired_inputs_are_validated(test) -> None:
    with pytest.raises(ValueError, match="same sentences: 4 vs 3"):
        test([True, False, True, True], [True, False, True])
    with pytest.raises(ValueError, match="correct_b must hold per-sentence correctness.*2"):
        test([1, 0, 1], [1, 2, 0])
    with pytest.raises(ValueError, match="correct_a must hold per-sentence correctness.*0.5"):
        test([0.5, 1.0, 0.0], [True, False, True])
    with pytest.raises(ValueError, match="correct_a must hold per-sentence correctness"):
        test(["yes", "no"], [True, False])
    with pytest.raises(ValueError, match="correct_a must hold per-sentence correctness.*nan"):
        test([1.0, float("nan")], [True, False])
    with pytest.raises(ValueError, match="correct_a must be a non-empty"):
        test([], [])
    with pytest.raises(ValueError, match="correct_a must be a non-empty"):
        test(np.ones((2, 2, 2), dtype=bool), np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="pair up by seed: 2 vs 1 seeds"):
        test(np.ones((2, 3), dtype=bool), np.ones(3, dtype=bool))
    # 0/1 integers and floats are accepted as correctness.
    assert np.array_equal(test(np.array([1, 0, 1]), np.array([1.0, 1.0, 0.0])),
                          test([True, False, True], [True, True, False]))


def test_bootstrap_rejects_bad_settings() -> None:
    a, b = [True, False, True], [True, True, False]
    with pytest.raises(ValueError, match="confidence must be between 0 and 1"):
        paired_bootstrap(a, b, confidence=95)
    with pytest.raises(ValueError, match="n_resamples must be a positive whole number"):
        paired_bootstrap(a, b, n_resamples=0)


# --------------------------------------------------------------------------------------------------------------
# Run groups and paired comparisons of recorded runs
# --------------------------------------------------------------------------------------------------------------
def _run(method: str, seed: int, predictions: np.ndarray, labels: np.ndarray, group: str | None = "comparison",
         **extra: object) -> dict:
    return {"run_id": f"{group}-{method}-s{seed}", "group": group, "method": method, "seed": seed,
            "dev_predictions": list(predictions), "final_accuracy": float((predictions == labels).mean()), **extra}


def test_runs_in_group_match_the_group_exactly() -> None:
    runs = pd.DataFrame({"run_id": list("abcd"), "group": ["comparison", "sweep", "tune", None]})
    assert list(runs_in_group(runs, "comparison")["run_id"]) == ["a"]
    assert list(runs_in_group(runs, "tune")["run_id"]) == ["c"]
    no_group = pd.DataFrame({"run_id": ["x"]})
    assert runs_in_group(no_group, "comparison").empty and runs_in_group(no_group, "sweep").empty


def test_comparison_pairs() -> None:
    assert comparison_pairs(["full", "lora", "dora", "qlora", "qdora"]) == [
        ("lora", "full"), ("dora", "full"), ("qlora", "full"), ("qdora", "full"),
        ("dora", "lora"), ("qlora", "lora"), ("qdora", "lora")]
    assert comparison_pairs(["lora", "dora"]) == [("dora", "lora")]
    assert comparison_pairs(["full", "qlora"]) == [("qlora", "full")]
    assert comparison_pairs(["dora", "qlora"]) == []


def test_paired_comparisons_match_direct_computation() -> None:
    """Three seeds of two methods: the difference recomputed by hand, the interval and p from the same resamples."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    correct = {(m, s): rng.random(400) < (0.9 if m == "full" else 0.86) for m in ("full", "lora") for s in range(3)}
    runs = [_run(m, s, np.where(c, labels, 1 - labels), labels) for (m, s), c in correct.items()]
    # A fourth LoRA seed without a full partner, and a tuning run, must both be left out.
    runs.append(_run("lora", 9, 1 - labels, labels))
    runs.append(_run("full", 0, 1 - labels, labels, group="tune"))
    table = paired_comparisons(pd.DataFrame(runs), labels)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["method"], row["reference"], row["n_seeds"], row["n_sentences"]) == ("lora", "full", 3, 400)
    per_seed = [correct[("lora", s)].mean() - correct[("full", s)].mean() for s in range(3)]
    assert row["difference"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    lora, full = (np.stack([correct[(m, s)] for s in range(3)]) for m in ("lora", "full"))
    assert tuple(row[["low", "high", "p_value"]]) == paired_bootstrap(lora, full)[1:]
    assert row["low"] < row["difference"] < row["high"]
    # Seeded: the same call gives the same interval.
    assert paired_comparisons(pd.DataFrame(runs), labels).equals(table)


def test_paired_comparison_interval_covers_the_true_difference() -> None:
    """Runs drawn from a known model (B is right on 4 points more of the sentences than A): the interval covers
    the true difference and excludes zero, and the bootstrap p rejects."""
    n = 872
    labels = np.random.default_rng(0).integers(0, 2, n)
    runs = []
    for seed in range(3):
        a_correct, b_correct = _simulated_pair(n, 0.02, 0.06, seed=10 + seed)
        runs.append(_run("full", seed, np.where(a_correct, labels, 1 - labels), labels))
        runs.append(_run("lora", seed, np.where(b_correct, labels, 1 - labels), labels))
    row = paired_comparisons(pd.DataFrame(runs), labels, n_resamples=20_000).iloc[0]
    assert row["low"] < 0.04 < row["high"] and row["low"] > 0
    assert row["p_value"] < 0.01


@pytest.mark.parametrize(("difference", "low", "high", "expected"), [
    (-0.002, -0.010, 0.006, "matches"),
    (-0.005, -0.013, 0.003, "matches"),  # the margin itself is still a match
    (-0.0051, -0.013, 0.003, "undecided: mean −0.51 pt, below −0.5 pt"),  # rounds to -0.5, yet below it
    (-0.004, -0.008, 0.0, "matches"),  # an interval touching 0 contains it
    (-0.004, -0.008, -0.0001, "falls short"),  # below 0 by a hair: short, however small the mean
    (-0.030, -0.046, -0.016, "falls short"),
    (0.012, 0.004, 0.020, "undecided: interval above 0 (series better)"),
])
def test_reading_applies_the_rule_written_before_the_run(difference, low, high, expected) -> None:
    assert reading(difference, low, high) == expected


def test_reading_takes_another_margin() -> None:
    assert reading(-0.008, -0.02, 0.004, margin=0.01) == "matches"
    assert reading(-0.008, -0.02, 0.004) == "undecided: mean −0.80 pt, below −0.5 pt"


def test_paired_comparisons_refuse_what_cannot_be_paired() -> None:
    labels = np.array([0, 1, 1, 0])
    good = _run("full", 0, labels, labels)
    with pytest.raises(ValueError, match="records no dev_predictions"):
        paired_comparisons(pd.DataFrame([good, {**_run("lora", 0, labels, labels), "dev_predictions": None}]), labels)
    with pytest.raises(ValueError, match="3 dev predictions but there are 4 labels"):
        paired_comparisons(pd.DataFrame([good, _run("lora", 0, labels[:3], labels[:3])]), labels)
    # Labels of other rows do not reproduce the recorded accuracy: refused, never tested on the wrong truth.
    with pytest.raises(ValueError, match="not those of the rows it was scored on"):
        paired_comparisons(pd.DataFrame([good]), 1 - labels)
    assert paired_comparisons(pd.DataFrame([good]), labels).empty


def test_wilson_interval_contains_a_perfect_score():
    """At accuracy 1 (or 0) on a few rows, rounding once put the upper end a hair below 1: a negative error bar."""
    assert wilson_interval(1.0, 6)[1] == 1.0 and wilson_interval(0.0, 6)[0] == 0.0
