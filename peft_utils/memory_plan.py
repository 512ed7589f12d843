"""Will this method fit the GPU? Peak training memory estimated from a model config, and a plan that makes it fit.

Why: a run that dies of CUDA out-of-memory after loading a 3 GB model (or, worse, after an hour of training on a
long batch) wastes the user's time; the numbers that decide it are all known before the model is loaded. The
estimate is a pure function of the model config, the method and the batch shape, so it is unit-tested on a CPU with
a stated device size, and checked against the CPU allocator's measured peak on small models.

Where the bytes go in one training step (forward, backward, AdamW step), for the methods of ``methods.py``:

* resident: the weights (and buffers) and AdamW's two float32 moments per trainable parameter;
* on top of them, during the step (``step_peak``): the activations the forward pass keeps for backward, the
  float32 gradients of the trainable parameters, and short-lived workspace. Backward frees each layer's activations
  as it makes that layer's gradients, so they are never all alive together (see :func:`estimate_memory`).

Parameters are counted exactly, on a weightless (meta device) copy of the model with the real adapters injected.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .formatting import format_bytes
from .methods import Method, get_method

HALF_DTYPES = (torch.float16, torch.bfloat16)
OPTIMIZERS = ("fused", "for-loop")
# Activation functions that transformers writes as a chain of Python ops (each keeps its own tensor for backward),
# against the native ones (one saved input). GPT-2's default "gelu_new" is 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))).
PYTHON_GELUS = ("gelu_new", "gelu_fast", "quick_gelu")
ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")
HIDDEN_DROPOUT_KEYS = ("resid_pdrop", "hidden_dropout_prob", "hidden_dropout")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's peak, by kind. ``total = weights + optimizer_state + step_peak``.

    ``gradients``, ``activations`` and ``workspace`` are each the kind's own maximum; ``step_peak`` is what they
    reach *together*, which is less than their sum (backward frees activations while it makes gradients).
    ``step_peak`` is the quantity ``bench.step_time`` measures as "step alloc", ``total`` its "peak".
    """

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
    """How to run ``method`` on a device: micro-batch per device, accumulation, checkpointing, and why.

    The global batch never changes: ``per_device_batch * grad_accum_steps * num_processes == global_batch``.
    ``fits=False`` means nothing tried fits (the caller should stop before loading the model); ``reason`` is one line
    for the log and the run record.
    """

    per_device_batch: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    device_bytes: int
    budget_bytes: int
    fits: bool
    reason: str


# --------------------------------------------------------------------------------------------- the model's shape


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
    embedding_trainable: int
    block_linear_weights: int  # weight elements of one block's linear layers (autocast copies them in half)
    largest_trainable: int  # elements of the largest trainable tensor (the for-loop AdamW's temporaries)
    largest_quantized: int  # elements of the largest 4-bit weight (dequantised for each matmul)
    adapter_in: int  # per block: input features summed over the adapted layers
    adapter_out: int  # per block: output features summed over the adapted layers


def _config_value(model_config, keys: tuple[str, ...], default: float = 0.0) -> float:
    return next((float(getattr(model_config, k)) for k in keys if getattr(model_config, k, None) is not None),
                default)


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ``nn.ModuleList`` (GPT-2 ``h``, BERT ``layer``, Llama ``layers``)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks to estimate activations for")
    return max(lists, key=len)


def _quantized_names(model_config) -> set[str]:
    """The layers ``core.quant.load_4bit`` turns into 4-bit, by the same rule."""
    from .core.quant import SKIP_MODULES, quantizable_layers
    from .core.targets import default_keep_trainable

    skip = list(dict.fromkeys(SKIP_MODULES + default_keep_trainable(model_config.model_type)))
    return set(quantizable_layers(model_config, skip))


