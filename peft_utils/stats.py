"""Statistics behind the figures and tables: intervals, smoothing, per-series aggregation and paired comparisons.

Kept apart from the drawing because which interval a number gets, and how seeds are pooled, decide what a reader may
conclude. Accuracies are fractions; intervals are two-sided, 95% unless said. Runs are keyed by *series*
(:func:`run_series`), so LoRA on the default layers and on every linear layer are never averaged together.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from .formatting import format_points
from .methods import ordered_methods, series_method, series_name, series_on
from .store import COMPARISON_GROUP

PAIRED_RESAMPLES = 10_000  # bootstrap resamples of the paired comparisons: percentiles stable to ~0.1 point
MATCH_MARGIN = 0.005  # the decision rule's margin, fixed before the all-linear experiment ran: half a point
IMBALANCE_RATIO = 1.5  # macro-F1 beside accuracy above this class ratio (or beyond two classes): accuracy hides a class
_LORA_VARIANTS = ("dora", "qlora", "qdora")
# Per-series summary columns that do not depend on the seed (taken from the first run): summary key -> run column.
_SEED_INDEPENDENT_NUMBERS = {"trainable_params": "trainable_params", "disk_bytes": "size.disk_bytes",
                             "fp32_bytes": "size.fp32_bytes"}
_BOOTSTRAP_CHUNK_ENTRIES = 1 << 22  # bounds one chunk of bootstrap counts (resamples x sentences)


def optional_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` of ``frame``, or an all-NaN column when the records never logged that field."""
    return frame.get(name, pd.Series(np.nan, index=frame.index, dtype=float))


