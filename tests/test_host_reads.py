"""A training step reads nothing back to the host: the loop leaves each step's loss on the device, and the lab
reads the losses only when it logs. On a GPU every host read makes the CPU wait until the device has caught up,
so the next step's kernels cannot be queued while this one runs: a launch-bound step pays for each read.

Counted on a CPU by a ``TorchFunctionMode`` that sees every Python-level read of a tensor's value
(``item``, ``tolist``, ``float``, ``int``, ``bool``, ``cpu``, ``numpy``), wherever it is made, torch's own
Python code (clipping, the optimiser, the schedule) included.
"""
from __future__ import annotations

import traceback

import pandas as pd
import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

from peft_utils.config import TrainConfig
from peft_utils.core.batches import StepBatches, encode, make_loader
from peft_utils.core.loop import prepare_for_training, train_loop
from peft_utils.core.settings import AdapterSettings
from peft_utils.models import build_model
from peft_utils.train import train

READS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy"})


class HostReads(TorchFunctionMode):
    """Counts the reads of a tensor's value made while it is active (of ``dtype`` tensors only, if given):
    ``count`` those of our code and torch's, ``in_transformers`` those made inside transformers' own code."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.count, self.in_transformers, self.dtype = 0, 0, dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS and (self.dtype is None or args[0].dtype == self.dtype):
            if any("/transformers/" in frame.filename for frame in traceback.extract_stack()):
                self.in_transformers += 1
            else:
                self.count += 1
        return func(*args, **(kwargs or {}))


def _sentences(n: int) -> pd.DataFrame:
    words = ("great", "awful", "fine", "dull", "superb", "poor")
    return pd.DataFrame({"sentence": [f"the film was {words[i % 6]} and {words[(i * 5) % 6]}" for i in range(n)],
                         "label": [i % 2 for i in range(n)]})


def test_a_training_step_reads_nothing_back(tiny_gpt2_dir):
    """Every method's step (with two accumulated micro-batches and clipping) makes no host read; the loss it
    leaves on the device is read afterwards. transformers' eager forward reads the attention mask to choose
    its attention kernel (``masking_utils``: under ``torch.compile`` it does not): counted apart, not ours."""
    for method in ("full", "lora", "dora", "qlora"):
        model, tokenizer = build_model(method, tiny_gpt2_dir, AdapterSettings(rank=4, alpha=8, dropout=0.1))
        frame, pad = _sentences(24), model.config.pad_token_id
        rows = encode(frame["sentence"].tolist(), frame["label"].tolist(), tokenizer, 16)
        # The batches are made before counting: the data loader's shuffle reads its permutation on the host,
        # which is the data pipeline's business, not the step's.
        batches = list(StepBatches(make_loader(rows, 6, pad, shuffle=True, seed=0, padded=False), 1, 2, 0, pad))
        accelerator = Accelerator(cpu=True)
        model, optimizer, scheduler = prepare_for_training(model, accelerator, lr=1e-3, weight_decay=0.01,
                                                           warmup_ratio=0.25, total_steps=len(batches))
        events = train_loop(model, batches, None, optimizer, scheduler, accelerator, max_grad_norm=1.0)
        for _ in range(len(batches)):  # the epoch's steps, stopping before its closing evaluation
            with HostReads() as reads:
                metrics = next(events)
            assert reads.count == 0, f"{method}: step {metrics.step} made {reads.count} host reads"
            assert metrics.loss.dtype == torch.float64 and metrics.loss.numel() == 1
            assert 0.0 < metrics.loss.item() < 10.0
        events.close()


def test_the_lab_reads_losses_once_per_logged_window(tiny_gpt2_dir):
    """``train`` records every step's loss and logs each window's mean; it reads the step losses (the run's only
    float64 tensors) a window at a time: 12 steps logged every 4 read 3 times, not 12. Evaluation, between
    steps, makes reads of its own."""
    model, tokenizer = build_model("lora", tiny_gpt2_dir, AdapterSettings(rank=4, alpha=8, dropout=0.0))
    config = TrainConfig(epochs=1, batch_size=4, warmup_ratio=0.0, max_length=16, log_every=4, device="cpu")
    with HostReads(torch.float64) as reads:
        result = train(model, tokenizer, _sentences(48), _sentences(8), config, lr=1e-3, seed=0)
    assert reads.count == 3
    assert len(result.losses) == 12 and all(isinstance(loss, float) for loss in result.losses)