def _read_model(model_config, method: str, compute_dtype: torch.dtype, rank: int, targets) -> _Model:
    """Build ``method``'s model on the meta device (exact counts, no memory) and read its shape and bytes.

    Cached on the model config's JSON: reading GPT-2 Large takes ~0.3 s, and a plan or a sweep asks many times.
    """
    key = (type(model_config), model_config.to_json_string(use_diff=False), method, compute_dtype, rank,
           targets if targets is None or isinstance(targets, str) else tuple(targets))
    if key not in _READ_CACHE:
        _READ_CACHE[key] = _read_model_uncached(model_config, method, compute_dtype, rank, targets)
    return _READ_CACHE[key]


_READ_CACHE: dict[tuple, _Model] = {}


def _read_model_uncached(model_config, method: str, compute_dtype: torch.dtype, rank: int, targets) -> _Model:
    from .core.layers import LoRALayer, base_features, is_supported_base
    from .core.targets import meta_skeleton

    if compute_dtype not in (torch.float32, *HALF_DTYPES):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype!r}")
    kind = get_method(method)
    model = meta_skeleton(model_config)
    quantized = [model.get_submodule(n).weight for n in _quantized_names(model_config)] if kind.quantized else []
    weight_bytes = _stored_base_bytes(model, kind, compute_dtype, quantized)
    blocks = _blocks(model)
    block_linear_weights = sum(m.weight.numel() for m in blocks[0].modules() if is_supported_base(m))
    weight_bytes += _make_trainable(model, kind, rank, targets)
    adapted = [base_features(m.base) for m in blocks[0].modules() if isinstance(m, LoRALayer)]
    return _Model(
        **_architecture(model_config, blocks),
        **_parameter_counts(model, blocks),
        weight_bytes=weight_bytes,
        block_linear_weights=block_linear_weights,
        largest_quantized=max((weight.numel() for weight in quantized), default=0),
        adapter_in=sum(features[0] for features in adapted),
        adapter_out=sum(features[1] for features in adapted),
    )


def _stored_base_bytes(model: nn.Module, kind: Method, compute_dtype: torch.dtype,
                       quantized: list[torch.Tensor]) -> int:
    """Bytes of the frozen base as ``kind`` stores it, before any adapter is injected.

    Full fine-tuning trains float32 master weights; LoRA / DoRA keep the frozen base in the compute dtype
    (models.build_model); the 4-bit methods keep every un-quantised tensor in float32 (core.quant.load_4bit /
    prepare_for_kbit_training) and the ``quantized`` weights at the NF4 cost.
    """
    floating_bytes = 4 if kind.adapter is None or kind.quantized else compute_dtype.itemsize
    quantized_ids = {id(weight) for weight in quantized}
    n_bytes = sum(_base_tensor_bytes(t, floating_bytes) for t in [*model.parameters(), *model.buffers()]
                  if id(t) not in quantized_ids)
    if quantized:
        from .sizes import nf4_bits_per_weight

        n_bytes += math.ceil(sum(weight.numel() for weight in quantized) * nf4_bits_per_weight() / 8)
    return n_bytes


def _make_trainable(model: nn.Module, kind: Method, rank: int, targets) -> int:
    """Make ``model`` train what ``kind`` trains: inject its adapters, or unfreeze everything for full fine-tuning.

    Returns the bytes the adapters add: their tensors (and DoRA's norm buffers) are float32 in every method
    (models.build_model).
    """
    if kind.adapter is None:
        model.requires_grad_(True)
        return 0
    from .core.inject import apply_adapters

    base_ids = {id(t) for t in [*model.parameters(), *model.buffers()]}
    apply_adapters(model, kind.adapter, targets=targets, rank=rank)
    return sum(4 * t.numel() for t in [*model.parameters(), *model.buffers()] if id(t) not in base_ids)


