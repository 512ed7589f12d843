"""Statistics behind the figures and tables: intervals, smoothing, per-series aggregation and paired comparisons.

Why a module apart from the figures: which interval a number gets, and how seeds are pooled, decide what a reader
may conclude from a figure ("is DoRA really better than LoRA?"). That logic is tested against scipy and hand
computations here, independently of any drawing.

Conventions: accuracies are fractions in [0, 1]; every interval is two-sided, 95% unless said otherwise. For
paired comparisons, ``correct_a``/``correct_b`` say per dev sentence whether method A/B classified it correctly,
with the sentences in the same order for both: one row (shape ``(n_sentences,)``) per method for one seed, or a
``(n_seeds, n_sentences)`` matrix for several seeds (see :func:`paired_bootstrap` for how seeds are pooled).
Runs come in groups (:func:`runs_in_group`): the method comparison, the rank x alpha sweep and the learning-rate
tuning runs, which are scored on a held-out slice of the train split and so never mix with the others. Within a
group runs are keyed by *series* (:func:`run_series`): a method on a target set, so that LoRA on the model's default
layers and LoRA on every linear layer are two rows, two points and two paired tests, never averaged together.
:func:`paired_statistics` runs the paired comparisons on a run set, with the dev labels read from the data.
Choosing learning rates from the tuning runs is :mod:`peft_utils.tuning`'s job.
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

__all__ = [
    "optional_column",
    "numeric_column",
    "runs_in_group",
    "run_series",
    "wilson_interval",
    "MeanInterval",
    "mean_interval",
    "AccuracyInterval",
    "accuracy_interval",
    "ema_span",
    "ema_smooth",
    "per_method_summary",
    "PairedDifference",
    "paired_bootstrap",
    "crossed_bootstrap",
    "summarise_resamples",
    "bootstrap_p_value",
    "paired_differences",
    "PAIRED_RESAMPLES",
    "comparison_pairs",
    "seed_correctness",
    "paired_comparisons",
    "recorded_labels",
    "macro_f1",
    "needs_macro_f1",
    "macro_f1_by_method",
    "PairedStatistics",
    "paired_statistics",
]

# Paired comparisons drawn and tabulated (:func:`comparison_pairs`): every series against full fine-tuning, the LoRA
# variants against LoRA on their target set, a method on other targets against itself on the default ones.
_REFERENCE_METHOD = "full"
_LORA_VARIANTS = ("dora", "qlora", "qdora")
PAIRED_RESAMPLES = 10_000  # bootstrap resamples of the paired comparisons: percentiles stable to ~0.1 point

# Per-series summary columns taken from the first run that has them: sizes and parameter counts do not depend on
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
# Bounds the index matrix of one bootstrap chunk (resamples x sentences) to 2^22 entries (32 MiB of int64).
_BOOTSTRAP_CHUNK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# Reading the run table (a field a run did not record is absent)
# --------------------------------------------------------------------------------------------------------------
def optional_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` of ``frame``, or an all-NaN column when the records never logged that field."""
    if name in frame.columns:
        return frame[name]
    return pd.Series(np.nan, index=frame.index, dtype=float)


