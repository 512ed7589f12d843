"""The training loop: it learns, it repeats exactly for a seed, it records what the plots read, and the GPT-2
classifier is read at the last real token. Tiny random GPT-2 models with the real tokenizer keep this fast."""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from peft_utils.config import TrainConfig
from peft_utils.core.batches import collate, encode, make_loader, micro_batches
from peft_utils.core.loop import evaluate, linear_schedule, make_optimizer, set_seed
from peft_utils.core.settings import AdapterSettings
from peft_utils.models import build_model, load_tokenizer, random_gpt2
from peft_utils.store import RunRecorder, read_events
from peft_utils.train import Recording, _PeakMemory, train

POSITIVE = ("great", "good", "superb", "lovely", "brilliant", "wonderful")
NEGATIVE = ("bad", "awful", "dreadful", "boring", "terrible", "poor")


def _rule_frame(repeats: int) -> pd.DataFrame:
    """An easy, learnable rule: the label is the sentiment of the last word (even a random GPT-2 separates it)."""
    rows = [(f"the film was {word}", 1) for word in POSITIVE] + [(f"the film was {word}", 0) for word in NEGATIVE]
    return pd.DataFrame(rows * repeats, columns=["sentence", "label"])


def _config(**overrides) -> TrainConfig:
    settings = dict(epochs=1, batch_size=8, warmup_ratio=0.0, max_length=16, log_every=1, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def _run(model_dir, method: str, seed: int, config: TrainConfig, repeats: int = 4, dropout: float = 0.0,
         model_dropout: bool = True, lr: float = 1e-2):
    set_seed(seed)
    model, tokenizer = build_model(method, model_dir, AdapterSettings(rank=4, alpha=8, dropout=dropout))
    if not model_dropout:  # GPT-2's own dropout masks depend on the batch shape
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return train(model, tokenizer, _rule_frame(repeats), _rule_frame(1), config, lr=lr, seed=seed)


@pytest.mark.parametrize("method,lr", [("full", 1e-3), ("lora", 1e-2), ("dora", 1e-2), ("qlora", 1e-2)])
def test_loss_decreases(tiny_gpt2_dir, method, lr):
    result = _run(tiny_gpt2_dir, method, seed=0, config=_config(epochs=5), lr=lr)
    losses = result.losses
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"{method}: loss did not fall clearly ({first:.3f} -> {last:.3f})"
    assert result.summary["final_accuracy"] == 1.0


def test_same_seed_repeats_exactly_and_other_seed_differs(tiny_gpt2_dir):
    config = _config(epochs=1)
    first = _run(tiny_gpt2_dir, "dora", seed=0, config=config, dropout=0.1).losses
    again = _run(tiny_gpt2_dir, "dora", seed=0, config=config, dropout=0.1).losses
    other = _run(tiny_gpt2_dir, "dora", seed=1, config=config, dropout=0.1)
    assert first == again
    assert first != other.losses


def test_evaluating_more_often_does_not_change_training(tiny_gpt2_dir):
    plain = _run(tiny_gpt2_dir, "lora", 0, _config(epochs=2, bucket_by_length=True), dropout=0.1).losses
    evaluated = _run(tiny_gpt2_dir, "lora", 0, _config(epochs=2, bucket_by_length=True, eval_every=1), dropout=0.1)
    assert evaluated.losses == plain and len(evaluated.evals) == 12


def test_accumulation_matches_a_larger_batch(tiny_gpt2_dir):
    """A global batch of 8 as 2 accumulated micro-batches of 4 must give the step one batch of 8 gives."""
    big = _run(tiny_gpt2_dir, "lora", 0, _config(batch_size=8), repeats=2, model_dropout=False).losses
    accumulated = _run(tiny_gpt2_dir, "lora", 0, _config(batch_size=8, grad_accum_steps=2), repeats=2,
                       model_dropout=False).losses
    assert len(big) == len(accumulated) == 3
    assert accumulated == pytest.approx(big, abs=1e-5)


def test_records_every_event_field(tiny_gpt2_dir, tmp_path):
    config = _config(epochs=2, eval_every=2, log_every=2)
    set_seed(0)
    model, tokenizer = build_model("lora", tiny_gpt2_dir, AdapterSettings(rank=2, alpha=4))
    with RunRecorder(tmp_path, "run") as recorder:
        info = {"run_id": "run", "method": "lora"}
        result = train(model, tokenizer, _rule_frame(2), _rule_frame(1), config, lr=1e-2, seed=0,
                       recording=Recording(recorder, info))
    events = read_events(tmp_path / "run.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "config" and kinds[-1] == "summary"
    config_event = events[0]
    for key in ("run_id", "method", "lr", "epochs", "batch_size", "max_length", "seed", "train_size", "eval_size",
                "device", "compute_dtype", "trainable_params", "total_params"):
        assert key in config_event, key
    assert config_event["device"] == "cpu" and config_event["compute_dtype"] == "float32"
    assert config_event["hardware"].endswith(f", {torch.get_num_threads()} threads")  # times compare per machine
    assert (config_event["train_size"], config_event["eval_size"]) == (24, 12)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [2, 4, 6]  # 3 steps per epoch, logged every 2 steps and at the end
    assert all(set(e) >= {"step", "epoch", "loss", "lr", "elapsed_s"} for e in steps)
    evals = [e for e in events if e["event"] == "eval"]
    assert [(e["step"], e["epoch"]) for e in evals] == [(2, 2 / 3), (3, 1.0), (4, 4 / 3), (6, 2.0)]
    assert all(set(e) >= {"step", "epoch", "accuracy", "loss", "n", "eval_time_s"} for e in evals)
    # an epoch's end also records that epoch's mean training loss (dev loss rising while it falls: overfitting)
    assert ["train_loss" in e for e in evals] == [False, True, False, True]
    assert [e["train_loss"] for e in evals[1::2]] == pytest.approx([sum(result.losses[:3]) / 3,
                                                                    sum(result.losses[3:]) / 3])
    summary = events[-1]
    assert set(summary) >= {"train_time_s", "eval_time_s", "samples_per_s", "tokens_per_s", "peak_memory_bytes",
                            "memory_kind", "final_accuracy", "final_eval_loss", "n_eval", "steps"}
    assert summary["memory_kind"] == "rss" and summary["peak_memory_bytes"] > 0
    assert summary["steps"] == 6 and summary["n_eval"] == 12
    assert summary["final_accuracy"] == evals[-1]["accuracy"] == result.summary["final_accuracy"]
    json.dumps(summary)  # plain JSON values only


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resettable peak RSS is Linux's")
def test_each_run_measures_its_own_peak_resident_memory():
    """On Linux the kernel's peak RSS is reset per run (``/proc/self/clear_refs``, proc(5)): a transient peak that
    no sample sees is counted, and the next run does not inherit it. Fails if the kernel interface changes."""
    mib = 2**20
    first = _PeakMemory(torch.device("cpu"))
    first.start()
    baseline = psutil.Process().memory_info().rss
    transient = np.ones(256 * mib // 8)  # 256 MiB, touched, freed before the peak is read
    del transient
    assert first.peak_bytes() >= baseline + 200 * mib
    second = _PeakMemory(torch.device("cpu"))
    second.start()
    assert second.peak_bytes() < baseline + 100 * mib


def test_evaluate_uses_eval_mode_and_restores_it(gpt2_tokenizer_dir):
    model = random_gpt2("tiny", seed=0, resid_pdrop=0.5)
    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    frame = _rule_frame(1)  # longest first, so length bucketing reverses the order:
    frame["sentence"] = ["the film was " + "very " * (11 - i) + s.split()[-1] for i, s in enumerate(frame["sentence"])]
    rows = encode(frame["sentence"], frame["label"], tokenizer, 16)
    loader = make_loader(rows, 5, tokenizer.pad_token_id, shuffle=False, seed=0, bucket_by_length=True)
    model.train()
    first = evaluate(model, loader)
    assert model.training  # the caller's mode is restored
    assert evaluate(model, loader) == first  # no dropout in evaluation: the same numbers again
    assert first.n == 12 and 0.0 <= first.accuracy <= 1.0

    # Per-row results come back in the frame's order, although length bucketing reordered the rows.
    assert [i for batch in loader.batch_sampler for i in batch] != list(range(12))
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row["input_ids"]])).logits.softmax(-1)[0] for row in rows]
    assert first.probabilities == pytest.approx([float(p[1]) for p in alone], abs=1e-5)
    assert first.predictions == [int(p.argmax()) for p in alone]
    assert first.accuracy == sum(p == y for p, y in zip(first.predictions, frame["label"])) / 12


