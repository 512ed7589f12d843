"""The summary table, the recorded labels and the paired statistics as the notebook, README and docs/results.md show them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parents[1] / ".cache" / "matplotlib"))

from test_plots import multiseed_predictions, tune_runs_table, write_multiseed_results  # noqa: E402

from peft_utils import report  # noqa: E402
from peft_utils.data import load_sst2  # noqa: E402
from peft_utils.stats import paired_statistics, recorded_labels, runs_in_group  # noqa: E402
from peft_utils.store import RunStore  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = np.random.default_rng(3).integers(0, 2, 300)


@pytest.fixture(scope="module")
def multiseed_runs(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    results = write_multiseed_results(tmp_path_factory.mktemp("report") / "results", LABELS, sweep=False)
    return RunStore(results).load().runs


def test_summary_table_mean_sd_and_paired_columns(multiseed_runs: pd.DataFrame) -> None:
    # A tuning run with a far better accuracy must change nothing: it was scored on other rows.
    runs = pd.concat([multiseed_runs, tune_runs_table(("lora",)).assign(final_accuracy=0.999)], ignore_index=True)
    paired = paired_statistics(runs, labels=LABELS)
    assert paired.reason is None
    table = report.summary_table(runs, paired.table)
    assert list(table.index) == ["full", "lora", "dora", "qlora"]
    for method in table.index:
        accuracies = [(multiseed_predictions(LABELS, method, s) == LABELS).mean() for s in (0, 1, 2)]
        assert table.loc[method, "n_seeds"] == 3
        assert table.loc[method, "accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
        assert table.loc[method, "accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1), abs=1e-12)
    pairs = paired.table.set_index(["method", "reference"])
    assert table.loc["dora", "vs_full"] == pairs.loc[("dora", "full"), "difference"]
    assert table.loc["qlora", "vs_lora_p"] == pairs.loc[("qlora", "lora"), "p_value"]
    assert np.isnan(table.loc["full", "vs_full"]) and np.isnan(table.loc["lora", "vs_lora"])
    markdown = report.summary_markdown(table)
    lines = markdown.splitlines()
    assert len(lines) == 2 + 4 and "vs full fine-tuning" in lines[0] and "vs LoRA" in lines[0]
    dora = pairs.loc[("dora", "full")]
    assert f"{100 * table.loc['dora', 'accuracy']:.1f} ± {100 * table.loc['dora', 'accuracy_sd']:.1f}" in lines[4]
    assert f"[{100 * dora['low']:+.1f}, {100 * dora['high']:+.1f}]".replace("-", "\N{MINUS SIGN}") in lines[4]


def test_one_seed_has_no_sd_and_runs_without_predictions_skip_paired_tests(
        capsys: pytest.CaptureFixture[str]) -> None:
    runs = RunStore(REPO_ROOT / "results" / "cpu-reference").load().runs
    runs = runs[runs["group"] == "comparison"].drop(columns=["dev_predictions", "dev_probabilities"])
    paired = paired_statistics(runs, labels=np.zeros(872, dtype=int))
    assert paired.table is None and "records no dev_predictions" in paired.reason
    assert capsys.readouterr().err.strip() == f"paired statistics skipped: {paired.reason}"
    table = report.summary_table(runs, paired.table)
    assert table["accuracy_sd"].isna().all() and (table["n_seeds"] == 1).all()
    assert "±" not in report.summary_markdown(table) and "vs LoRA" not in report.summary_markdown(table)


def test_paired_statistics_without_labels_say_why(multiseed_runs: pd.DataFrame) -> None:
    paired = paired_statistics(multiseed_runs.drop(columns=["eval_labels"]))
    assert paired.table is None and "records no eval_labels" in paired.reason
    wrong = paired_statistics(multiseed_runs, labels=1 - LABELS)
    assert wrong.table is None and "not those of the rows" in wrong.reason
    mixed = multiseed_runs.copy()
    mixed.at[mixed.index[0], "eval_labels"] = (1 - LABELS).tolist()
    assert "scored on different rows" in paired_statistics(mixed).reason


def test_recorded_labels_reproduce_the_committed_reference_runs(sst2_dir: Path) -> None:
    """The labels results/cpu-reference records are the dev file's, and give every run its recorded accuracy
    (checked inside paired_statistics)."""
    runs = RunStore(REPO_ROOT / "results" / "cpu-reference").load().runs
    labels = recorded_labels(runs_in_group(runs, "comparison"))
    assert np.array_equal(labels, load_sst2(sst2_dir)["dev"]["label"].to_numpy())  # eval_size 872: all of dev
    paired = paired_statistics(runs)
    assert paired.reason is None
    assert list(zip(paired.table["method"], paired.table["reference"])) == [
        ("lora:all-linear", "full"), ("dora:all-linear", "full"), ("qlora:all-linear", "full"),
        ("dora:all-linear", "lora:all-linear"), ("qlora:all-linear", "lora:all-linear")]
    assert (paired.table["n_seeds"] == 1).all() and (paired.table["n_sentences"] == 872).all()


@pytest.mark.parametrize(("results_name", "page"), [
    ("cpu-fulltrain-all-linear", "README.md"),        # the front page's one table
    ("cpu-fulltrain-all-linear", "docs/results.md"),  # every table, in depth
    ("cpu-fulltrain", "docs/results.md"),
    ("cpu-reference", "docs/results.md"),
])
def test_readme_tables_are_the_committed_records(results_name: str, page: str) -> None:
    """The results tables of the README and docs/results.md are this function's output on the committed records,
    byte for byte: a rerun that changes the records, or a hand edit of a number, fails here until the page is
    regenerated."""
    table = report.comparison_markdown(REPO_ROOT / "results" / results_name)
    assert table in (REPO_ROOT / page).read_text(encoding="utf-8")


def test_predictions_show_a_two_class_probability_in_percent_and_a_k_class_prediction_as_named() -> None:
    table = pd.DataFrame({"run_id": ["a", "b"], "method": ["lora", "full"], "targets": [None, None],
                          "seed": [0, 0], "labels": [["negative", "positive"], ["sports", "world", "tech"]]})
    predictions = pd.DataFrame({"sentence": ["x"], "a": [0.876], "b": ["world"]})
    shown = report.format_predictions(predictions, table)
    assert shown.to_dict("list") == {"sentence": ["x"], "lora: P(positive) %": [87.6], "full": ["world"]}
