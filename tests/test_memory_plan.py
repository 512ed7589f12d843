"""The GPU memory planner: exact parameter counts, the planner's choices, and the estimate against measured peaks.

Every model here is weightless (meta device) except the tiny ones whose training step is measured on the CPU.
"""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig

from peft_utils.config import TrainConfig
from peft_utils.core.settings import AdapterSettings
from peft_utils.memory_plan import (
    estimate_memory,
    plan_for_device,
    plan_memory,
    to_record,
    with_micro_batch_at_most,
)
from peft_utils.models import gpt2_config

GIB = 2**30
GPT2_LARGE = GPT2Config(n_layer=36, n_embd=1280, n_head=20)
GPT2_LARGE_PARAMETERS = 774_030_080 + 2 * 1280  # the published gpt2-large count + the 2-label score head (no bias)
T4_FREE = 15 * GIB  # a 16 GB T4 shows ~15.1 GiB free once the CUDA context exists; 15 GiB keeps that honest
H100_FREE = 79 * GIB
BATCH, LENGTH = 16, 128


def gpt2_large_plan(method: str, device_bytes: int, dtype=torch.bfloat16, grad_accum_steps: int = 1, **kwargs):
    train = TrainConfig(batch_size=BATCH, max_length=LENGTH, grad_accum_steps=grad_accum_steps)
    return plan_memory(GPT2_LARGE, method, train, compute_dtype=dtype, device_bytes=device_bytes, name="gpt2-large",
                       **kwargs)


# --------------------------------------------------------------------------------------------- parameter counts

TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64),
    "bert": lambda: BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                               vocab_size=500, max_position_embeddings=64),
    "llama": lambda: LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=500, max_position_embeddings=64),
}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_parameter_count_equals_the_real_models(family):
    from transformers import AutoModelForSequenceClassification

    config = TINY_CONFIGS[family]()
    real = AutoModelForSequenceClassification.from_config(config)  # real (random) weights, on the CPU
    assert estimate_memory(config, "lora", 2, 16).parameters == sum(p.numel() for p in real.parameters())


def test_gpt2_large_count_and_full_fine_tuning_bytes():
    estimate = estimate_memory(GPT2_LARGE, "full", BATCH, LENGTH)
    assert estimate.parameters == estimate.trainable_parameters == GPT2_LARGE_PARAMETERS
    assert estimate.weights == 4 * GPT2_LARGE_PARAMETERS  # float32 master weights (no buffers in GPT-2)
    assert estimate.gradients == 4 * GPT2_LARGE_PARAMETERS
    assert estimate.optimizer_state == 8 * GPT2_LARGE_PARAMETERS  # two float32 AdamW moments
    assert estimate.total == estimate.weights + estimate.optimizer_state + estimate.step_peak


def test_adapter_methods_store_the_frozen_base_small():
    lora = estimate_memory(GPT2_LARGE, "lora", BATCH, LENGTH, torch.bfloat16)
    qlora = estimate_memory(GPT2_LARGE, "qlora", BATCH, LENGTH, torch.bfloat16)
    # c_attn (1280 -> 3840) in 36 blocks, rank 8, plus the score head: LoRA's trainable count by hand.
    assert lora.trainable_parameters == 36 * 8 * (1280 + 3840) + 2 * 1280
    assert lora.optimizer_state == 8 * lora.trainable_parameters
    assert 2 * GPT2_LARGE_PARAMETERS < lora.weights < 2 * GPT2_LARGE_PARAMETERS + 4 * 2 * lora.trainable_parameters
    linear = 36 * 12 * 1280**2  # the 4-bit share: every block's linear weights; the rest and the adapters float32
    adapters = qlora.trainable_parameters - 2 * 1280
    expected = linear * 4.127 / 8 + 4 * (GPT2_LARGE_PARAMETERS - linear + adapters)
    assert qlora.weights == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------------------------- the planner


def test_full_fine_tuning_of_gpt2_large_does_not_fit_a_t4_as_is_and_the_plan_keeps_the_global_batch():
    as_is = estimate_memory(GPT2_LARGE, "full", BATCH, LENGTH, torch.float16)
    assert as_is.total > 0.9 * T4_FREE
    plan = gpt2_large_plan("full", T4_FREE, torch.float16)
    assert plan.fits and plan.estimate.total <= plan.budget_bytes == int(0.9 * T4_FREE)
    assert plan.gradient_checkpointing
    assert plan.per_device_batch * plan.grad_accum_steps == BATCH
    assert plan.reason.startswith("gpt2-large full: ") and "gradient checkpointing on" in plan.reason


def test_two_processes_split_the_global_batch():
    needs = {b: estimate_memory(GPT2_LARGE, "lora", b, LENGTH, torch.bfloat16, True).total for b in (8, 4)}
    plan = gpt2_large_plan("lora", int((needs[8] + needs[4]) / 2 / 0.9), num_processes=2)
    assert (plan.per_device_batch, plan.grad_accum_steps, plan.fits) == (4, 2, True)  # 4 rows x 2 steps x 2 GPUs


def test_lora_of_gpt2_large_fits_a_t4_as_is():
    plan = gpt2_large_plan("lora", T4_FREE, torch.float16)
    assert plan.fits and not plan.gradient_checkpointing
    assert (plan.per_device_batch, plan.grad_accum_steps) == (BATCH, 1)
    assert "as configured" in plan.reason


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora", "qdora"])
def test_an_h100_fits_every_method_as_is(method):
    plan = gpt2_large_plan(method, H100_FREE)
    assert plan.fits and not plan.gradient_checkpointing and plan.per_device_batch == BATCH


