"""Statistics behind the figures: intervals, smoothing and per-method aggregation.

Why a module apart from the figures: which interval a number gets, and how seeds are pooled, decide what a reader
may conclude from a figure ("is DoRA really better than LoRA?"). That logic is tested against scipy and hand
computations here, independently of any drawing.

Conventions: accuracies are fractions in [0, 1]; every interval is two-sided, 95% unless said otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

__all__ = [
    "optional_column",
    "numeric_column",
    "wilson_interval",
    "MeanInterval",
    "mean_interval",
    "AccuracyInterval",
    "accuracy_interval",
    "ema_span",
    "ema_smooth",
    "per_method_summary",
]

# Per-method summary columns taken from the first run that has them: sizes and parameter counts do not depend on
# the seed. Keys are summary columns, values the run-table columns they come from.
_SEED_INDEPENDENT_NUMBERS = {
    "n_eval": "n_eval",
    "trainable_params": "trainable_params",
    "total_params": "total_params",
    "disk_bytes": "size.disk_bytes",
    "total_bytes": "size.total_bytes",
    "fp32_bytes": "size.fp32_bytes",
    "quantized_bytes": "size.quantized_bytes",
    "quant_state_bytes": "size.quant_state_bytes",
    "frozen_bytes": "size.frozen_bytes",
    "trainable_bytes": "size.trainable_bytes",
}


# --------------------------------------------------------------------------------------------------------------
# Reading the run table (optional fields may be absent from older or partial records)
# --------------------------------------------------------------------------------------------------------------
def optional_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` of ``frame``, or an all-NaN column when the records never logged that field."""
    if name in frame.columns:
        return frame[name]
    return pd.Series(np.nan, index=frame.index, dtype=float)


def numeric_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as numbers: absent columns and unparsable values become NaN."""
    return pd.to_numeric(optional_column(frame, name), errors="coerce")


# --------------------------------------------------------------------------------------------------------------
# Intervals and smoothing
# --------------------------------------------------------------------------------------------------------------
def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (by default) Wilson score interval for a proportion measured on ``n`` examples.

    Why Wilson and not ``p ± z·sqrt(p(1-p)/n)``: the normal approximation collapses to zero width at p=1 and
    can leave [0, 1] near the edges, which a good classifier on a small dev set (SST-2 dev has 872
    sentences) easily reaches. Wilson stays inside [0, 1] and has close to nominal coverage.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (accuracy + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


class MeanInterval(NamedTuple):
    """A mean over runs with its sample standard deviation and confidence interval."""

    mean: float
    sd: float
    low: float
    high: float


def mean_interval(values: Sequence[float] | np.ndarray | pd.Series, confidence: float = 0.95) -> MeanInterval:
    """Student-t interval of the mean of a few runs (seeds): ``mean ± t·sd/sqrt(k)`` with ``k - 1`` dof.

    Why t and not ±1.96·sd/sqrt(k): with 2-5 seeds the standard deviation is itself a rough estimate, and the
    t quantile (12.7 for two seeds, 2.8 for five) widens the interval by exactly the right amount for that.
    """
    _check_confidence(confidence)
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) < 2 or not np.isfinite(array).all():
        raise ValueError(f"a t interval needs at least two finite values in one dimension, got {array.tolist()}")
    mean = float(array.mean())
    sd = float(array.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=len(array) - 1)) * sd / math.sqrt(len(array))
    return MeanInterval(mean, sd, mean - half, mean + half)


class AccuracyInterval(NamedTuple):
    """A method's mean accuracy, its 95% interval and which interval it is (``"t over k seeds"``, ``"Wilson"``,
    or ``"none"`` when nothing could be computed)."""

    mean: float
    low: float
    high: float
    kind: str


def accuracy_interval(accuracies: pd.Series, n_eval: pd.Series) -> AccuracyInterval:
    """Mean accuracy of one method (or sweep point) over its runs, and its 95% interval.

    One run: Wilson interval from its dev-set size (sampling noise of the dev set). Several runs (seeds):
    Student-t interval of the mean over seeds (:func:`mean_interval`, clipped to [0, 1]), which captures
    run-to-run variance as well; with two seeds it is wide, and that is the honest answer. Missing values are
    ignored.
    """
    accuracies = accuracies.dropna().astype(float)
    if accuracies.empty:
        return AccuracyInterval(math.nan, math.nan, math.nan, "none")
    if len(accuracies) >= 2:
        mean, _, low, high = mean_interval(accuracies)
        return AccuracyInterval(mean, max(0.0, low), min(1.0, high), f"t over {len(accuracies)} seeds")
    mean = float(accuracies.iloc[0])
    sizes = pd.to_numeric(n_eval, errors="coerce").dropna()
    if sizes.empty or sizes.iloc[0] <= 0 or not 0 <= mean <= 1:
        return AccuracyInterval(mean, math.nan, math.nan, "none")
    low, high = wilson_interval(mean, int(sizes.iloc[0]))
    return AccuracyInterval(mean, low, high, "Wilson")


def ema_span(n_points: int) -> int:
    """Default EMA span for a curve of ``n_points``: ~5% of the points, at least 2 and at most 200.

    Why relative to the length: short test runs and long runs are then smoothed comparably.
    """
    return int(min(200, max(2, round(n_points / 20))))


def ema_smooth(values: Sequence[float] | np.ndarray | pd.Series, span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average of a per-step loss (span: :func:`ema_span` by default).

    Why: per-batch loss is noisy (one batch of 16-32 sentences), and the trend is what tells methods apart.
    ``adjust=True`` weights make the first points an average of what has been seen so far instead of being
    pulled towards zero, so the smoothed curve starts where the raw one starts.
    """
    series = pd.Series(np.asarray(values, dtype=float))
    if span is None:
        span = ema_span(len(series))
    return series.ewm(span=span, adjust=True, ignore_na=True).mean().to_numpy()


