"""The data pipeline: the real SST-2 files, malformed files refused, source resolution, subsetting and batching."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from peft_utils.core.batches import collate, encode, make_loader
from peft_utils.config import DataConfig
from peft_utils.data import load_splits, load_sst2, subset
from peft_utils.models import load_tokenizer

PAD = 99


@pytest.fixture(scope="module")
def sst2(sst2_dir):
    return load_sst2(sst2_dir)


@pytest.fixture
def no_data_env(monkeypatch):
    """No local folder configured and the hub switched off."""
    monkeypatch.delenv("PEFT_LAB_DATA", raising=False)
    monkeypatch.delenv("SST2_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_split_files(folder, train: str, dev: str = "sentence\tlabel\nfine \t1\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    (folder / "dev.tsv").write_text(dev, encoding="utf-8")
    return folder


def rows(labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"sentence": [f"s{i}" for i in range(len(labels))], "label": labels})


# ------------------------------------------------------------------------------------------ real files


def test_shared_sst2_files(sst2):
    train, dev = sst2["train"], sst2["dev"]
    assert (len(train), len(dev)) == (67_349, 872)
    for frame in (train, dev):
        assert list(frame.columns) == ["sentence", "label"]
        assert set(frame["label"].unique()) == {0, 1}
        assert frame["label"].dtype == "int64"
        assert not frame["sentence"].str.contains(r"\s$").any()
    assert train["sentence"].iloc[0] == "hide new secretions from the parental units"


def test_parent_folder_and_env_vars_resolve(sst2_dir, monkeypatch, no_data_env):
    expected = load_sst2(sst2_dir)["dev"]
    pd.testing.assert_frame_equal(load_sst2(sst2_dir.parent)["dev"], expected)
    monkeypatch.setenv("PEFT_LAB_DATA", str(sst2_dir.parent))
    pd.testing.assert_frame_equal(load_sst2()["dev"], expected)
    monkeypatch.delenv("PEFT_LAB_DATA")
    monkeypatch.setenv("SST2_DIR", str(sst2_dir))
    pd.testing.assert_frame_equal(load_sst2()["dev"], expected)


def test_recorded_source_is_one_absolute_path_from_any_spelling(tmp_path, monkeypatch, no_data_env):
    """``../data``, ``./data/sst2`` and the absolute path are one folder, recorded alike."""
    folder = write_split_files(tmp_path / "data" / "sst2", "sentence\tlabel\ngood \t1\nbad\t0\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    spellings = ["../data", "../work/../data/sst2", str(folder)]
    assert {load_splits(DataConfig(data_dir=spelling)).source for spelling in spellings} == {str(folder)}


# ------------------------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("sentence\nok\n", "(train split): no column 'label'"),
        ("sentence\tlabel\ngood \t1\nbad \t2\n", "train label 2 is not one of the labels (0, 1)"),
        ("sentence\tlabel\ngood \t1\na\tb\t1\n", "train.tsv: cannot read it as csv: Error tokenizing data. C error: "
                                                  "Expected 2 fields in line 3, saw 3"),
        ("sentence\tlabel\ngood \t1\nbad\n", "(train split): row 2: empty label in column 'label'"),
        ("", "train.tsv: cannot read it as csv"),
        ("sentence\tlabel\n", "train.tsv: cannot read it as csv"),
    ],
    ids=["missing-label-column", "label-2", "three-fields", "missing-label", "empty-file", "header-only"],
)
@pytest.mark.filterwarnings("error")  # the one-line error comes alone: no warning (pandas' or ours) before it
def test_malformed_tsv_is_one_line_naming_file_and_problem(tmp_path, content, detail):
    write_split_files(tmp_path / "sst2", content)
    with pytest.raises(ValueError) as error:
        load_sst2(tmp_path)
    message = str(error.value)
    assert detail in message and "\n" not in message


def test_quotes_are_literal_and_trailing_space_stripped(tmp_path):
    write_split_files(tmp_path, 'sentence\tlabel\n"quoted , still one field \t1\nit \'s `` fine \'\' \t0\n')
    frame = load_sst2(tmp_path)["train"]
    assert frame["sentence"].tolist() == ['"quoted , still one field', "it 's `` fine ''"]
    assert frame["label"].tolist() == [1, 0]


# ---------------------------------------------------------------------------------- source resolution


def test_offline_without_folder_explains_how_to_point_at_data(no_data_env):
    with pytest.raises(FileNotFoundError) as error:
        load_sst2()
    message = str(error.value)
    assert all(hint in message for hint in ("PEFT_LAB_DATA", "SST2_DIR", "data_dir", "train.tsv", "dev.tsv"))


def test_offline_never_calls_the_hub(no_data_env, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub called while offline"))
    with pytest.raises(FileNotFoundError):
        load_sst2()


def test_hub_unreachable_explains_how_to_point_at_data(no_data_env, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(FileNotFoundError, match="PEFT_LAB_DATA"):
        load_sst2()


def test_hub_splits_become_train_and_dev_like_the_tsv(no_data_env, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")

    def split(sentences, labels):
        return datasets.Dataset.from_dict({"sentence": sentences, "label": labels, "idx": list(range(len(labels)))})

    fake = {"train": split(["a good one ", "bad "], [1, 0]), "validation": split(["meh "], [0])}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)
    loaded = load_sst2()
    assert loaded["train"].to_dict("list") == {"sentence": ["a good one", "bad"], "label": [1, 0]}
    assert loaded["dev"].to_dict("list") == {"sentence": ["meh"], "label": [0]}
    assert loaded["dev"]["label"].dtype == "int64"


def test_missing_or_incomplete_folder_is_named(tmp_path, no_data_env):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_sst2(tmp_path / "nowhere")
    folder = write_split_files(tmp_path / "sst2", "sentence\tlabel\nok \t1\n")
    (folder / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"sst2.*dev\.tsv"):
        load_sst2(tmp_path)


def test_env_folder_that_is_wrong_does_not_fall_back_to_hub(tmp_path, monkeypatch, no_data_env):
    monkeypatch.setenv("PEFT_LAB_DATA", str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="PEFT_LAB_DATA"):
        load_sst2()


# ---------------------------------------------------------------------------------------- subsetting


def test_subset_is_seeded_and_keeps_order():
    frame = rows([0, 1] * 50)
    first = subset(frame, 10, seed=1)
    pd.testing.assert_frame_equal(first, subset(frame, 10, seed=1))
    assert not first.equals(subset(frame, 10, seed=2))
    assert first["sentence"].tolist() == sorted(first["sentence"], key=lambda s: int(s[1:]))
    pd.testing.assert_frame_equal(subset(frame, None, seed=3), frame)
    pd.testing.assert_frame_equal(subset(frame, 1_000, seed=3), frame)


def test_balanced_subset():
    frame = rows([0] * 30 + [1] * 70)
    assert subset(frame, 40, seed=0, balanced=True)["label"].value_counts().to_dict() == {0: 20, 1: 20}
    assert subset(frame, None, seed=0, balanced=True)["label"].value_counts().to_dict() == {0: 30, 1: 30}
    with pytest.raises(ValueError, match="rarest class"):
        subset(frame, 80, seed=0, balanced=True)
    with pytest.raises(ValueError, match="divisible"):
        subset(frame, 41, seed=0, balanced=True)


@pytest.mark.parametrize("size", [0, -3])
def test_subset_rejects_non_positive_size(size):
    with pytest.raises(ValueError):
        subset(rows([0, 1]), size, seed=0)


# ---------------------------------------------------------------------------------- tokenising, batching


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def toy_encoded(n: int = 64) -> list[dict]:
    """Row ``i`` starts with the unique token ``1000 + i`` and has ``1 + i % 13`` tokens."""
    return [{"input_ids": [1000 + i] + list(range(1, 1 + i % 13)), "label": i % 2} for i in range(n)]


def row_ids(loader) -> list[list[int]]:
    return [(batch["input_ids"][:, 0] - 1000).tolist() for batch in loader]


def loader_order(seed: int, **options) -> list[list[int]]:
    return row_ids(make_loader(toy_encoded(), batch_size=4, pad_token_id=PAD, shuffle=True, seed=seed, **options))


@pytest.mark.parametrize("bucket_by_length", [False, True])
def test_loader_order_is_seeded(bucket_by_length):
    assert loader_order(0, bucket_by_length=bucket_by_length) == loader_order(0, bucket_by_length=bucket_by_length)
    assert loader_order(0, bucket_by_length=bucket_by_length) != loader_order(1, bucket_by_length=bucket_by_length)


def test_bucketing_covers_every_row_once_with_less_padding():
    encoded = toy_encoded(200)

    def batches(bucket: bool):
        return list(make_loader(encoded, 8, PAD, shuffle=True, seed=0, bucket_by_length=bucket))

    bucketed, plain = batches(True), batches(False)
    assert len(bucketed) == len(plain) == 25
    assert sorted(i for ids in row_ids(bucketed) for i in ids) == list(range(200))
    assert sum(b["input_ids"].numel() for b in bucketed) < sum(b["input_ids"].numel() for b in plain)
    widths = [b["input_ids"].shape[1] for b in bucketed]
    assert widths != sorted(widths), "batch order must be shuffled after sorting by length"


def test_encode_truncates_with_real_gpt2_tokenizer(gpt2_tokenizer_dir):
    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    frame = pd.DataFrame({"sentence": ["Hello, world!", "word " * 50], "label": [1, 0]})
    encoded = encode(frame["sentence"], frame["label"], tokenizer, max_length=8)
    assert encoded[0] == {"input_ids": [15496, 11, 995, 0], "label": 1}
    assert len(encoded[1]["input_ids"]) == 8 and encoded[1]["label"] == 0
    batch = next(iter(make_loader(encoded, 2, tokenizer.pad_token_id, shuffle=False, seed=0)))
    assert batch["input_ids"][0, 4:].tolist() == [tokenizer.eos_token_id] * 4
