"""Runs keyed by series (a method on a target set): LoRA on the model's default layers and LoRA on every linear layer
are two rows of the table, two paired tests and two curves of every figure, never averaged into one.

The records are synthetic (written with the real ``RunRecorder`` through ``test_plots``' writer): full fine-tuning
and LoRA on the default targets, LoRA, DoRA and QLoRA on ``"all-linear"``, with per-sentence predictions.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parents[1] / ".cache" / "matplotlib"))

from matplotlib.colors import rgb_to_hsv, to_rgb  # noqa: E402

from peft_utils import plots, report  # noqa: E402
from peft_utils.methods import ordered_methods, series_on  # noqa: E402
from peft_utils.plots import accuracy  # noqa: E402
from peft_utils.methods import series_label as method_label  # noqa: E402
from peft_utils.plots.style import method_color, method_marker  # noqa: E402
from peft_utils.stats import comparison_pairs, paired_comparisons, paired_statistics, reading  # noqa: E402
from peft_utils.store import Results, RunStore  # noqa: E402
from test_plots import COMPARISON_PNGS, FAKE_METHODS, _assert_png, _write_run, tune_runs_table  # noqa: E402

LABELS = np.random.default_rng(7).integers(0, 2, 240)
# (method, targets) -> (extra error rate, seeds): LoRA on the default layers lacks seed 2, so its pairs use two seeds.
SERIES = {
    ("full", None): (0.02, (0, 1, 2)),
    ("lora", None): (0.06, (0, 1)),
    ("lora", "all-linear"): (0.04, (0, 1, 2)),
    ("dora", "all-linear"): (0.035, (0, 1, 2)),
    ("qlora", "all-linear"): (0.05, (0, 1, 2)),
}
ORDER = ["full", "lora", "lora:all-linear", "dora:all-linear", "qlora:all-linear"]
PAIRS = [("lora", "full"), ("lora:all-linear", "full"), ("dora:all-linear", "full"), ("qlora:all-linear", "full"),
         ("dora:all-linear", "lora:all-linear"), ("qlora:all-linear", "lora:all-linear"), ("lora:all-linear", "lora")]


def _correct(index: int, error: float, seed: int) -> np.ndarray:
    """Whether a made-up run classifies each sentence correctly: a shared hard tenth, then its own random errors."""
    wrong = np.zeros(len(LABELS), dtype=bool)
    wrong[np.random.default_rng(99).permutation(len(LABELS))[: len(LABELS) // 10]] = True
    return ~(wrong | (np.random.default_rng([index, seed]).random(len(LABELS)) < error))


def correctness() -> dict[str, dict[int, np.ndarray]]:
    """Per series and seed, the correctness the records below hold: the truth the tests recompute from."""
    return {ORDER[i]: {seed: _correct(i, error, seed) for seed in seeds}
            for i, (error, seeds) in enumerate(SERIES.values())}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("series") / "results"
    rng = np.random.default_rng(2)
    truth = correctness()
    for name, (method, targets) in zip(ORDER, SERIES):
        _, seconds, memory, trainable, dtype = FAKE_METHODS[method]
        for seed, correct in truth[name].items():
            predictions = np.where(correct, LABELS, 1 - LABELS)
            _write_run(folder, f"comparison-{name.replace(':', '-')}-s{seed}", method=method, group="comparison",
                       accuracy=float(correct.mean()), seconds=seconds * (1.5 if targets else 1.0), memory=memory,
                       trainable=trainable * (3 if targets else 1), dtype=dtype, seed=seed, n_steps=6, n_evals=2,
                       rng=rng, n_eval=len(LABELS), predictions=predictions, eval_labels=LABELS.tolist(),
                       targets=targets)
    return folder


@pytest.fixture(scope="module")
def loaded(results_dir: Path) -> Results:
    return RunStore(results_dir).load()


def test_load_keys_runs_steps_and_evals_by_series(loaded: Results) -> None:
    assert sorted(set(loaded.runs["series"])) == sorted(ORDER)
    series_of = dict(zip(loaded.runs["run_id"], loaded.runs["series"]))
    for table in (loaded.steps, loaded.evals):
        assert (table["series"] == table["run_id"].map(series_of)).all()
    assert set(loaded.runs.loc[loaded.runs["method"] == "lora", "series"]) == {"lora", "lora:all-linear"}


def test_labels_colours_and_order_of_series() -> None:
    assert [method_label(s) for s in ORDER] == ["Full FT", "LoRA", "LoRA (all-linear)", "DoRA (all-linear)",
                                                "QLoRA (all-linear)"]
    assert method_color("lora") != method_color("lora:all-linear")
    default, other = (rgb_to_hsv(to_rgb(method_color(s))) for s in ("lora", "lora:all-linear"))
    assert other[0] == pytest.approx(default[0], abs=0.01) and other[2] < 0.8 * default[2]  # same hue, darker
    assert method_marker("lora:all-linear") == method_marker("lora")
    shuffled = ["qlora:all-linear", "lora:attn-all", "dora", "lora:all-linear", "full", "lora", "custom"]
    assert ordered_methods(shuffled) == ["full", "lora", "lora:all-linear", "lora:attn-all", "dora",
                                         "qlora:all-linear", "custom"]


def test_comparison_pairs_of_series() -> None:
    """Against full fine-tuning; a LoRA variant against LoRA on its own targets only; targets against default."""
    assert comparison_pairs(ORDER) == PAIRS
    assert comparison_pairs(["lora", "dora", "dora:all-linear"]) == [("dora", "lora"), ("dora:all-linear", "dora")]
    assert series_on("lora", "qlora:all-linear") == "lora:all-linear" and series_on("lora", "dora") == "lora"


def test_paired_comparisons_match_numpy(loaded: Results) -> None:
    table = paired_comparisons(loaded.runs, LABELS, n_resamples=500)
    assert list(zip(table["method"], table["reference"])) == PAIRS
    truth = correctness()
    for row in table.itertuples():
        seeds = sorted(set(truth[row.method]) & set(truth[row.reference]))
        compared = np.mean([truth[row.method][s] for s in seeds], axis=0)
        reference = np.mean([truth[row.reference][s] for s in seeds], axis=0)
        assert row.n_seeds == len(seeds) == (2 if "lora" in (row.method, row.reference) else 3)
        assert row.difference == pytest.approx(np.mean(compared - reference), abs=1e-12)
        assert row.low <= row.difference <= row.high
        assert (row.p_value < 0.05) == (row.low > 0 or row.high < 0)  # the p of the interval's own resamples


def test_summary_table_has_a_row_per_series(loaded: Results) -> None:
    paired = paired_statistics(loaded.runs)
    assert paired.reason is None
    table = report.summary_table(loaded.runs, paired.table)
    assert list(table.index) == ORDER
    truth = correctness()
    for name in ORDER:
        accuracies = [correct.mean() for correct in truth[name].values()]
        assert table.loc[name, "n_seeds"] == len(accuracies)
        assert table.loc[name, "accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    pairs = paired.table.set_index(["method", "reference"])["difference"]
    assert table.loc["dora:all-linear", "vs_lora"] == pairs[("dora:all-linear", "lora:all-linear")]
    assert table.loc["lora:all-linear", "vs_targets"] == pairs[("lora:all-linear", "lora")]
    assert table.loc["lora:all-linear", "vs_full"] == pairs[("lora:all-linear", "full")]
    assert np.isnan(table.loc["lora:all-linear", "vs_lora"]) and np.isnan(table.loc["lora", "vs_targets"])
    lines = report.summary_markdown(table).splitlines()
    assert lines[0].endswith("| vs full fine-tuning | vs LoRA, same targets | vs default targets |")
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]] == [method_label(s) for s in ORDER]


def test_per_run_table_names_the_series(results_dir: Path) -> None:
    """The table ``make run`` ends with: LoRA on two target sets reads as two series, not one method twice."""
    table = report.format_summary(RunStore(results_dir).summary())
    series_of = dict(zip(table["run"], table["series"]))
    assert series_of["comparison-lora-all-linear-s0"] == "lora:all-linear" and series_of["comparison-lora-s0"] == "lora"
    assert set(table["series"]) == set(ORDER)


def test_readings_table_reads_every_pair_by_the_rule(results_dir: Path, loaded: Results) -> None:
    paired = paired_statistics(loaded.runs).table
    rows = report.readings_markdown(results_dir).splitlines()[2:]
    assert len(rows) == len(PAIRS)
    for line, pair in zip(rows, paired.itertuples()):
        cells = line.strip("| ").split(" | ")
        assert cells[:2] == [method_label(pair.method), method_label(pair.reference)]
        if pair.reference == "full":  # the rule was written for "against full fine-tuning" ...
            assert cells[3:] == [str(pair.n_seeds), reading(pair.difference, pair.low, pair.high)]
        else:  # ... any other pair is described by its interval, with no verdict
            assert cells[3] == str(pair.n_seeds) and cells[4].startswith("no rule: interval")
    (results_dir.parent / "empty").mkdir()
    assert report.readings_markdown(results_dir.parent / "empty").startswith("(no paired test")


def test_figures_draw_a_curve_per_series(results_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    drawn, save = [], accuracy.save_with_footnote

    def keep(fig, *args):
        drawn.append(fig)
        return save(fig, *args)

    monkeypatch.setattr(accuracy, "save_with_footnote", keep)
    paths = plots.plot_all(results_dir, tmp_path / "imgs")
    assert {p.name for p in paths} == COMPARISON_PNGS and "skipped" not in capsys.readouterr().err
    for path in paths:
        _assert_png(path)
    loss = next(fig for fig in drawn if fig.axes[0].get_title(loc="left") == "Training loss per method")
    lines = {line.get_label(): line.get_color() for line in loss.axes[0].get_lines()
             if not line.get_label().startswith("_")}
    assert list(lines) == [method_label(s) for s in ORDER]
    assert len(set(lines.values())) == len(ORDER)


def test_lr_tuning_draws_a_curve_per_series(tmp_path: Path) -> None:
    default = tune_runs_table(("lora",))
    all_linear = default.assign(targets="all-linear", run_id=default["run_id"] + "-all-linear")
    path = plots.plot_lr_tuning(Results(pd.concat([default, all_linear], ignore_index=True), pd.DataFrame(),
                                        pd.DataFrame()), tmp_path)
    _assert_png(path)
