"""Compilation (``peft_utils.compilation``): our adapter layers compile without a graph break, compiled blocks train
as eager ones do for every method, and the padded batch widths that keep recompiles bounded.

CI compiles with the ``aot_eager`` backend: dynamo's tracing and AOT autograd's forward/backward graphs, run by
eager kernels. Inductor's code generation on a CPU took 90-290 s for a tiny GPT-2, too slow for a test; the graphs
it would be given are the ones checked here.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from transformers import BertConfig, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

from peft_utils.compilation import compile_blocks, repeated_blocks, use_compile
from peft_utils.config import TrainConfig, make_config
from peft_utils.core.batches import StepBatches, collate, encode, make_loader
from peft_utils.core.layers import DoRALayer, LoRALayer
from peft_utils.core.loop import StepMetrics, prepare_for_training, set_seed, train_loop
from peft_utils.core.settings import AdapterSettings
from peft_utils.devices import make_accelerator
from peft_utils.models import build_model, random_gpt2
from peft_utils.store import RunRecorder, read_events

WORDS = ("great", "good", "superb", "bad", "awful", "dreadful")
PAD = 99


def test_use_compile_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile("auto", cuda) and not use_compile("auto", cpu)
    assert use_compile("on", cpu) and use_compile("on", cuda)
    assert not use_compile("off", cpu) and not use_compile("off", cuda)
    with pytest.raises(ValueError, match=r"compile must be one of \('auto', 'on', 'off'\), got 'yes'"):
        make_config("smoke", compile="yes")  # refused by the configuration, before anything loads


def test_the_repeated_blocks_are_found_and_compiled_in_place():
    """GPT-2's ``transformer.h`` and BERT's ``encoder.layer``, found by shape alone; parameter names unchanged, and
    one graph for all the blocks (the KV cache, which would give each layer its own, is off)."""
    gpt2 = random_gpt2(n_layer=3)
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=32))
    assert repeated_blocks(gpt2) is gpt2.transformer.h and repeated_blocks(bert) is bert.bert.encoder.layer
    names = list(gpt2.state_dict())
    assert compile_blocks(gpt2, backend="aot_eager") is gpt2
    assert list(gpt2.state_dict()) == names
    counters.clear()
    gpt2(input_ids=torch.tensor([[1, 2, 3]]))
    assert counters["stats"]["unique_graphs"] == 1
    with pytest.raises(ValueError, match="no list of repeated blocks"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2)))


def _rows(lengths: list[int]) -> list[dict]:
    return [{"input_ids": list(range(1, 1 + n)), "label": n % 2} for n in lengths]


def test_padded_widths_are_multiples_and_the_mask_covers_only_real_tokens():
    rows = _rows([3, 17, 5])
    plain, padded = collate(rows, PAD), collate(rows, PAD, pad_to_multiple=16)
    assert plain["input_ids"].shape == (3, 17) and padded["input_ids"].shape == (3, 32)
    assert padded["attention_mask"].sum(dim=1).tolist() == [3, 17, 5]
    assert torch.equal(padded["input_ids"][:, :17], plain["input_ids"]) and (padded["input_ids"][:, 17:] == PAD).all()
    assert torch.equal(padded["labels"], plain["labels"])
    assert collate(_rows([16]), PAD, pad_to_multiple=16)["input_ids"].shape == (1, 16)  # a multiple stays


def test_the_default_batches_are_unchanged_and_step_batches_pad_too():
    """``pad_to_multiple=None`` (the default) pads to each batch's longest row, as before; ``StepBatches`` and
    ``make_loader`` pass the multiple on to every micro-batch and batch."""
    rows = _rows([1 + i % 13 for i in range(20)])
    default = list(make_loader(rows, 4, PAD, shuffle=True, seed=0))
    assert [b["input_ids"].shape[1] for b in default] == [int(b["attention_mask"].sum(1).max()) for b in default]
    padded = list(make_loader(rows, 4, PAD, shuffle=True, seed=0, pad_to_multiple=8))
    for plain, wide in zip(default, padded, strict=True):
        width = plain["input_ids"].shape[1]
        assert wide["input_ids"].shape[1] % 8 == 0 and torch.equal(wide["input_ids"][:, :width], plain["input_ids"])
    steps = StepBatches(make_loader(rows, 4, PAD, shuffle=True, seed=0, padded=False), 1, 2, 0, PAD, 8)
    widths = {micro["input_ids"].shape[1] for step in steps for micro, _ in step.micro_batches}
    assert widths <= {8, 16}


@pytest.mark.parametrize("layer_class", [LoRALayer, DoRALayer])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("base", [lambda: nn.Linear(16, 8), lambda: Conv1D(8, 16)], ids=["linear", "conv1d"])
def test_adapter_layers_compile_without_graph_breaks(layer_class, dropout, base):
    layer = layer_class(base(), rank=4, alpha=8, dropout=dropout).train()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 5, 16))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sentences of 4 to 7 tokens labelled by their last word; the evaluation's first 6 rows have 4 tokens, the
    next 6 have 5: padded widths 4 and 8, two shapes to compile."""
    rows = [(" ".join(["the film was"] + ["very"] * (i % 4) + [word]), int(j < 3))
            for i in range(4) for j, word in enumerate(WORDS)]
    return pd.DataFrame(rows, columns=["sentence", "label"]), pd.DataFrame(rows[:12], columns=["sentence", "label"])


