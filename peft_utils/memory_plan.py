"""Will this method fit the GPU? Peak training memory estimated before the model is loaded (a run that dies of
out-of-memory after an hour wastes it), and a plan that makes it fit. The estimate is a pure function of the model
config, the method and the batch shape (parameters counted on a weightless copy with the real adapters injected),
so it is tested on a CPU with a stated device size and against measured CPU peaks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .compilation import repeated_blocks
from .config import TrainConfig
from .core.settings import AdapterSettings
from .devices import accelerator_dtype, checked_dtype, per_device_batch_size
from .formatting import format_bytes
from .methods import Method, get_method

SAFETY = 0.9  # of the free memory: the rest for allocator fragmentation and what the estimate leaves out
# Activation functions that transformers writes as a chain of Python ops (each keeps its own tensor for backward),
# against the native ones (one saved input). GPT-2's default "gelu_new" is 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))).
PYTHON_GELUS = ("gelu_new", "gelu_fast", "quick_gelu")
ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")
HIDDEN_DROPOUT_KEYS = ("resid_pdrop", "hidden_dropout_prob", "hidden_dropout")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's peak, by kind: ``total = weights + optimizer_state + step_peak``, where
    ``step_peak`` (``bench.step_time``'s "step alloc") is less than the sum of the gradients', activations' and
    workspace's own maxima: backward frees activations while it makes gradients."""

    method: str
    parameters: int
    trainable_parameters: int
    weights: int
    optimizer_state: int
    gradients: int
    activations: int
    workspace: int
    step_peak: int
    total: int


@dataclass(frozen=True)
class MemoryPlan:
    """How to run ``method`` on a device: micro-batch, accumulation, checkpointing, and why (``reason``, one line
    for the log and the record). ``per_device_batch * grad_accum_steps * num_processes`` is always the global
    batch; ``fits=False``: nothing tried fits."""

    per_device_batch: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    device_bytes: int
    budget_bytes: int
    fits: bool
    reason: str


@dataclass(frozen=True)
class _Model:
    """What the estimate needs from a model, read from its weightless copy."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    python_gelu: bool
    gated_mlp: bool
    attention_dropout: float
    hidden_dropout: float
    parameters: int
    trainable: int
    weight_bytes: int
    block_trainable: int  # trainable parameters of one transformer block
    outer_trainable: int  # trainable parameters outside the blocks and the embeddings (final norm, head)
    block_linear_weights: int  # weight elements of one block's linear layers (autocast copies them in half)
    largest_quantized: int  # elements of the largest 4-bit weight (dequantised for each matmul)
    adapter_in: int  # per block: input features summed over the adapted layers
    adapter_out: int  # per block: output features summed over the adapted layers


def _config_value(model_config, keys: tuple[str, ...]) -> float:
    return next((float(getattr(model_config, k)) for k in keys if getattr(model_config, k, None) is not None), 0.0)


_READ_CACHE: dict[tuple, _Model] = {}


def _read_model(model_config, method: str, compute_dtype: torch.dtype, rank: int, targets) -> _Model:
    """Build ``method``'s model on the meta device (exact counts, no memory) and read its shape and bytes; cached
    on the config's JSON (GPT-2 Large takes ~0.3 s, and a plan asks many times)."""
    key = (type(model_config), model_config.to_json_string(use_diff=False), method, compute_dtype, rank,
           targets if targets is None or isinstance(targets, str) else tuple(targets))
    if key in _READ_CACHE:
        return _READ_CACHE[key]
    from .core.layers import LoRALayer, base_features, is_supported_base
    from .core.quant import SKIP_MODULES, quantizable_layers
    from .core.targets import head_modules, meta_skeleton

    kind = get_method(method)
    model = meta_skeleton(model_config)
    skip = list(dict.fromkeys(SKIP_MODULES + head_modules(model_config.model_type)))  # as core.quant.load_4bit
    quantized = ([model.get_submodule(n).weight for n in quantizable_layers(model_config, skip)]
                 if kind.quantized else [])
    weight_bytes = _stored_base_bytes(model, kind, compute_dtype, quantized)
    parameters = sum(p.numel() for p in model.parameters())  # the base's: before any adapter
    blocks = repeated_blocks(model)
    block_linear_weights = sum(m.weight.numel() for m in blocks[0].modules() if is_supported_base(m))
    weight_bytes += _make_trainable(model, kind, rank, targets)
    adapted = [base_features(m.base) for m in blocks[0].modules() if isinstance(m, LoRALayer)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    block_trainable = sum(p.numel() for p in blocks[0].parameters() if p.requires_grad)
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding)
                    for p in m.parameters() if p.requires_grad)
    hidden = model_config.hidden_size
    activation = getattr(model_config, "activation_function", None) or getattr(model_config, "hidden_act", "")
    _READ_CACHE[key] = _Model(
        layers=len(blocks),
        hidden=hidden,
        intermediate=(getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None)
                      or 4 * hidden),
        heads=model_config.num_attention_heads,
        kv_heads=getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads,
        python_gelu=activation in PYTHON_GELUS,
        gated_mlp=any(n.endswith("gate_proj") for n, _ in blocks[0].named_modules()),
        attention_dropout=_config_value(model_config, ATTENTION_DROPOUT_KEYS),
        hidden_dropout=_config_value(model_config, HIDDEN_DROPOUT_KEYS),
        parameters=parameters,
        trainable=trainable,
        block_trainable=block_trainable,
        outer_trainable=trainable - len(blocks) * block_trainable - embedding,
        weight_bytes=weight_bytes,
        block_linear_weights=block_linear_weights,
        largest_quantized=max((weight.numel() for weight in quantized), default=0),
        adapter_in=sum(features[0] for features in adapted),
        adapter_out=sum(features[1] for features in adapted),
    )
    return _READ_CACHE[key]