def numeric_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as numbers: absent columns and unparsable values become NaN."""
    return pd.to_numeric(optional_column(frame, name), errors="coerce")


def runs_in_group(runs: pd.DataFrame, group: str) -> pd.DataFrame:
    """The runs whose ``group`` is exactly ``group``: a tuning run in a comparison would mix two evaluation sets."""
    return runs[optional_column(runs, "group").astype(object).eq(group)]


def run_series(runs: pd.DataFrame) -> pd.Series:
    """Each run's series (``"lora"``, ``"lora:all-linear"``) from its ``method`` and ``targets``."""
    pairs = zip(optional_column(runs, "method"), optional_column(runs, "targets"))
    return pd.Series([series_name(method, targets) for method, targets in pairs], index=runs.index, dtype=object)


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion on ``n`` examples: unlike ``p ± z·sqrt(p(1-p)/n)`` it stays inside
    [0, 1] and keeps a width at p = 1, which a good classifier on a small dev set reaches."""
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (accuracy + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n))
    # Rounding can put an end a hair inside the estimate at p = 0 or 1: a negative error bar matplotlib refuses.
    return max(0.0, min(center - half, accuracy)), min(1.0, max(center + half, accuracy))


class AccuracyInterval(NamedTuple):
    """``kind``: ``"t over k seeds"``, ``"Wilson"`` or ``"none"``."""

    mean: float
    low: float
    high: float
    kind: str


def accuracy_interval(accuracies: pd.Series, n_eval: pd.Series) -> AccuracyInterval:
    """Mean accuracy over runs and its 95% interval: over seeds Student's t (clipped to [0, 1]), whose quantile
    (12.7 for two seeds) widens for the rough sd of few seeds; for one run the Wilson interval of its dev set."""
    accuracies = accuracies.dropna().astype(float)
    if accuracies.empty:
        return AccuracyInterval(math.nan, math.nan, math.nan, "none")
    if len(accuracies) >= 2:
        from scipy import stats as scipy_stats  # on first use: importing scipy.stats costs ~64 MB of RSS

        k, mean, sd = len(accuracies), float(accuracies.to_numpy().mean()), float(accuracies.to_numpy().std(ddof=1))
        half = float(scipy_stats.t.ppf(0.975, df=k - 1)) * sd / math.sqrt(k)
        return AccuracyInterval(mean, max(0.0, mean - half), min(1.0, mean + half), f"t over {k} seeds")
    mean = float(accuracies.iloc[0])
    sizes = pd.to_numeric(n_eval, errors="coerce").dropna()
    if sizes.empty or sizes.iloc[0] <= 0 or not 0 <= mean <= 1:
        return AccuracyInterval(mean, math.nan, math.nan, "none")
    return AccuracyInterval(mean, *wilson_interval(mean, int(sizes.iloc[0])), "Wilson")


def ema_span(n_points: int) -> int:
    """~5% of the points, within [2, 200]: short and long runs are smoothed comparably."""
    return min(200, max(2, round(n_points / 20)))


def ema_smooth(values: Sequence[float] | np.ndarray | pd.Series, span: int) -> np.ndarray:
    """Bias-corrected EMA of a noisy per-step loss (``adjust=True``: the curve starts where the raw one does)."""
    return pd.Series(np.asarray(values, dtype=float)).ewm(span=span, adjust=True, ignore_na=True).mean().to_numpy()


def per_method_summary(runs: pd.DataFrame, series: Sequence[str]) -> pd.DataFrame:
    """One row per series in ``series``: mean accuracy, its sd and times over seeds, the maximum peak memory (the
    budget to provision), and sizes and counts from the first run."""
    keys, rows = run_series(runs), []
    for name in series:
        group = runs[keys == name]
        accuracies = numeric_column(group, "final_accuracy")
        accuracy = accuracy_interval(accuracies, numeric_column(group, "n_eval"))
        disk_kind = optional_column(group, "size.disk_kind").dropna()
        row: dict[str, object] = {
            "series": name, "n_runs": len(group), "n_seeds": accuracies.count(), "accuracy": accuracy.mean,
            "accuracy_sd": accuracies.std(ddof=1), "acc_low": accuracy.low, "acc_high": accuracy.high,
            "interval": accuracy.kind,
            "train_time_s": numeric_column(group, "train_time_s").mean(),
            "peak_memory_bytes": numeric_column(group, "peak_memory_bytes").max(),
            "memory_kind": "+".join(sorted({str(kind) for kind in optional_column(group, "memory_kind").dropna()})),
            "disk_kind": str(disk_kind.iloc[0]) if len(disk_kind) else "",
        }
        for key, column in _SEED_INDEPENDENT_NUMBERS.items():
            values = numeric_column(group, column).dropna()
            row[key] = float(values.iloc[0]) if len(values) else math.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("series") if rows else pd.DataFrame()


class PairedDifference(NamedTuple):
    """A minus B, its bootstrap percentile interval and the bootstrap p of "no difference" (same resamples)."""

    difference: float
    low: float
    high: float
    p_value: float


def paired_bootstrap(correct_a: np.ndarray | Sequence[bool], correct_b: np.ndarray | Sequence[bool],
                     n_resamples: int = PAIRED_RESAMPLES, seed: int = 0, confidence: float = 0.95) -> PairedDifference:
    """Accuracy difference A - B over paired seeds, with an interval that resamples **seeds and sentences**.

    ``correct_a`` / ``correct_b``: per dev sentence whether A / B got it right, ``(n_sentences,)`` vectors or
    ``(n_seeds, n_sentences)`` matrices whose rows pair up by seed. The difference moves with the sentences scored
    *and* the training seed (all-linear LoRA minus full was -0.3, -2.3 and -0.5 points on three seeds); they are
    crossed, so each resample draws both: the pigeonhole bootstrap (Owen, 2007, *Ann. Appl. Stat.* 1(2), 386-411).
    """
    return crossed_bootstrap([paired_differences(correct_a, correct_b)], [1.0], n_resamples, seed, confidence)


def crossed_bootstrap(differences: Sequence[np.ndarray], weights: Sequence[float],
                      n_resamples: int = PAIRED_RESAMPLES, seed: int = 0, confidence: float = 0.95) -> PairedDifference:
    """``sum_i weights[i] * mean(differences[i])`` over matrices of the same sentences, and its interval and p:
    weights 1 and -1 compare two differences, e.g. LoRA - full at 250 rows against the same at 4,000."""
    estimate = sum(weight * float(matrix.mean()) for matrix, weight in zip(differences, weights))
    return summarise_resamples(estimate, crossed_resamples(differences, weights, n_resamples, seed), confidence)


def crossed_resamples(differences: Sequence[np.ndarray], weights: Sequence[float], n_resamples: int,
                      seed: int) -> np.ndarray:
    """Resamples of :func:`crossed_bootstrap`'s estimate: each matrix's seeds on their own (different runs), the
    sentences once for all, as ``(seed counts) @ D @ (sentence counts) / (k n)`` in chunks to bound memory."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive whole number, got {n_resamples!r}")
    n_sentences = differences[0].shape[1]
    if any(d.ndim != 2 or d.shape[1] != n_sentences for d in differences):
        raise ValueError("every difference matrix must cover the same sentences (columns)")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // n_sentences)
    values = np.zeros(n_resamples)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        sentence_counts = rng.multinomial(n_sentences, np.full(n_sentences, 1 / n_sentences), size=size)
        for matrix, weight in zip(differences, weights):
            n_seeds = matrix.shape[0]
            seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size)
            cells = np.einsum("rk,kn,rn->r", seed_counts, matrix, sentence_counts)
            values[start:start + size] += weight * cells / (n_seeds * n_sentences)
    return values