def test_a_device_too_small_for_the_weights_does_not_fit_and_says_why():
    plan = gpt2_large_plan("full", 8 * GIB)
    assert not plan.fits
    assert plan.reason.startswith("gpt2-large full does not fit") and "qlora" in plan.reason
    assert plan.estimate.weights + plan.estimate.optimizer_state > plan.budget_bytes


def test_accumulation_uses_divisors_of_the_batch():
    needs = {b: estimate_memory(GPT2_LARGE, "lora", b, LENGTH, torch.bfloat16, True).total for b in (12, 6, 4)}
    plan = plan_memory(GPT2_LARGE, "lora", TrainConfig(batch_size=12, max_length=LENGTH),
                       compute_dtype=torch.bfloat16, device_bytes=int((needs[6] + needs[4]) / 2 / 0.9))
    assert (plan.per_device_batch, plan.grad_accum_steps, plan.fits) == (4, 3, True)


def test_bad_settings_fail_with_one_line():
    with pytest.raises(ValueError, match=r"does not divide into 3 process\(es\) x 1"):
        gpt2_large_plan("lora", T4_FREE, num_processes=3)
    with pytest.raises(ValueError, match="unknown method"):
        gpt2_large_plan("lorra", T4_FREE)
    with pytest.raises(ValueError, match=r"does not divide into 1 process\(es\) x 5"):
        gpt2_large_plan("lora", T4_FREE, grad_accum_steps=5)
    with pytest.raises(ValueError, match="compute_dtype"):
        estimate_memory(GPT2_LARGE, "lora", 1, 8, torch.int8)


def test_to_record_is_flat_and_json_safe():
    import json

    plan = gpt2_large_plan("full", T4_FREE, torch.float16)
    record = to_record(plan)
    assert json.loads(json.dumps(record)) == record
    assert record["memory_estimate_bytes"] == plan.estimate.total and record["memory_plan"] == plan.reason
    assert record["planned_grad_accum_steps"] * record["planned_per_device_batch"] == BATCH


# --------------------------------------------------------------------------------------------- monotonicity


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora"])
def test_checkpointing_and_smaller_batches_need_less(method):
    def estimate(batch, checkpointing):
        return estimate_memory(GPT2_LARGE, method, batch, LENGTH, torch.bfloat16, checkpointing)

    assert estimate(16, True).activations < estimate(16, False).activations
    assert estimate(16, True).total < estimate(16, False).total
    for checkpointing in (False, True):
        assert estimate(8, checkpointing).total < estimate(16, checkpointing).total
    dora, lora = estimate_memory(GPT2_LARGE, "dora", 16, LENGTH), estimate_memory(GPT2_LARGE, "lora", 16, LENGTH)
    assert dora.activations > lora.activations  # DoRA keeps (W0 + s·BA)x of every adapted layer


# --------------------------------------------------------------------------------------------- against measurement

# Measured as bench.step_time measures a peak (resident model + optimizer tensors + the CPU allocator's peak during
# one step), with the training loop's optimizer (train.make_optimizer: fused AdamW) after one warm-up step.
# A small vocabulary, so that activations and gradients are a real share of the peak and not the embedding table.
MEASURED_SHAPE = dict(vocab_size=2000, n_positions=128)
TOLERANCE = 0.05


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_the_measured_cpu_peak(method, checkpointing):
    from bench.step_time import Runner, Spec, measure_memory
    from peft_utils.core.inject import apply_adapters
    from peft_utils.core.loop import enable_gradient_checkpointing
    from peft_utils.models import random_gpt2
    from peft_utils.core.loop import make_optimizer

    torch.manual_seed(0)
    model = random_gpt2("tiny", **MEASURED_SHAPE)
    if method == "full":
        model.requires_grad_(True)
    else:
        apply_adapters(model, method, targets="all-linear", rank=8)
    if checkpointing:
        enable_gradient_checkpointing(model)
    spec = Spec("tiny", batch=4, seq=64)
    runner = Runner(method, model, spec)
    runner.optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.01)
    runner.step()  # AdamW's moments exist from the first step on
    measured, _ = measure_memory(runner)
    estimate = estimate_memory(gpt2_config("tiny", **MEASURED_SHAPE), method, spec.batch, spec.seq, torch.float32,
                               checkpointing, targets="all-linear", device_type="cpu")
    print(f"{method} checkpointing={checkpointing}: estimated {estimate.total:,} B, measured {measured:,} B, "
          f"{estimate.total / measured - 1:+.2%}")
    assert estimate.total == pytest.approx(measured, rel=TOLERANCE), (estimate, measured)


@pytest.mark.parametrize("after_oom,expected", [(8, (8, 2)), (5, (4, 4)), (3, (2, 8)), (1, (1, 16))])
def test_an_out_of_memory_retry_keeps_the_global_batch(after_oom, expected):
    """``find_executable_batch_size`` halves the micro-batch after an OOM; ``with_micro_batch_at_most`` turns that into the
    largest micro-batch that divides the device's share, so the global batch (16 here) never changes."""
    plan = with_micro_batch_at_most(gpt2_large_plan("lora", H100_FREE), after_oom)
    assert (plan.per_device_batch, plan.grad_accum_steps) == expected
    assert plan.per_device_batch * plan.grad_accum_steps == BATCH
    assert f"retried with {expected[0]}" in plan.reason
    first = gpt2_large_plan("lora", H100_FREE)
    assert with_micro_batch_at_most(first, first.per_device_batch) == first  # the first attempt records no retry


def test_no_plan_off_cuda():
    """A CPU run is never re-planned: its results stay those of its configuration (and bit-identical)."""
    from peft_utils.devices import make_accelerator

    cpu = make_accelerator("cpu")
    assert plan_for_device("unused", "full", TrainConfig(), AdapterSettings(), cpu) is None