def _stored_base_bytes(model: nn.Module, kind: Method, compute_dtype: torch.dtype,
                       quantized: list[torch.Tensor]) -> int:
    """Bytes of the frozen base as ``kind`` stores it (models.build_model): float32 master weights for full
    fine-tuning, the compute dtype for LoRA / DoRA, float32 around the ``quantized`` NF4 weights for 4-bit."""
    floating_bytes = 4 if kind.adapter is None or kind.quantized else compute_dtype.itemsize
    quantized_ids = {id(weight) for weight in quantized}
    n_bytes = sum(t.numel() * (floating_bytes if t.is_floating_point() else t.element_size())
                  for t in [*model.parameters(), *model.buffers()] if id(t) not in quantized_ids)
    if quantized:
        from .sizes import nf4_bits_per_weight

        n_bytes += math.ceil(sum(weight.numel() for weight in quantized) * nf4_bits_per_weight() / 8)
    return n_bytes


def _make_trainable(model: nn.Module, kind: Method, rank: int, targets) -> int:
    """Make ``model`` train what ``kind`` trains; returns the bytes its adapters add (float32 in every method)."""
    if kind.adapter is None:
        model.requires_grad_(True)
        return 0
    from .core.inject import apply_adapters

    base_ids = {id(t) for t in [*model.parameters(), *model.buffers()]}
    apply_adapters(model, kind.adapter, targets=targets, rank=rank)
    return sum(4 * t.numel() for t in [*model.parameters(), *model.buffers()] if id(t) not in base_ids)


def estimate_memory(model_config, method: str, per_device_batch: int, max_length: int,
                    compute_dtype: torch.dtype = torch.bfloat16, gradient_checkpointing: bool = False, *,
                    rank: int = 8, targets=None, device_type: str = "cuda") -> MemoryEstimate:
    """Peak bytes of one training step of ``method`` at ``per_device_batch`` rows of ``max_length`` tokens, counted
    as this package trains; the derivation, and what it leaves out, is in docs/hardware.md ("How the memory
    estimate counts")."""
    model = _read_model(model_config, method, checked_dtype(compute_dtype), rank, targets)
    kind = get_method(method)
    tokens = per_device_batch * max_length
    h, inner = model.hidden, model.intermediate
    half = compute_dtype != torch.float32
    c = compute_dtype.itemsize
    r = c if kind.adapter is not None and not kind.quantized else 4

    kv = h * model.kv_heads // model.heads
    per_token = 2 * r * h + c * (4 * h + 2 * kv + h)  # norm inputs; attn/MLP inputs, q, k, v, output, merged copy
    if model.gated_mlp:
        per_token += 4 * c * inner
    else:
        per_token += 2 * c * inner + ((2 * (4 if half else c) + c) * inner if model.python_gelu else 0)
    if model.hidden_dropout > 0:
        per_token += 2 * h
    if kind.adapter is not None:
        per_token += rank * 4 + (c * model.adapter_in if half else 0)
        if kind.adapter == "dora":
            per_token += c * model.adapter_out
    block = tokens * per_token
    if device_type == "cpu" and model.attention_dropout > 0:
        block += 3 * 4 * per_device_batch * model.heads * max_length**2
    if kind.adapter is None and half:
        block += c * model.block_linear_weights
    outer = tokens * h * (r + r + c)
    kept = tokens * r * h if gradient_checkpointing else block

    layers, block_grads, gradients = model.layers, 4 * model.block_trainable, 4 * model.trainable
    workspace = 2 * tokens * inner * c + c * model.largest_quantized
    recomputed = block if gradient_checkpointing else 0
    backward = (max(layers * kept + block_grads, kept + layers * block_grads) + recomputed + outer
                + 4 * model.outer_trainable + workspace)
    step_peak, optimizer_state = max(backward, gradients), 8 * model.trainable
    return MemoryEstimate(method=method, parameters=model.parameters, trainable_parameters=model.trainable,
                          weights=model.weight_bytes, optimizer_state=optimizer_state, gradients=gradients,
                          activations=layers * kept + recomputed + outer, workspace=workspace, step_peak=step_peak,
                          total=model.weight_bytes + optimizer_state + step_peak)


def _gib(n_bytes: int) -> str:
    return format_bytes(n_bytes, binary=True, decimals=1)


