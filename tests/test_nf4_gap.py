"""bench/nf4_gap.py on tiny cases: a base against itself has no error, the NF4 body under a copied head differs only
in the body, and an adapter scored on its own base repeats its record bit for bit (a smoke run trained here, so the
same CPU made the record), end to end through the command line."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from bench import nf4_gap
from peft_utils.config import make_config
from peft_utils.experiment import run_comparison
from peft_utils.models import resolve_model_source

# The dev rows, loader settings and labels a record gives the bench, for the base-only checks.
RECORD = {"labels": ["negative", "positive"], "max_length": 32, "eval_batch_size": 8, "per_device_batch_size": 4,
          "seed": 0, "bucket_by_length": True}


@pytest.fixture(scope="module")
def dev16(sst2_dir):
    from peft_utils.data import load_sst2

    return load_sst2(sst2_dir)["dev"].iloc[:16].reset_index(drop=True)


def test_a_float32_base_against_itself_has_no_error(sst2_dir, dev16):
    source = resolve_model_source("random-gpt2-tiny", sst2_dir.parent)
    first, tokenizer = nf4_gap.load_base("fp32", source)
    second, _ = nf4_gap.load_base("fp32", source)
    loader = nf4_gap.eval_loader(dev16, tokenizer, RECORD)
    own, other = nf4_gap.score(first, loader), nf4_gap.score(second, loader)
    row = nf4_gap.compare("fp32 twice", "none", None, "fp32", "fp32", own, other)
    assert (row.n, row.agree) == (16, 16)
    assert row.logit_mean_rel == row.logit_max_rel == row.first_token_rel_mean == row.first_token_rel_max == 0.0
    assert own.outputs.head_input is None  # GPT-2's head reads every token: no per-row head input
    # the captured logits are those evaluate scored, in row order
    assert own.outputs.logits.softmax(-1)[:, -1].tolist() == pytest.approx(own.evaluation.probabilities, abs=1e-6)


def test_the_nf4_body_differs_under_the_same_head(minilm_dir, dev16):
    reference, nf4 = nf4_gap.base_gap("minilm", dev16, RECORD)
    assert (reference.base, nf4.base, reference.n, reference.agree) == ("fp32", "nf4", 16, 16)
    assert reference.first_token_rel_max == reference.head_input_rel_max == reference.logit_max_rel == 0.0
    assert 0.0 < nf4.first_token_rel_mean < 1.0 and 0.0 < nf4.head_input_rel_mean < 1.0  # BERT: pooled [CLS]
    assert 0.0 < nf4.logit_mean_rel <= nf4.logit_max_rel


@pytest.fixture(scope="module")
def smoke_gap(tmp_path_factory, sst2_dir, gpt2_tokenizer_dir):
    """A LoRA and a QLoRA smoke run (tiny random GPT-2, 16 rows, 16 dev rows) trained here, on the CPU (float32
    compute, which the bench compares; a GPU would train in bf16), then the bench's command line on them."""
    results = tmp_path_factory.mktemp("nf4-gap")
    run_comparison(make_config("smoke", data_dir=str(sst2_dir.parent), results_dir=str(results), device="cpu",
                               methods=["lora", "qlora"], seeds=[0], train_size=16, eval_size=16, max_length=24))
    out, table = results / "nf4_gap.md", results / "nf4_gap.csv"
    base_rows, adapters = nf4_gap.main(["--results-dir", str(results), "--data-dir", str(sst2_dir.parent),
                                        "--out", str(out), "--csv", str(table)])
    return results, base_rows, adapters, out, table


def test_each_adapter_repeats_its_record_on_its_own_base(smoke_gap):
    _, _, adapters, _, _ = smoke_gap
    assert [(a.run.method, a.run.own_base) for a in adapters] == [("lora", "fp32"), ("qlora", "nf4")]
    for adapter in adapters:
        own, other = adapter.rows
        assert (own.base, other.base) == (adapter.run.own_base, "nf4" if own.base == "fp32" else "fp32")
        assert own.record_predictions_differ == 0 and own.record_probability_max_diff == 0.0
        assert own.accuracy == own.record_accuracy == adapter.run.record["final_accuracy"]
        assert own.agree == own.n == other.n == 16 and own.logit_max_rel == 0.0
        assert np.isnan(other.head_input_rel_mean)  # GPT-2's head reads every token: no per-row head input
        assert other.accuracy == adapter.correct[other.base].mean() and other.record_accuracy is None


def test_the_command_writes_its_tables(smoke_gap):
    _, base_rows, adapters, out, table = smoke_gap
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# `") and "python -m bench.nf4_gap --results-dir" in text and "wall time" in text
    for heading in ("## 1. The NF4 base before training", "| lora | 0 | float32 | exact |",
                    "| qlora | 0 | NF4 | exact |", "| both on NF4 |"):
        assert heading in text
    with table.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["base"]) for r in rows] == [("none", "fp32"), ("none", "nf4"), ("lora", "fp32"),
                                                        ("lora", "nf4"), ("qlora", "nf4"), ("qlora", "fp32")]
    assert len(base_rows) == 2 and len(adapters) == 2


def test_rows_other_than_the_recorded_ones_are_refused(smoke_gap, sst2_dir):
    results = smoke_gap[0]
    run = nf4_gap.committed_runs(results, ["lora"])[0]
    wrong = {**run.record, "eval_labels": [1 - label for label in run.record["eval_labels"]]}
    with pytest.raises(ValueError, match="not those .* was scored on"):
        nf4_gap.dev_rows(wrong, sst2_dir.parent)
    with pytest.raises(ValueError, match="no complete comparison run"):
        nf4_gap.committed_runs(results, ["lora"], seeds=[7])
    with pytest.raises(ValueError, match="on targets all-linear"):  # these runs adapt the default set only
        nf4_gap.committed_runs(results, ["lora"], targets="all-linear")


def test_another_target_set_gets_its_own_files():
    assert nf4_gap.parse_args([]).out.name == "nf4_gap.md"
    args = nf4_gap.parse_args(["--targets", "all-linear"])
    assert (args.targets, args.out.name, args.csv.name) == ("all-linear", "nf4_gap-all-linear.md",
                                                            "nf4_gap-all-linear.csv")
    assert nf4_gap.parse_args(["--targets", "attn.*"]).out.name == "nf4_gap-attn__.md"


def test_a_missing_base_kind_is_refused():
    with pytest.raises(ValueError, match="unknown base 'int8'"):
        nf4_gap.load_base("int8", "minilm")
    assert torch.isnan(torch.tensor(nf4_gap.relative_error(None, torch.ones(2))[0]))