def numeric_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as numbers: absent columns and unparsable values become NaN."""
    return pd.to_numeric(optional_column(frame, name), errors="coerce")


def runs_in_group(runs: pd.DataFrame, group: str) -> pd.DataFrame:
    """The runs whose ``group`` is ``group``.

    Why an exact match and not "everything but the sweep": learning-rate tuning runs are scored on a held-out
    slice of the train split, so one in a comparison figure would mix two evaluation sets.
    """
    if runs.empty:
        return runs
    return runs[optional_column(runs, "group").astype(object).eq(group)]


def run_series(runs: pd.DataFrame) -> pd.Series:
    """Each run's series (:func:`~peft_utils.methods.series_name`: ``"lora"``, ``"lora:all-linear"``), from its
    ``method`` and ``targets``: what every table, figure and paired test keys a run by.

    Why from those two fields and not :class:`~peft_utils.store.Results`' ``series`` column: a run table built by
    hand, or a tuning table beside loaded runs, has them too, and one rule then keys every table alike.
    """
    pairs = zip(optional_column(runs, "method"), optional_column(runs, "targets"))
    return pd.Series([series_name(method, targets) for method, targets in pairs], index=runs.index, dtype=object)


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
    # The interval contains the estimate; at p = 0 or 1 rounding can put an end a hair inside it (a negative
    # error bar, which matplotlib refuses).
    return max(0.0, min(center - half, accuracy)), min(1.0, max(center + half, accuracy))


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
    from scipy import stats as scipy_stats  # on first use: importing scipy.stats costs ~64 MB of RSS in every process

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
# Per-series aggregation
# --------------------------------------------------------------------------------------------------------------
def per_method_summary(runs: pd.DataFrame, series: Sequence[str]) -> pd.DataFrame:
    """One row per series in ``series`` (:func:`run_series`; several seeds aggregated), indexed by series: the
    numbers every comparison figure draws.

    Means over seeds for times and accuracy (with :func:`accuracy_interval`); the maximum for peak memory (the
    budget one must provision); the first run's value for sizes and parameter counts, which do not depend on the
    seed. An empty frame when ``series`` is empty.
    """
    keys = run_series(runs)
    rows = [_summarise_series(name, runs[keys == name]) for name in series]
    return pd.DataFrame(rows).set_index("series") if rows else pd.DataFrame()


def _summarise_series(series: str, runs: pd.DataFrame) -> dict[str, object]:
    accuracy = accuracy_interval(numeric_column(runs, "final_accuracy"), numeric_column(runs, "n_eval"))
    memory_kinds = sorted({str(kind) for kind in optional_column(runs, "memory_kind").dropna()})
    row: dict[str, object] = {
        "series": series,
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


# --------------------------------------------------------------------------------------------------------------
# Paired comparison of two methods on the same dev sentences
# --------------------------------------------------------------------------------------------------------------
class PairedDifference(NamedTuple):
    """Accuracy of A minus accuracy of B, its bootstrap percentile interval, and the two-sided bootstrap p-value of
    "no difference" from the same resamples (:func:`bootstrap_p_value`)."""

    difference: float
    low: float
    high: float
    p_value: float


def paired_bootstrap(correct_a: np.ndarray | Sequence[bool], correct_b: np.ndarray | Sequence[bool],
                     n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> PairedDifference:
    """Accuracy difference A - B over paired seeds, with an interval that resamples **seeds and sentences**.

    ``correct_a`` / ``correct_b``: one ``(n_sentences,)`` vector each, or ``(n_seeds, n_sentences)`` matrices whose
    rows pair up (row i of both trained with seed i). The difference is the mean over seeds and sentences of the
    per-seed, per-sentence differences.

    Why both: the difference between two trained models moves with the sentences they are scored on (another sample
    of movie reviews) *and* with the seed they were trained with (data order, initialisation): a new seed trains other
    models, and all-linear LoRA minus full fine-tuning was -0.3, -2.3 and -0.5 points on three seeds. Seeds and
    sentences are crossed (every seed scores every sentence), so each resample draws seeds with replacement and,
    independently, sentences with replacement, and takes the mean of the chosen cells: the pigeonhole bootstrap for
    crossed designs (Owen, 2007, *Annals of Applied Statistics* 1(2), 386-411), which is conservative where either
    factor carries no variance. With one seed it is the ordinary paired bootstrap over sentences. Resampling sentences
    alone would treat the seeds' spread as known; with three seeds the seed part of the interval is itself rough, so
    a reading that hinges on it wants more seeds.

    Deterministic for a ``seed`` (a numpy ``Generator``).
    """
    _check_confidence(confidence)
    differences = paired_differences(correct_a, correct_b)
    resamples = crossed_bootstrap([differences], [1.0], n_resamples, seed)
    return summarise_resamples(float(differences.mean()), resamples, confidence)


def crossed_bootstrap(differences: Sequence[np.ndarray], weights: Sequence[float], n_resamples: int = 10_000,
                      seed: int = 0) -> np.ndarray:
    """Bootstrap resamples of ``sum_i weights[i] * mean(differences[i])``, each ``differences[i]`` an ``(n_seeds_i,
    n_sentences)`` matrix over the same sentences (columns): each matrix's seeds are resampled on their own (they are
    different runs), the sentences once for all of them (every matrix scores the same sentences). One matrix with
    weight 1 is :func:`paired_bootstrap`'s; two with weights 1 and -1 compare two differences, e.g. LoRA - full at
    250 rows against the same at 4,000.

    A resample's mean of the chosen cells is ``(seed counts) @ D @ (sentence counts) / (k n)``, so no index matrix
    is built; resamples are drawn in chunks to bound memory.
    """
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
    """The estimate, the percentile interval of its resamples and their two-sided p-value of "0"."""
    _check_confidence(confidence)
    low, high = np.quantile(resamples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return PairedDifference(estimate, float(low), float(high), bootstrap_p_value(resamples))


def bootstrap_p_value(resamples: np.ndarray) -> float:
    """Two-sided percentile-bootstrap p-value of "no difference": twice the smaller share of resamples at or beyond
    0 on either side, capped at 1. It agrees with the percentile interval by construction: p < 0.05 exactly when 0
    lies outside the 95% interval (up to the resolution of 1 / resamples), so the page never prints a small p beside
    an interval that contains 0."""
    resamples = np.asarray(resamples)
    return float(min(1.0, 2 * min(np.mean(resamples <= 0), np.mean(resamples >= 0))))


def comparison_pairs(series: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(series, reference)`` pairs worth testing among ``series`` (:func:`run_series`), in the order given.

    Every series against full fine-tuning (the question "what does PEFT cost in accuracy?"); then DoRA, QLoRA and
    QDoRA against LoRA on the same target set ("does the variant change anything over plain LoRA?": against LoRA on
    other layers the targets would change too); then a method on a target set other than the model's default
    against the same method on the default ("what do the targets change?"). A pair needs both series present.
    """
    present = list(dict.fromkeys(series))
    pairs = [(s, _REFERENCE_METHOD) for s in present if s != _REFERENCE_METHOD]
    pairs += [(s, series_on("lora", s)) for s in present if series_method(s) in _LORA_VARIANTS]
    pairs += [(s, series_method(s)) for s in present if s != series_method(s)]
    return [(s, reference) for s, reference in pairs if reference in present]


