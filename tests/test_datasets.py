"""Your own classification data (issue 28): local CSV / JSON Lines / Parquet files through ``datasets``, any number of
classes with their names, sentence pairs, a validation split carved from train, and one line for every bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peft_utils import experiment, report
from peft_utils.config import DataConfig, make_config
from peft_utils.data import CARVED_DEV_FRACTION, load_splits, load_sst2
from peft_utils.inference import predict_runs
from peft_utils.stats import macro_f1, needs_macro_f1, paired_statistics
from peft_utils.store import RunStore

WORDS = {"neg": "awful dull boring", "neutral": "plain ordinary average", "pos": "great lovely fine"}
CLI = ["--profile", "smoke", "--no-sweep", "--no-figures", "--methods", "full", "lora", "--max-length", "24"]


def _three_classes(rows_per_class: int) -> pd.DataFrame:
    """Texts whose words give their class away, so even a few steps learn something; string labels."""
    rows = [{"text": f"{WORDS[label]} film number {i}", "label": label}
            for i in range(rows_per_class) for label in WORDS]
    return pd.DataFrame(rows)


def _run(tmp_path: Path, capsys, *args: str) -> tuple[Path, str]:
    results = tmp_path / "results"
    code = experiment.main([*CLI, "--results-dir", str(results), "--imgs-dir", str(tmp_path / "imgs"), *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return results, captured.out


def test_a_three_class_csv_trains_names_its_labels_and_reports_macro_f1(tmp_path, capsys):
    folder = tmp_path / "reviews"
    folder.mkdir()
    _three_classes(20).to_csv(folder / "train.csv", index=False)
    _three_classes(4).to_csv(folder / "validation.csv", index=False)
    results, out = _run(tmp_path, capsys, "--dataset", str(folder), "--train-size", "30", "--eval-size", "all")
    runs = RunStore(results).load().runs
    assert set(runs["dataset"]) == {str(folder)} and set(runs["dev_split"]) == {"validation"}
    assert all(labels == ["neg", "neutral", "pos"] for labels in runs["labels"])
    assert all(len(labels) == 12 for labels in runs["eval_labels"])  # every validation row, each run
    assert paired_statistics(runs).reason is None  # per-sentence correctness against the recorded labels
    table = report.comparison_markdown(results)
    assert "macro-F1 % (mean)" in table.splitlines()[0]
    full = results / runs.set_index("method").loc["full", "run_id"]
    saved = json.loads((full / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(full), tokenizer=str(full))
    assert classify("a great lovely fine film")[0]["label"] in WORDS  # label names, not LABEL_2
    # the LoRA adapter loads in peft on a base given the recorded names, and predicts one of them
    predicted = predict_runs(results, list(runs["run_id"]), ["a great lovely fine film", "awful dull boring"])
    assert set(predicted.iloc[:, 1:].to_numpy().ravel()) <= set(WORDS) and predicted.shape == (2, 3)
    sentences = (s for s in ["a great lovely fine film", "awful dull boring"])  # read once, for every run
    assert predict_runs(results, list(runs["run_id"]), sentences).equals(predicted)
    shown = report.format_predictions(predicted, runs)  # K classes: each run's predicted class, as named
    assert set(shown.iloc[:, 1:].to_numpy().ravel()) <= set(WORDS)


def test_sentence_pairs_from_json_lines_with_a_carved_validation_split(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [{"premise": f"{WORDS[k]} scene {i}", "hypothesis": f"it was {WORDS[k].split()[0]}", "gold": n}
            for i in range(20) for n, k in enumerate(WORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(dataset=str(path), text_column=("premise", "hypothesis"), label_column="gold")
    splits = load_splits(data)
    assert list(splits.train.columns) == ["sentence", "sentence2", "label"] and splits.label_names == ("0", "1", "2")
    assert len(splits.dev) == 3 * round(CARVED_DEV_FRACTION * 20) and "carved from train" in splits.dev_split
    assert not set(splits.dev["sentence"]) & set(splits.train["sentence"])  # carved off, not copied
    results, _ = _run(tmp_path, capsys, "--dataset", str(path), "--text-column", "premise", "hypothesis",
                      "--label-column", "gold", "--train-size", "27", "--eval-size", "all")
    runs = RunStore(results).load().runs
    assert set(runs["dev_split"]) == {splits.dev_split} and (runs["n_eval"] == len(splits.dev)).all()


def test_parquet_reads_like_csv_and_trains(tmp_path, capsys):
    frame = _three_classes(10)
    frame.to_csv(tmp_path / "data.csv", index=False)
    frame.to_parquet(tmp_path / "data.parquet", index=False)
    csv, parquet = (load_splits(DataConfig(dataset=str(tmp_path / f"data.{kind}"))) for kind in ("csv", "parquet"))
    pd.testing.assert_frame_equal(csv.train, parquet.train)
    assert csv.label_names == parquet.label_names == ("neg", "neutral", "pos")
    results, _ = _run(tmp_path, capsys, "--dataset", str(tmp_path / "data.parquet"), "--methods", "lora",
                      "--train-size", "24", "--eval-size", "all")
    record = RunStore(results).load().runs.iloc[0]
    assert record["labels"] == ["neg", "neutral", "pos"] and record["n_eval"] == len(parquet.dev) == 3


def test_sst2_folder_read_as_any_dataset_gives_the_same_rows(sst2_dir):
    generic = load_splits(DataConfig(dataset=str(sst2_dir)))  # the TSV folder, read as any dataset
    strict = load_sst2(sst2_dir)
    for name in ("train", "dev"):
        pd.testing.assert_frame_equal(getattr(generic, name), strict[name])
    assert generic.label_names == ("0", "1")


def test_macro_f1_against_per_class_precision_and_recall():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    predicted = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2, 0])
    per_class = []
    for c in (0, 1, 2):
        precision = np.mean(labels[predicted == c] == c)
        recall = np.mean(predicted[labels == c] == c)
        per_class.append(2 * precision * recall / (precision + recall))
    assert macro_f1(predicted, labels) == pytest.approx(np.mean(per_class), abs=1e-12)
    assert needs_macro_f1(labels) and not needs_macro_f1([0, 1] * 5) and needs_macro_f1([0] * 8 + [1] * 2)


def _bad(tmp_path: Path, rows: list[dict], name: str = "train.csv", **data) -> str:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_splits(DataConfig(dataset=str(tmp_path if name == "validation.csv" else path), **data))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_every_bad_input_is_one_line_naming_the_data_and_column(tmp_path, monkeypatch):
    good = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    assert "no column 'review'" in _bad(tmp_path, good, text_column=("review",))
    assert "no column 'stars'" in _bad(tmp_path, good, label_column="stars")
    assert "every train row has label 'x'" in _bad(tmp_path, [{"text": "a", "label": "x"}] * 3)
    assert "row 2: empty text in column 'text'" in _bad(tmp_path, [good[0], {"text": " ", "label": "y"}])
    pd.DataFrame(good).to_csv(tmp_path / "train.csv", index=False)
    assert "validation label 'z' is not one of the labels (x, y)" in _bad(
        tmp_path, [{"text": "c", "label": "z"}], "validation.csv")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"dataset 'someone/reviews' is not a local file or folder, and Hugging "
                                         r"Face offline mode is on"):
        load_splits(DataConfig(dataset="someone/reviews"))
    with pytest.raises(FileNotFoundError, match="dataset file missing.csv does not exist"):
        load_splits(DataConfig(dataset="missing.csv"))
    with pytest.raises(ValueError, match="text_column has no effect with dataset='sst2'"):
        make_config("smoke", text_column="review")