def _architecture(model_config, blocks: nn.ModuleList) -> dict[str, int | float | bool]:
    """The :class:`_Model` fields that describe the architecture: sizes, activation, dropout."""
    hidden = model_config.hidden_size
    activation = getattr(model_config, "activation_function", None) or getattr(model_config, "hidden_act", "")
    return {
        "layers": len(blocks),
        "hidden": hidden,
        "intermediate": (getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None)
                         or 4 * hidden),
        "heads": model_config.num_attention_heads,
        "kv_heads": getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads,
        "python_gelu": activation in PYTHON_GELUS,
        "gated_mlp": any(n.endswith("gate_proj") for n, _ in blocks[0].named_modules()),
        "attention_dropout": _config_value(model_config, ATTENTION_DROPOUT_KEYS),
        "hidden_dropout": _config_value(model_config, HIDDEN_DROPOUT_KEYS),
    }


def _parameter_counts(model: nn.Module, blocks: nn.ModuleList) -> dict[str, int]:
    """The :class:`_Model` fields that count parameters: the base model's, and where the trainable ones are (the
    estimate gives each trainable parameter a gradient and optimiser state)."""
    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    embedding = sum(trainable(m) for m in model.modules() if isinstance(m, nn.Embedding))
    total_trainable = trainable(model)
    return {
        "parameters": sum(p.numel() for n, p in model.named_parameters() if not _is_adapter_name(n)),
        "trainable": total_trainable,
        "block_trainable": trainable(blocks[0]),
        "outer_trainable": total_trainable - len(blocks) * trainable(blocks[0]) - embedding,
        "embedding_trainable": embedding,
        "largest_trainable": max((p.numel() for p in model.parameters() if p.requires_grad), default=0),
    }


def _is_adapter_name(name: str) -> bool:
    return any(part in ("lora_A", "lora_B", "magnitude") for part in name.split("."))


def _base_tensor_bytes(tensor: torch.Tensor, floating_bytes: int) -> int:
    return tensor.numel() * (floating_bytes if tensor.is_floating_point() else tensor.element_size())


def parameter_count(model_config) -> int:
    """Parameters of the model ``model_config`` describes (sequence-classification head included), exactly."""
    return _read_model(model_config, "full", torch.float32, rank=8, targets=None).parameters


# --------------------------------------------------------------------------------------------- the estimate


def estimate_memory(
    model_config,
    method: str,
    per_device_batch: int,
    max_length: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = False,
    *,
    rank: int = 8,
    targets=None,
    device_type: str = "cuda",
    optimizer: str = "fused",
) -> MemoryEstimate:
    """Peak bytes of one training step of ``method`` at ``per_device_batch`` rows of ``max_length`` tokens.

    Assumptions (each is how this package trains; the tests check the sum against measured CPU peaks):

    * Weights: ``full`` keeps float32 master weights (autocast computes in ``compute_dtype``); ``lora``/``dora``
      keep the frozen base in ``compute_dtype``; ``qlora``/``qdora`` keep linear weights in NF4 with double
      quantisation (``sizes.nf4_bits_per_weight``: ~4.13 bits) and every other tensor in float32. Adapters and
      the classification head are float32. Trainable tensors have a float32 gradient and two float32 AdamW moments.
    * Activations per block and token, with ``c`` = bytes of ``compute_dtype`` and ``r`` = bytes of the residual
      stream (float32 for ``full`` and the 4-bit methods, whose embeddings are float32; ``c`` for ``lora``/``dora``):
      two norm inputs (2r·h); the matmul inputs of attention and MLP, q, k, v, the attention output and its
      merged-heads copy (≈ 7c·h, less for grouped k/v); the MLP's up-projection output and activation output
      (2c·I), plus, for the Python-written GELU of GPT-2, three more I-sized tensors (tanh, 1 + tanh, x/2; the first
      two float32 under half autocast, where ``pow`` runs in float32); a gated MLP keeps four I-sized tensors; one byte per
      element for each of two dropout masks when hidden dropout is on. Attention is the fused SDPA kernel (no
      s×s scores kept) except on a CPU with attention dropout, where torch's math path keeps three float32 s×s
      tensors per head. This is Korthikanti et al.'s ``s·b·h·(34 + 5·a·s/h)`` count (Reducing Activation
      Recomputation, 2022), made dtype-aware and without the scores the fused kernel never stores.
    * Full fine-tuning under half autocast also keeps the half copy of each linear weight for backward.
      Adapters keep their inputs again in ``c`` under autocast, the rank-r down-projection, and DoRA the
      (W0 + s·BA)x output each adapted layer scales by m/‖W0 + s·BA‖ (our DoRA never forms W0 + s·BA itself).
    * Outside the blocks: the embedding output, the final norm's input and the head's input, all token-sized.
      The head classifies one token per row: there is no batch × length × vocabulary logits tensor.
    * Gradient checkpointing (per block, as transformers does it) keeps only each block's input, and recomputes
      one block's activations at a time in backward.
    * Backward walks the blocks from the last: at block k the activations of blocks <= k and the gradients of
      blocks >= k are alive, so the peak is ``max(L·A + G, A + L·G)`` for per-block activations A and gradients G,
      plus the head's gradients and a workspace of two I-sized gradient tensors. The optimiser step then holds all
      gradients plus its temporaries: none for the ``fused`` AdamW of ``core.loop.make_optimizer``, two copies of the
      largest tensor for torch's default ``for-loop`` AdamW on a CPU. A 4-bit layer dequantises its weight to
      ``c`` for each matmul (the largest one counts as workspace).
    * Not counted: the CUDA context and cuBLAS workspaces (outside the allocator: pass the *free* memory as the
      device size), allocator fragmentation (the plan's ``safety`` margin), and the attention mask (b·s² bytes).
    """
    model = _read_model(model_config, method, compute_dtype, rank, targets)
    return _estimate(model, method, per_device_batch, max_length, compute_dtype, gradient_checkpointing, rank,
                     device_type, optimizer)