def seed_correctness(runs: pd.DataFrame, labels: np.ndarray | Sequence[int]) -> dict[str, dict[int, np.ndarray]]:
    """Per series (:func:`run_series`) and seed, whether each dev sentence was classified correctly:
    ``{series: {seed: bool vector}}``.

    ``runs``: comparison runs whose summary holds ``dev_predictions`` (dev-file order); ``labels``: the gold labels
    of the same rows. Each run's correctness must reproduce its recorded ``final_accuracy``: that check proves the
    labels belong to the rows the run was scored on, so a wrong data folder or subset can never produce a test.
    A one-line ``ValueError`` names the first run that fails (no predictions, other length, other accuracy).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu" or (labels < 0).any():
        raise ValueError(f"labels must be a non-empty vector of class ids (0, 1, ...), got shape {labels.shape}")
    predictions, series = optional_column(runs, "dev_predictions"), run_series(runs)
    by_series: dict[str, dict[int, np.ndarray]] = {}
    for index, run in runs.iterrows():
        run_id = run.get("run_id", index)
        predicted = predictions.loc[index]
        if not isinstance(predicted, (list, tuple, np.ndarray)):
            raise ValueError(f"run {run_id} records no dev_predictions")
        predicted = np.asarray(predicted)
        if predicted.shape != labels.shape:
            raise ValueError(f"run {run_id} has {predicted.size} dev predictions but there are {labels.size} labels")
        correct = predicted == labels
        recorded = pd.to_numeric(pd.Series([run.get("final_accuracy")]), errors="coerce").iloc[0]
        if np.isfinite(recorded) and abs(correct.mean() - recorded) > 1e-9:
            raise ValueError(f"the dev labels give run {run_id} an accuracy of {correct.mean():.4f}, its record says "
                             f"{recorded:.4f}: the labels are not those of the rows it was scored on")
        seeds = by_series.setdefault(str(series.loc[index]), {})
        seed = int(run.get("seed", 0) if pd.notna(run.get("seed", 0)) else 0)
        if seed in seeds:
            raise ValueError(f"two {series.loc[index]} runs with seed {seed} (run {run_id}); one run per series and "
                             "seed")
        seeds[seed] = correct
    return by_series


def paired_comparisons(runs: pd.DataFrame, labels: np.ndarray | Sequence[int], n_resamples: int = PAIRED_RESAMPLES,
                       seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """One row per :func:`comparison_pairs` pair of the comparison runs: accuracy difference, interval, p-value.

    Columns: ``method`` and ``reference`` (the two series of the pair, :func:`run_series`), ``difference`` (method
    minus reference, mean over the paired seeds), ``low`` / ``high`` (the seeds x sentences bootstrap interval,
    :func:`paired_bootstrap`, seeded with ``seed``), ``p_value`` (the bootstrap p of the same resamples),
    ``n_seeds`` and ``n_sentences``. Fractions, not points.

    How seeds pair: a run's seed fixes its training-data order (and draws its rows), so the runs of two series with
    the same seed are the matched pair, and only the seeds both series have are used (a seed one series lacks would
    change its mean for a reason other than the method or targets). An empty frame when no pair has a common seed.
    """
    comparison = runs_in_group(runs, COMPARISON_GROUP)
    correctness = seed_correctness(comparison, labels)
    rows = []
    for method, reference in comparison_pairs(ordered_methods(correctness)):
        seeds = sorted(set(correctness[method]) & set(correctness[reference]))
        if not seeds:
            continue
        correct_method = np.stack([correctness[method][s] for s in seeds])
        correct_reference = np.stack([correctness[reference][s] for s in seeds])
        result = paired_bootstrap(correct_method, correct_reference, n_resamples, seed, confidence)
        rows.append({"method": method, "reference": reference, **result._asdict(), "n_seeds": len(seeds),
                     "n_sentences": correct_method.shape[1]})
    return pd.DataFrame(rows, columns=["method", "reference", "difference", "low", "high", "p_value", "n_seeds",
                                       "n_sentences"])


# The decision rule's margin, fixed before the all-linear experiment ran: half a point of dev accuracy.
MATCH_MARGIN = 0.005


def reading(difference: float, low: float, high: float, margin: float = MATCH_MARGIN) -> str:
    """A paired difference (series minus reference, fractions) read by the decision rule written down before the
    all-linear experiment: ``"matches"`` when the mean is at least ``-margin`` and the interval contains 0,
    ``"falls short"`` when the whole interval lies below 0, else ``"undecided"`` with the reason.

    Why a margin as well as the interval: an interval that contains 0 around a mean a point below is too wide to
    call the two equal; it is left undecided, not read as a match.
    """
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
    """The gold labels of the rows the comparison runs were scored on, as their records keep them
    (``eval_labels``, in the order of their ``dev_predictions``): one list shared by every run, else an error."""
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
    """The mean over classes of each class's F1 (2 TP / (2 TP + FP + FN)): every class counts alike, so a model
    that ignores a rare class scores low even where its accuracy is high. A class absent from both scores 0."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scores = []
    for label in np.union1d(labels, predictions):
        true_positive = np.sum((predictions == label) & (labels == label))
        scores.append(2 * true_positive / (np.sum(predictions == label) + np.sum(labels == label)))
    return float(np.mean(scores))