def plan_memory(model_config, method: str, train: TrainConfig, adapter: AdapterSettings = AdapterSettings(), *,
                compute_dtype: torch.dtype, device_bytes: int, num_processes: int = 1,
                name: str | None = None) -> MemoryPlan:
    """The cheapest way to train ``method`` with ``train`` and ``adapter`` within ``SAFETY x device_bytes`` (the
    free memory). Tried in order: the configured micro-batch; the same with gradient checkpointing (one block's
    activations instead of all, for ~30% more compute); then every smaller divisor of the device's share of the
    global batch, with more accumulation steps: the global batch is always reproduced exactly."""
    start = per_device_batch_size(train.batch_size, num_processes, train.grad_accum_steps)
    share, budget = train.batch_size // num_processes, int(SAFETY * device_bytes)
    configured = train.gradient_checkpointing
    label = f"{name or getattr(model_config, 'name_or_path', '') or model_config.model_type} {method}"
    limit = f"{_gib(budget)} usable ({SAFETY:.0%} of {_gib(device_bytes)})"
    candidates = [(start, configured), *([] if configured else [(start, True)]),
                  *((b, True) for b in range(start - 1, 0, -1) if share % b == 0)]

    def estimate(batch: int, checkpointing: bool) -> MemoryEstimate:
        return estimate_memory(model_config, method, batch, train.max_length, compute_dtype, checkpointing,
                               rank=adapter.rank, targets=adapter.targets)

    first = estimate(*candidates[0])
    for batch, checkpointing in candidates:
        chosen = estimate(batch, checkpointing)
        if chosen.total <= budget:
            steps = share // batch
            batches = f"{steps} accumulation steps of {batch} rows" if steps > 1 else f"{batch} rows, no accumulation"
            changes = "gradient checkpointing on, " if checkpointing and not configured else ""
            reason = (f"{label}: {_gib(chosen.total)} estimated <= {limit}; {batches}, as configured"
                      if (batch, checkpointing) == candidates[0] else
                      f"{label}: {_gib(first.total)} estimated > {limit}; {changes}{batches} -> {_gib(chosen.total)}")
            return MemoryPlan(batch, steps, checkpointing, chosen, device_bytes, budget, True, reason)
    smallest = estimate(*candidates[-1])  # the least memory any plan needs
    reason = (f"{label} does not fit: {_gib(smallest.total)} estimated even at 1 row with gradient checkpointing "
              f"> {limit} (weights {_gib(smallest.weights)} + optimizer state {_gib(smallest.optimizer_state)} "
              f"+ gradients {_gib(smallest.gradients)}); use a GPU with more memory or a 4-bit method (qlora)")
    return MemoryPlan(1, share, True, smallest, device_bytes, budget, False, reason)


def to_record(plan: MemoryPlan) -> dict:
    """The plan as flat JSON-safe fields for a run's ``config`` record (bytes as integers)."""
    return {"memory_plan": plan.reason, "memory_fits": plan.fits, "memory_device_bytes": plan.device_bytes,
            "memory_budget_bytes": plan.budget_bytes, "memory_estimate_bytes": plan.estimate.total,
            "planned_per_device_batch": plan.per_device_batch, "planned_grad_accum_steps": plan.grad_accum_steps,
            "planned_gradient_checkpointing": plan.gradient_checkpointing,
            **{f"memory_{key}_bytes": getattr(plan.estimate, key)
               for key in ("weights", "optimizer_state", "gradients", "activations", "workspace", "step_peak")}}


def plan_for_device(model_source: str, method: str, train: TrainConfig, adapter: AdapterSettings, accelerator,
                    name: str | None = None) -> MemoryPlan | None:
    """The plan for one run on the accelerator's device, before its model is loaded: ``None`` off CUDA (a CPU run
    keeps its configuration's results); a ValueError when nothing fits. With ``train.workers`` runs at once, a run
    plans for its share of the device, however much the others have taken yet."""
    if accelerator.device.type != "cuda":
        return None
    from transformers import AutoConfig

    free, total = torch.cuda.mem_get_info(accelerator.device)
    plan = plan_memory(AutoConfig.from_pretrained(model_source, num_labels=2), method, train, adapter,
                       compute_dtype=accelerator_dtype(accelerator), device_bytes=int(min(free, total / train.workers)),
                       num_processes=accelerator.num_processes, name=name)
    if not plan.fits:
        raise ValueError(plan.reason)
    return plan


def with_micro_batch_at_most(plan: MemoryPlan, per_device_batch: int) -> MemoryPlan:
    """``plan`` after an out-of-memory error: a micro-batch of at most ``per_device_batch`` rows that divides the
    device's share (the global batch unchanged); the plan itself on the first attempt."""
    if per_device_batch >= plan.per_device_batch:
        return plan
    share = plan.per_device_batch * plan.grad_accum_steps
    batch = max(b for b in range(1, per_device_batch + 1) if share % b == 0)
    return replace(plan, per_device_batch=batch, grad_accum_steps=share // batch,
                   reason=f"{plan.reason}; out of memory at {plan.per_device_batch} rows: retried with {batch}")