def _estimate(model: _Model, method: str, per_device_batch: int, max_length: int, compute_dtype: torch.dtype,
              gradient_checkpointing: bool, rank: int, device_type: str, optimizer: str) -> MemoryEstimate:
    """:func:`estimate_memory` for a model already read (a plan tries several batch shapes on one model)."""
    if per_device_batch < 1 or max_length < 1:
        raise ValueError(f"per_device_batch and max_length must be >= 1, got {per_device_batch} and {max_length}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    kind = get_method(method)
    tokens = per_device_batch * max_length
    h, inner = model.hidden, model.intermediate
    half = compute_dtype in HALF_DTYPES
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

    layers = model.layers
    block_grads, outer_grads = 4 * model.block_trainable, 4 * model.outer_trainable
    gradients = 4 * model.trainable
    backward_workspace = 2 * tokens * inner * c + c * model.largest_quantized
    recomputed = block if gradient_checkpointing else 0
    backward = (max(layers * kept + block_grads, kept + layers * block_grads) + recomputed + outer + outer_grads
                + backward_workspace)
    optimizer_workspace = 2 * 4 * model.largest_trainable if optimizer == "for-loop" else 0
    step_peak = max(backward, gradients + optimizer_workspace)
    optimizer_state = 8 * model.trainable
    return MemoryEstimate(
        method=method,
        parameters=model.parameters,
        trainable_parameters=model.trainable,
        weights=model.weight_bytes,
        optimizer_state=optimizer_state,
        gradients=gradients,
        activations=layers * kept + recomputed + outer,
        workspace=max(backward_workspace, optimizer_workspace),
        step_peak=step_peak,
        total=model.weight_bytes + optimizer_state + step_peak,
    )


# --------------------------------------------------------------------------------------------- the plan


def _gib(n_bytes: int) -> str:
    return format_bytes(n_bytes, binary=True, decimals=1)


def plan_memory(
    model_config,
    method: str,
    *,
    global_batch: int,
    max_length: int,
    compute_dtype: torch.dtype,
    device_bytes: int,
    num_processes: int = 1,
    per_device_batch: int | None = None,
    gradient_checkpointing: bool = False,
    safety: float = 0.9,
    rank: int = 8,
    targets=None,
    device_type: str = "cuda",
    name: str | None = None,
) -> MemoryPlan:
    """The cheapest way to train ``method`` within ``safety × device_bytes``, keeping the global batch.

    Tried in order, stopping at the first that fits: the configured micro-batch (``per_device_batch``, default
    all of this device's share of ``global_batch``); the same with gradient checkpointing (memory of one block's
    activations instead of all, for ~30% more compute); then ever smaller micro-batches (the next smaller divisor
    of the device's share, i.e. halving for powers of two) with more accumulation steps, down to one row. Each
    micro-batch divides the device's share, so accumulation reproduces the same global batch exactly.
    ``device_bytes``: the device's free memory (``torch.cuda.mem_get_info()[0]``); ``safety`` leaves the rest for
    allocator fragmentation and what the estimate leaves out.
    """
    share, start = _device_share(global_batch, num_processes, per_device_batch, max_length, device_bytes, safety)
    budget = int(safety * device_bytes)
    label = f"{name or getattr(model_config, 'name_or_path', '') or model_config.model_type} {method}"

    model = _read_model(model_config, method, compute_dtype, rank, targets)

    def estimate(batch: int, checkpointing: bool) -> MemoryEstimate:
        return _estimate(model, method, batch, max_length, compute_dtype, checkpointing, rank, device_type, "fused")

    candidates = _candidates(share, start, gradient_checkpointing)
    first = estimate(*candidates[0])
    limit = f"{_gib(budget)} usable ({safety:.0%} of {_gib(device_bytes)})"
    for batch, checkpointing in candidates:
        as_configured = (batch, checkpointing) == candidates[0]
        chosen = first if as_configured else estimate(batch, checkpointing)
        if chosen.total <= budget:
            changes = "gradient checkpointing on, " if checkpointing and not gradient_checkpointing else ""
            reason = _fit_reason(label, limit, share // batch, batch, first, chosen, as_configured, changes)
            return MemoryPlan(batch, share // batch, checkpointing, chosen, device_bytes, budget, True, reason)
    smallest = estimate(*candidates[-1])  # the least memory any plan needs
    reason = (f"{label} does not fit: {_gib(smallest.total)} estimated even at 1 row with gradient checkpointing "
              f"> {limit} (weights {_gib(smallest.weights)} + optimizer state {_gib(smallest.optimizer_state)} "
              f"+ gradients {_gib(smallest.gradients)}); use a GPU with more memory or a 4-bit method (qlora)")
    return MemoryPlan(1, share, True, smallest, device_bytes, budget, False, reason)


def _device_share(global_batch: int, num_processes: int, per_device_batch: int | None, max_length: int,
                  device_bytes: int, safety: float) -> tuple[int, int]:
    """``(rows per device per optimiser step, the micro-batch to try first)``, or a ValueError on a bad input."""
    for label, value in (("global_batch", global_batch), ("num_processes", num_processes),
                         ("max_length", max_length), ("device_bytes", device_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if global_batch % num_processes:
        raise ValueError(f"global_batch {global_batch} is not divisible by num_processes {num_processes}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety!r}")
    share = global_batch // num_processes
    start = share if per_device_batch is None else per_device_batch
    if start < 1 or share % start:
        raise ValueError(f"per_device_batch {start} must divide the per-device share {share} of global_batch")
    return share, start


def _candidates(share: int, start: int, gradient_checkpointing: bool) -> list[tuple[int, bool]]:
    """``(micro-batch, checkpointing)`` in the order :func:`plan_memory` tries them: as configured, then with
    checkpointing, then every smaller divisor of ``share`` with checkpointing."""
    candidates = [(start, gradient_checkpointing)]
    if not gradient_checkpointing:
        candidates.append((start, True))
    return candidates + [(b, True) for b in range(start - 1, 0, -1) if share % b == 0]


def _fit_reason(label: str, limit: str, steps: int, batch: int, first: MemoryEstimate, chosen: MemoryEstimate,
                as_configured: bool, changes: str) -> str:
    """The plan's one-line reason when ``chosen`` fits: what was estimated, and what (if anything) changed."""
    batches = f"{steps} accumulation steps of {batch} rows" if steps > 1 else f"{batch} rows, no accumulation"
    if as_configured:
        return f"{label}: {_gib(chosen.total)} estimated <= {limit}; {batches}, as configured"
    return f"{label}: {_gib(first.total)} estimated > {limit}; {changes}{batches} -> {_gib(chosen.total)}"


def to_record(plan: MemoryPlan) -> dict:
    """The plan as flat JSON-safe fields for a run's ``config`` record (bytes as integers)."""
    record = {
        "memory_plan": plan.reason,
        "memory_fits": plan.fits,
        "memory_device_bytes": plan.device_bytes,
        "memory_budget_bytes": plan.budget_bytes,
        "memory_estimate_bytes": plan.estimate.total,
        "planned_per_device_batch": plan.per_device_batch,
        "planned_grad_accum_steps": plan.grad_accum_steps,
        "planned_gradient_checkpointing": plan.gradient_checkpointing,
    }
    estimate = asdict(plan.estimate)
    for key in ("weights", "optimizer_state", "gradients", "activations", "workspace", "step_peak"):
        record[f"memory_{key}_bytes"] = estimate[key]
    return record


def plan_for_device(model_source: str, method: str, train_config, adapter, processes: int,
                    device: torch.device, name: str | None = None) -> MemoryPlan | None:
    """The plan for one run on ``device`` before its model is loaded: ``None`` off CUDA (a CPU run is never
    re-planned, so its results stay those of its configuration); a ValueError when nothing fits.

    ``train_config`` is the run's ``TrainConfig`` (its ``batch_size`` is the global batch) and ``adapter`` its
    ``AdapterSettings``; the free memory is read after CUDA is initialised, so its context is already counted.
    """
    if device.type != "cuda":
        return None
    from transformers import AutoConfig

    from .devices import compute_dtype_for
    from .models import resolve_model_source

    model_config = AutoConfig.from_pretrained(resolve_model_source(model_source), num_labels=2)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    share = train_config.batch_size // processes
    accumulation = train_config.grad_accum_steps
    plan = plan_memory(model_config, method, global_batch=train_config.batch_size, num_processes=processes,
                       per_device_batch=share // accumulation if share % accumulation == 0 else None,
                       max_length=train_config.max_length, compute_dtype=compute_dtype_for(device, train_config.precision),
                       device_bytes=int(free_bytes), gradient_checkpointing=train_config.gradient_checkpointing,
                       rank=adapter.rank, targets=adapter.targets, name=name)
    if not plan.fits:
        raise ValueError(plan.reason)
    return plan


def with_micro_batch_at_most(plan: MemoryPlan, per_device_batch: int) -> MemoryPlan:
    """``plan`` after an out-of-memory error: a micro-batch of at most ``per_device_batch`` rows (the largest that
    divides the device's share, so the global batch is unchanged), accumulated over more steps. The plan itself
    when ``per_device_batch`` is not smaller (the first attempt: nothing has failed yet)."""
    if per_device_batch >= plan.per_device_batch:
        return plan
    share = plan.per_device_batch * plan.grad_accum_steps
    batch = max(b for b in range(1, per_device_batch + 1) if share % b == 0)
    return replace(plan, per_device_batch=batch, grad_accum_steps=share // batch,
                   reason=f"{plan.reason}; out of memory at {plan.per_device_batch} rows: retried with {batch}")


__all__ = ["MemoryEstimate", "MemoryPlan", "OPTIMIZERS", "estimate_memory", "parameter_count", "plan_memory",
           "plan_for_device", "with_micro_batch_at_most", "to_record"]
