"""Mixed precision on the CPU: every piece of the GPU's bf16 / fp16 path that can run without a GPU.

bf16 autocast runs on any CPU (emulated where the CPU lacks native bf16, so these runs are tiny). fp16 needs loss
scaling, which accelerate sets up on GPUs only; the logic around it that is ours — a skipped step leaves the
schedule where it was and is counted in the record — is exercised with torch's own CPU ``GradScaler`` and a real
overflow (a loss scale at float32's largest value).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from peft_utils.config import TrainConfig, make_config
from peft_utils.core.layers import DoRALayer, is_linear4bit
from peft_utils.core.loop import set_seed
from peft_utils.core.settings import AdapterSettings
from peft_utils.devices import compute_dtype_for, make_accelerator
from peft_utils.models import build_model
from peft_utils.store import RunRecorder, read_events
from peft_utils.train import Recording, train

from test_train import _config, _rule_frame

METHODS = ("full", "lora", "dora", "qlora", "qdora")


def _recorded_run(model_dir, method: str, config: TrainConfig, folder, lr: float, accelerator=None,
                  final_norm_gain: float = 1.0):
    """Train ``method`` as an experiment builds it for ``config``'s precision; the model, result and events."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bf16 on a CPU without native bf16 is emulated: warned
        dtype = compute_dtype_for("cpu", config.precision)
        set_seed(0)
        model, tokenizer = build_model(method, model_dir, AdapterSettings(rank=4, alpha=8), dtype)
        with torch.no_grad():
            model.transformer.ln_f.weight.mul_(final_norm_gain)
        with RunRecorder(folder, method) as recorder:
            result = train(model, tokenizer, _rule_frame(4), _rule_frame(1), config, lr=lr, seed=0,
                           recording=Recording(recorder, {"run_id": method}), accelerator=accelerator)
    return model, result, read_events(folder / f"{method}.jsonl")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_bf16_autocast(tiny_gpt2_dir, tmp_path, method):
    model, result, events = _recorded_run(tiny_gpt2_dir, method, _config(epochs=5, precision="bf16"), tmp_path,
                                          lr=1e-3 if method == "full" else 1e-2)
    losses = result.losses
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, f"{method}: the loss did not fall ({losses})"
    config = events[0]
    assert (config["precision"], config["compute_dtype"], config["mixed_precision"]) == ("bf16", "bfloat16", "bf16")
    assert events[-1]["skipped_steps"] == 0
    # The weights that train stay float32 (bf16 would lose updates of lr x 1e-3); only the compute is bf16.
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    if method in ("qlora", "qdora"):
        assert {m.compute_dtype for m in model.modules() if is_linear4bit(m)} == {torch.bfloat16}
    for layer in (m for m in model.modules() if isinstance(m, DoRALayer)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.weight_norm().dtype == torch.float32  # a sum of large and small terms


def test_an_overflowing_fp16_step_is_skipped_and_the_schedule_waits(tiny_gpt2_dir, tmp_path):
    accelerator = make_accelerator("cpu")
    # accelerate makes no loss scaler on a CPU: torch's own, at a scale that makes the first gradients overflow.
    # Large final hidden states (ln_f's gain x 1000) give the head gradients that overflow float32 at the largest
    # scale; the next scale, 2^-20 of it, fits. AdamW is fused here: it skips inside its kernel, unseen by
    # accelerate's step_was_skipped, so the loop must read the skip from the scale.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=torch.finfo(torch.float32).max, backoff_factor=2**-20)
    config = _config(epochs=3, max_grad_norm=None)
    _, result, events = _recorded_run(tiny_gpt2_dir, "lora", config, tmp_path, lr=1e-2, accelerator=accelerator,
                                      final_norm_gain=1000.0)
    steps = [e for e in events if e["event"] == "step"]
    skipped = events[-1]["skipped_steps"]
    rates = [e["lr"] for e in steps]
    assert len(steps) == 18 and skipped == 1
    assert rates[0] == rates[1]  # the first step overflowed and was skipped: the schedule held its rate...
    assert all(later < earlier for earlier, later in zip(rates[1:], rates[2:]))  # ... then decays every step
    assert all(math.isfinite(loss) for loss in result.losses)


def test_a_precision_the_device_cannot_run_is_refused_before_training():
    with pytest.raises(ValueError, match="precision must be one of"):
        make_config("smoke", precision="int8")
    with pytest.raises(ValueError, match="precision='fp16' needs a GPU"):
        compute_dtype_for("cpu", "fp16")
    assert compute_dtype_for("cpu", "auto") == torch.float32  # what reproduces the committed CPU records


def test_one_process_can_change_precision_between_runs():
    """A notebook kernel that reruns with another ``precision``: accelerate keeps one per process unless told."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert make_accelerator("cpu", "bf16").mixed_precision == "bf16"
    assert make_accelerator("cpu", "fp32").mixed_precision == "no"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the device moves between the GPU and the CPU")
def test_one_process_can_change_device_between_runs():
    """A GPU notebook kernel that reruns on the CPU, then on the GPU again: accelerate refuses the CPU after a GPU
    and would keep the CPU for the next GPU run, unless its state starts afresh."""
    assert make_accelerator("cuda", "fp32").device.type == "cuda"
    assert make_accelerator("cpu", "fp32").device.type == "cpu"
    assert make_accelerator("cuda", "fp32").device.type == "cuda"