def summarise_resamples(estimate: float, resamples: np.ndarray, confidence: float = 0.95) -> PairedDifference:
    """The estimate, the percentile interval of its resamples, and their two-sided p of "0" (twice the smaller share
    at or beyond 0, capped at 1): p < 0.05 exactly when 0 lies outside the 95% interval."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    low, high = np.quantile(resamples, [(1 - confidence) / 2, (1 + confidence) / 2])
    p_value = min(1.0, 2 * min(np.mean(resamples <= 0), np.mean(resamples >= 0)))
    return PairedDifference(estimate, float(low), float(high), float(p_value))


def paired_differences(correct_a: object, correct_b: object) -> np.ndarray:
    """A's correctness minus B's as a ``(n_seeds, n_sentences)`` matrix, or a one-line error when they do not pair."""
    matrix_a, matrix_b = _correctness_matrix(correct_a, "correct_a"), _correctness_matrix(correct_b, "correct_b")
    for axis, rule, unit in ((1, "cover the same sentences", "sentences"), (0, "pair up by seed", "seeds")):
        if matrix_a.shape[axis] != matrix_b.shape[axis]:
            raise ValueError(f"correct_a and correct_b must {rule}: {matrix_a.shape[axis]} vs "
                             f"{matrix_b.shape[axis]} {unit}")
    return matrix_a - matrix_b


def _correctness_matrix(values: object, name: str) -> np.ndarray:
    array = np.asarray(values)
    array = array[np.newaxis, :] if array.ndim == 1 else array
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty (n_sentences,) vector or (n_seeds, n_sentences) matrix, "
                         f"got shape {np.shape(values)}")
    invalid = array[~np.isin(array, (0, 1))]  # NaN, strings and other numbers alike
    if invalid.size:
        raise ValueError(f"{name} must hold per-sentence correctness as True/False (or 1/0), got "
                         f"{array.dtype} value {invalid.tolist()[0]!r}")
    return array.astype(float)


def comparison_pairs(series: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(series, reference)`` pairs worth testing among ``series``: every series against full fine-tuning, the
    LoRA variants against LoRA on the same targets, a method on other targets against it on the default ones."""
    present = list(dict.fromkeys(series))
    pairs = [(s, "full") for s in present if s != "full"]
    pairs += [(s, series_on("lora", s)) for s in present if series_method(s) in _LORA_VARIANTS]
    pairs += [(s, series_method(s)) for s in present if s != series_method(s)]
    return [(s, reference) for s, reference in pairs if reference in present]