def test_gpt2_classifier_reads_the_last_real_token(gpt2_tokenizer_dir):
    """A padded row must score exactly like the same sentence alone; this rests on ``config.pad_token_id``."""
    model = random_gpt2("tiny", seed=0)
    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    frame = pd.DataFrame({"sentence": ["a fine film", "a much longer sentence that forces padding of the first"],
                          "label": [1, 0]})
    short, long = encode(frame["sentence"], frame["label"], tokenizer, 32)
    batch = collate([short, long], tokenizer.pad_token_id)
    alone = collate([short], tokenizer.pad_token_id)
    assert (batch["input_ids"][0] == tokenizer.pad_token_id).any()  # the short row really is padded
    inputs = ("input_ids", "attention_mask")
    with torch.no_grad():
        in_batch = model(**{k: batch[k] for k in inputs}).logits[0]
        reference = model(**{k: alone[k] for k in inputs}).logits[0]
        torch.testing.assert_close(in_batch, reference, atol=1e-5, rtol=1e-5)

        # Without a pad id the model cannot find the last real token: a padded row is read at its last (pad)
        # position and scores differently, and a batch of several rows is refused outright.
        model.config.pad_token_id = None
        padded_alone = model(**{k: batch[k][:1] for k in inputs}).logits[0]
        assert not torch.allclose(padded_alone, reference, atol=1e-3)
        with pytest.raises(ValueError, match="padding token"):
            model(**{k: batch[k] for k in inputs})