# --------------------------------------------------------------------------------------------------------------
# Per-method aggregation
# --------------------------------------------------------------------------------------------------------------
def per_method_summary(runs: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """One row per method in ``methods`` (several seeds aggregated): the numbers every comparison figure draws.

    Means over seeds for times and accuracy (with :func:`accuracy_interval`); the maximum for peak memory (the
    budget one must provision); the first run's value for sizes and parameter counts, which do not depend on the
    seed. An empty frame when ``methods`` is empty.
    """
    rows = [_summarise_method(method, runs[runs["method"] == method]) for method in methods]
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()


def _summarise_method(method: str, runs: pd.DataFrame) -> dict[str, object]:
    accuracy = accuracy_interval(numeric_column(runs, "final_accuracy"), numeric_column(runs, "n_eval"))
    memory_kinds = sorted({str(kind) for kind in optional_column(runs, "memory_kind").dropna()})
    row: dict[str, object] = {
        "method": method,
        "n_runs": len(runs),
        "accuracy": accuracy.mean,
        "acc_low": accuracy.low,
        "acc_high": accuracy.high,
        "interval": accuracy.kind,
        "train_time_s": numeric_column(runs, "train_time_s").mean(),
        "samples_per_s": numeric_column(runs, "samples_per_s").mean(),
        "peak_memory_bytes": numeric_column(runs, "peak_memory_bytes").max(),
        "memory_kind": "+".join(memory_kinds),
        "disk_kind": _first_text(runs, "size.disk_kind"),
    }
    row.update({key: _first_number(runs, column) for key, column in _SEED_INDEPENDENT_NUMBERS.items()})
    return row


def _first_number(runs: pd.DataFrame, column: str) -> float:
    values = numeric_column(runs, column).dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def _first_text(runs: pd.DataFrame, column: str) -> str:
    values = optional_column(runs, column).dropna()
    return str(values.iloc[0]) if len(values) else ""


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