def _losses(model_dir, method: str, backend: str | None, steps: int = 20, lr: float = 1e-2) -> list[float]:
    """``steps`` optimiser steps of ``method`` (batches of 6, widths padded to multiples of 4), eager or with the
    blocks compiled by ``backend``; the model's and adapters' dropout stay on. Every step's loss, then each epoch's
    evaluation loss (the eval-mode graphs)."""
    set_seed(0)
    model, tokenizer = build_model(method, model_dir, AdapterSettings(rank=4, alpha=8, dropout=0.1))
    if backend:
        compile_blocks(model, backend=backend)
    train, evaluation = (encode(f["sentence"].tolist(), f["label"].tolist(), tokenizer, 32) for f in _frames())
    pad = tokenizer.pad_token_id
    batches = StepBatches(make_loader(train, 6, pad, shuffle=True, seed=0, padded=False), 1, 1, 0, pad, 4)
    eval_loader = make_loader(evaluation, 6, pad, shuffle=False, seed=0, pad_to_multiple=4)
    accelerator = make_accelerator("cpu", "fp32")
    model, optimizer, scheduler = prepare_for_training(model, accelerator, lr=lr, weight_decay=0.0,
                                                       warmup_ratio=0.0, total_steps=steps)
    epochs = steps // len(batches)
    metrics = train_loop(model, batches, eval_loader, optimizer, scheduler, accelerator, epochs=epochs)
    return [float(m.loss) if isinstance(m, StepMetrics) else m.evaluation.loss for m in metrics]


@pytest.mark.parametrize("method,lr", [("full", 1e-3), ("lora", 1e-2), ("dora", 1e-2), ("qlora", 1e-2),
                                       ("qdora", 1e-2)])
def test_compiled_blocks_train_as_eager_ones(tiny_gpt2_dir, method, lr):
    """20 steps, compiled against eager, in fp32: the same losses up to rounding (rtol 1e-4), dropout included.
    AOT autograd's backward rounds differently from eager's: every method's losses came out within 4e-7, but full
    fine-tuning at 1e-2 amplifies that to 4e-4 through Adam's first steps, hence its rate of 1e-3 (as in test_train).
    QLoRA / QDoRA are not held to zero graph breaks: bitsandbytes' 4-bit ops may break the graph (0.50 did not
    here), which costs speed, not correctness."""
    eager = _losses(tiny_gpt2_dir, method, None, lr=lr)
    counters.clear()
    compiled = _losses(tiny_gpt2_dir, method, "aot_eager", lr=lr)
    assert counters["stats"]["unique_graphs"] > 0  # the blocks did run compiled
    if method in ("full", "lora", "dora"):
        assert not counters["graph_break"]
    assert len(eager) == 20 + 5
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_train_compiles_when_asked_and_records_it(tiny_gpt2_dir, monkeypatch, tmp_path):
    """``compile="on"`` reaches the run: its blocks are compiled (here with ``aot_eager``, see the module's
    docstring), its widths padded, its record says ``compiled``; its losses are eager's within rounding."""
    import functools

    import peft_utils.train as train_module

    monkeypatch.setattr(train_module, "compile_blocks", functools.partial(compile_blocks, backend="aot_eager"))
    frame = pd.DataFrame({"sentence": [f"the film was {WORDS[i % 6]}" for i in range(24)],
                          "label": [int(i % 6 < 3) for i in range(24)]})
    losses = {}
    for setting in ("off", "on"):
        set_seed(0)
        model, tokenizer = build_model("lora", tiny_gpt2_dir, AdapterSettings(rank=4, alpha=8, dropout=0.0))
        for module in model.modules():  # GPT-2's own dropout masks depend on the padded width
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        config = TrainConfig(epochs=1, batch_size=8, warmup_ratio=0.0, max_length=16, log_every=1, device="cpu",
                             compile=setting)
        with RunRecorder(tmp_path, setting) as recorder:
            result = train_module.train(model, tokenizer, frame, frame, config, lr=1e-3, seed=0,
                                        recording=train_module.Recording(recorder=recorder))
        assert read_events(tmp_path / f"{setting}.jsonl")[0]["compiled"] is (setting == "on")
        losses[setting] = result.losses
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)