def seed_correctness(runs: pd.DataFrame, labels: np.ndarray | Sequence[int]) -> dict[str, dict[int, np.ndarray]]:
    """``{series: {seed: per-sentence correctness}}`` of the runs' ``dev_predictions`` against ``labels``, each
    checked to reproduce its recorded ``final_accuracy`` (the proof that the labels are those it was scored on)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu" or (labels < 0).any():
        raise ValueError(f"labels must be a non-empty vector of class ids (0, 1, ...), got shape {labels.shape}")
    by_series: dict[str, dict[int, np.ndarray]] = {}
    for run_id, series, predicted, recorded, seed in zip(
            runs.get("run_id", runs.index), run_series(runs), optional_column(runs, "dev_predictions"),
            numeric_column(runs, "final_accuracy"), numeric_column(runs, "seed").fillna(0).astype(int)):
        if not isinstance(predicted, (list, tuple, np.ndarray)):
            raise ValueError(f"run {run_id} records no dev_predictions")
        if np.shape(predicted) != labels.shape:
            raise ValueError(f"run {run_id} has {np.size(predicted)} dev predictions but there are {labels.size} "
                             "labels")
        correct = np.asarray(predicted) == labels
        if np.isfinite(recorded) and abs(correct.mean() - recorded) > 1e-9:
            raise ValueError(f"the dev labels give run {run_id} an accuracy of {correct.mean():.4f}, its record says "
                             f"{recorded:.4f}: the labels are not those of the rows it was scored on")
        seeds = by_series.setdefault(series, {})
        if seed in seeds:
            raise ValueError(f"two {series} runs with seed {seed} (run {run_id}); one run per series and seed")
        seeds[seed] = correct
    return by_series


def paired_matrices(correctness: dict[str, dict[int, np.ndarray]], pair: Sequence[str]) -> list[np.ndarray]:
    """The :func:`seed_correctness` of each series of ``pair`` as a matrix over the seeds they all have (a seed fixes
    the data order, so runs of one seed are the matched pair); empty when there is none."""
    if not set(pair) <= set(correctness):
        return []
    seeds = sorted(set.intersection(*(set(correctness[series]) for series in pair)))
    return [np.stack([correctness[series][s] for s in seeds]) for series in pair] if seeds else []


def paired_comparisons(runs: pd.DataFrame, labels: np.ndarray | Sequence[int],
                       n_resamples: int = PAIRED_RESAMPLES) -> pd.DataFrame:
    """One :func:`paired_bootstrap` row per :func:`comparison_pairs` pair of comparison runs with a common seed."""
    correctness = seed_correctness(runs_in_group(runs, COMPARISON_GROUP), labels)
    rows = []
    for method, reference in comparison_pairs(ordered_methods(correctness)):
        matrices = paired_matrices(correctness, (method, reference))
        if matrices:
            result = paired_bootstrap(*matrices, n_resamples)
            rows.append({"method": method, "reference": reference, **result._asdict(),
                         "n_seeds": matrices[0].shape[0], "n_sentences": matrices[0].shape[1]})
    return pd.DataFrame(rows, columns=["method", "reference", *PairedDifference._fields, "n_seeds", "n_sentences"])


def reading(difference: float, low: float, high: float, margin: float = MATCH_MARGIN) -> str:
    """A paired difference (series minus reference) read by the rule written down before the all-linear experiment
    (a wide interval around a mean a point below is not a match)."""
    if high < 0:
        return "falls short"
    if low > 0:
        return "undecided: interval above 0 (series better)"
    if difference >= -margin:
        return "matches"
    return f"undecided: mean {format_points(difference, signed=True, decimals=2)} pt, below −{100 * margin:g} pt"


class PairedStatistics(NamedTuple):
    """:func:`paired_comparisons` of a run set, or ``None`` with the reason it was skipped."""

    table: pd.DataFrame | None
    reason: str | None


def recorded_labels(comparison: pd.DataFrame) -> np.ndarray:
    """The gold labels the comparison runs were scored on (``eval_labels``), one list shared by every run."""
    if comparison.empty:
        raise ValueError("no comparison run to take labels from")
    values = list(optional_column(comparison, "eval_labels"))
    missing = [run for run, value in zip(comparison["run_id"], values) if not isinstance(value, (list, np.ndarray))]
    if missing:
        raise ValueError(f"run {missing[0]} records no eval_labels")
    if len({tuple(value) for value in values}) > 1:
        raise ValueError("the comparison runs were scored on different rows (their eval_labels differ)")
    return np.asarray(values[0])


def macro_f1(predictions: np.ndarray | Sequence[int], labels: np.ndarray | Sequence[int]) -> float:
    """The mean of each class's F1 (2 TP / (2 TP + FP + FN)): a model that ignores a rare class scores low."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scores = [2 * np.sum((predictions == label) & (labels == label))
              / (np.sum(predictions == label) + np.sum(labels == label)) for label in np.union1d(labels, predictions)]
    return float(np.mean(scores))


def needs_macro_f1(labels: np.ndarray | Sequence[int]) -> bool:
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    return len(counts) > 2 or counts.max() > IMBALANCE_RATIO * counts.min()


def macro_f1_by_method(comparison: pd.DataFrame) -> pd.Series | None:
    """Each series' mean macro-F1 where the labels call for it and every run records them; else ``None``."""
    try:
        labels = recorded_labels(comparison)
    except ValueError:
        return None
    predictions = list(optional_column(comparison, "dev_predictions"))
    if not needs_macro_f1(labels) or not all(isinstance(p, (list, np.ndarray)) for p in predictions):
        return None
    scores = pd.Series([macro_f1(p, labels) for p in predictions], index=comparison.index)
    return scores.groupby(run_series(comparison)).mean()


def paired_statistics(runs: pd.DataFrame, labels: np.ndarray | None = None) -> PairedStatistics:
    """The paired tests of the comparison runs (labels from the records by default), or why there are none."""
    comparison = runs_in_group(runs, COMPARISON_GROUP)
    if run_series(comparison).nunique() < 2:
        return PairedStatistics(None, None)  # nothing to compare: not a skipped test
    try:
        if labels is None:
            labels = recorded_labels(comparison)
        return PairedStatistics(paired_comparisons(comparison, labels), None)
    except ValueError as error:
        reason = str(error).splitlines()[0]
        print(f"paired statistics skipped: {reason}", file=sys.stderr)  # stdout may be a list of figure paths
        return PairedStatistics(None, reason)