def test_schedule_warms_up_then_decays_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = linear_schedule(optimizer, warmup_steps=3, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[3:] == sorted(rates[3:], reverse=True) and 0 < rates[-1] < 0.2
    assert scheduler.get_last_lr()[0] == 0.0


def test_no_weight_decay_on_vectors(tiny_gpt2_dir):
    model, _ = build_model("dora", tiny_gpt2_dir, AdapterSettings(rank=2, alpha=4))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])  # lora_A, lora_B, score head
    magnitudes = [layer.magnitude for layer in model.modules() if hasattr(layer, "magnitude")]
    assert magnitudes and all(any(m is p for p in plain["params"]) for m in magnitudes)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model.requires_grad_(False), lr=1e-3, weight_decay=0.1)


def test_optimizer_is_fused_where_torch_has_the_kernel_else_foreach(tiny_gpt2_dir):
    """Fused AdamW for float parameters on CPU (and CUDA); foreach where no fused kernel exists; never the loop."""
    model, _ = build_model("full", tiny_gpt2_dir)
    fused = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert fused.defaults["fused"] is True and not fused.defaults["foreach"]
    # The meta device has no fused kernel: the multi-tensor version, not torch's per-parameter loop.
    fallback = make_optimizer(model.to("meta"), lr=1e-3, weight_decay=0.1)
    assert fallback.defaults["foreach"] is True and not fallback.defaults["fused"]
    assert [g["weight_decay"] for g in fallback.param_groups] == [0.1, 0.0]


# The fused kernel computes AdamW's update in another order of operations than torch's reference loop. Over 30
# steps at a high learning rate the per-step losses differed by at most 6e-8 (full) and 1.2e-7 (DoRA), measured on
# CPU; the bound leaves room for other CPUs' vector widths while staying far below any real change (losses ~0.1-0.7).
FUSED_LOSS_TOLERANCE = 1e-6


@pytest.mark.parametrize("method,lr", [("full", 1e-3), ("dora", 1e-2)])
def test_fused_optimizer_matches_the_reference_loop_to_rounding(tiny_gpt2_dir, monkeypatch, method, lr):
    """The same run with torch's for-loop AdamW (same groups, rate and decay) gives the same losses to rounding."""
    config = _config(epochs=5)
    fast = _run(tiny_gpt2_dir, method, seed=0, config=config, lr=lr).losses

    def loop_adamw(model, lr, weight_decay):
        groups = make_optimizer(model, lr, weight_decay).param_groups
        return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                 lr=lr, foreach=False, fused=False)

    monkeypatch.setattr("peft_utils.core.loop.make_optimizer", loop_adamw)
    reference = _run(tiny_gpt2_dir, method, seed=0, config=config, lr=lr).losses
    assert len(fast) == len(reference) == 30
    assert fast == pytest.approx(reference, abs=FUSED_LOSS_TOLERANCE, rel=0)
    assert fast[-1] < 0.6 * fast[0]  # a real training run, not a flat loss


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


@pytest.mark.parametrize("rows,processes,accumulation", [(16, 2, 1), (5, 2, 1), (16, 2, 2), (7, 3, 2), (1, 2, 1)])
def test_micro_batches_cover_the_global_batch_once(rows, processes, accumulation):
    """Every row of a global batch goes to exactly one (process, micro-step), with its share of the batch as
    weight; a part left empty gets a stand-in row with weight 0, so every process runs the same backward passes."""
    batch = list(range(rows))
    parts = [micro_batches(batch, processes, accumulation, rank) for rank in range(processes)]
    assert all(len(p) == accumulation for p in parts)
    taken = [row for p in parts for part, weight in p if weight > 0 for row in part]
    assert sorted(taken) == batch
    assert sum(weight for p in parts for _, weight in p) == pytest.approx(1.0)
    for p in parts:
        for part, weight in p:
            assert weight == (0.0 if weight == 0 else pytest.approx(len(part) / rows))
    assert micro_batches(batch, 1, 1, 0) == [(batch, 1.0)]  # one process, one step: the batch unchanged