# Macro-F1 is reported beside accuracy when the classes are more than two, or further from balanced than this
# ratio of the largest class to the smallest: there accuracy alone can hide a class the model never predicts.
IMBALANCE_RATIO = 1.5


def needs_macro_f1(labels: np.ndarray | Sequence[int]) -> bool:
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    return len(counts) > 2 or counts.max() > IMBALANCE_RATIO * counts.min()


def macro_f1_by_method(comparison: pd.DataFrame) -> pd.Series | None:
    """Each series' macro-F1 (:func:`run_series`), mean over its seeds, where the labels call for it
    (:func:`needs_macro_f1`) and every run records its predictions and labels; else ``None``."""
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
    """The paired tests of the comparison runs, or a one-line reason (printed to stderr) why there are none.

    ``labels``: the gold labels of the rows the runs were scored on; by default the ones their records keep
    (:func:`recorded_labels`), checked by :func:`seed_correctness` against every run's recorded accuracy. Skipped
    when fewer than two series were compared, when a run records no predictions or labels, or when the labels do
    not reproduce the recorded accuracies.
    """
    comparison = runs_in_group(runs, COMPARISON_GROUP)
    if run_series(comparison).nunique() < 2:
        return PairedStatistics(None, None)  # nothing to compare: not a skipped test
    try:
        if labels is None:
            labels = recorded_labels(comparison)
        return PairedStatistics(paired_comparisons(comparison, labels), None)
    except (ValueError, OSError) as error:
        reason = str(error).splitlines()[0]
        print(f"paired statistics skipped: {reason}", file=sys.stderr)  # stdout may be a list of figure paths
        return PairedStatistics(None, reason)


def paired_differences(correct_a: object, correct_b: object) -> np.ndarray:
    """A's correctness minus B's, per paired seed (row) and sentence (column): a ``(n_seeds, n_sentences)`` matrix
    of -1, 0 and 1, or a one-line error when the two do not pair up."""
    matrix_a, matrix_b = _correctness_matrix(correct_a, "correct_a"), _correctness_matrix(correct_b, "correct_b")
    if matrix_a.shape[1] != matrix_b.shape[1]:
        raise ValueError(f"correct_a and correct_b must cover the same sentences: {matrix_a.shape[1]} vs "
                         f"{matrix_b.shape[1]} sentences")
    if matrix_a.shape[0] != matrix_b.shape[0]:
        raise ValueError(f"correct_a and correct_b must pair up by seed: {matrix_a.shape[0]} vs "
                         f"{matrix_b.shape[0]} seeds")
    return matrix_a - matrix_b


def _correctness_matrix(values: object, name: str) -> np.ndarray:
    """``values`` as a ``(n_seeds, n_sentences)`` float matrix of 0/1, or a one-line error naming ``name``."""
    array = np.asarray(values)
    if array.ndim == 1:
        array = array[np.newaxis, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (n_sentences,) vector or (n_seeds, n_sentences) matrix, "
                         f"got shape {np.shape(values)}")
    if array.dtype != bool:
        invalid = array[~np.isin(array, (0, 1))] if array.dtype.kind in "iuf" else array.ravel()
        if invalid.size:
            raise ValueError(f"{name} must hold per-sentence correctness as True/False (or 1/0), got "
                             f"{array.dtype} value {invalid.tolist()[0]!r}")
    return array.astype(float)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
