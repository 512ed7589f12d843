"""What training produced, in the formats the field reads: peft LoRA adapters (written and read) and merged
checkpoints. peft stores ``lora_A`` (r, in) and ``lora_B`` (out, r) for GPT-2's ``Conv1D`` too (``fan_in_fan_out``
is about the *base* weight), so the layouts agree; the trained head is peft's ``modules_to_save``."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .core.inject import InjectedAdapters, adapter_layers, apply_adapters
from .core.layers import DoRALayer, LoRALayer, base_features, base_weight, is_conv1d, is_linear4bit
from .core.targets import head_modules, meta_skeleton, model_type
from .devices import checked_dtype
from .quiet import loading_bars_off

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the transformers model
# Per adapted layer: our attribute -> peft's key suffix.
ADAPTER_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
ADAPTER_KEY = re.compile(re.escape(PEFT_PREFIX) + r"(.+?)\.(lora_.+)")  # (layer name, peft's suffix)
# ``AdapterSettings`` fields (and ``apply_adapters`` arguments) -> peft LoraConfig keys and their defaults.
PEFT_SETTINGS = {"rank": ("r", 8), "alpha": ("lora_alpha", 8), "dropout": ("lora_dropout", 0.0),
                 "rslora": ("use_rslora", False)}
SEQ_CLS = "SEQ_CLS"
# peft LoraConfig keys and the one value (besides unset) our layers compute: others change what the adapter computes,
# or where. Other keys are ignored, as peft ignores unknown ones (init-time options, peft_version...).
ONLY_VALUES = {
    "task_type": SEQ_CLS, "bias": "none", "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    "layer_replication": None, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None,
    "megatron_config": None, "arrow_config": None, "use_bdlora": None, "velora_config": None, "monteclora_config": None,
    "kasa_config": None,
}
# Initialisations that only set A and B (overwritten by the saved values); the others (PiSSA, OLoRA, LoftQ, EVA,
# CorDA...) also rewrite the base weights, which a saved adapter alone cannot reproduce.
PLAIN_INITS = (True, False, "gaussian")
T = TypeVar("T")
PROBE_TEXTS = ("A gripping, beautifully acted film.", "Dull, predictable and far too long.")  # export's check


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changed, under peft's names: adapter tensors and the kept-trainable (head) modules, as
    views of the model's own tensors (saving copies them out, loading copies into them)."""
    if not isinstance(getattr(model, "injected_adapters", None), InjectedAdapters):
        raise ValueError("model has no adapters: call apply_adapters first")
    state = {}
    for name, layer in adapter_layers(model):
        for attribute, suffix in ADAPTER_KEYS.items():
            if attribute != "magnitude" or isinstance(layer, DoRALayer):
                state[f"{PEFT_PREFIX}{name}.{suffix}"] = getattr(layer, attribute).detach()
    for module_name in model.injected_adapters.saved_modules:  # state_dict(), buffers included, as in peft
        for key, tensor in model.get_submodule(module_name).state_dict().items():
            state[f"{PEFT_PREFIX}{module_name}.{key}"] = tensor
    return state


def peft_adapter_json(model: nn.Module) -> dict:
    """The ``adapter_config.json`` peft writes for the same adapter (keys left out take peft's defaults)."""
    from .models import hub_id

    injected = model.injected_adapters
    # fan_in_fan_out: Conv1D targets in the plain architecture, which peft loads onto (4-bit GPT-2 has Linear4bit)
    architecture = dict(meta_skeleton(_plain_config(model.config)).named_modules())
    return {
        "peft_type": "LORA",
        "task_type": SEQ_CLS,
        "base_model_name_or_path": hub_id(getattr(model, "name_or_path", "")) or None,
        **{key: getattr(injected.settings, setting) for setting, (key, _) in PEFT_SETTINGS.items()},
        "use_dora": injected.method == "dora",
        "target_modules": injected.settings.targets or injected.target_modules,
        "fan_in_fan_out": any(is_conv1d(architecture.get(name)) for name, _ in adapter_layers(model)),
        "modules_to_save": injected.saved_modules or None,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _plain_config(config):
    """A copy of a model's config without its 4-bit quantisation: the plain architecture's."""
    config = copy.deepcopy(config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        vars(config).pop(attribute, None)
    return config


def save_adapters(model: nn.Module, folder: str | Path) -> int:
    """Write the adapter in peft's format to ``folder``; returns the bytes written (weights + config). A merged
    model is refused: its adapters are folded into weights that are not saved here."""
    from safetensors.torch import save_file

    state = {key: tensor.contiguous().cpu() for key, tensor in adapter_state_dict(model).items()}
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise ValueError("unmerge the adapters before saving them")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(peft_adapter_json(model), indent=2) + "\n", encoding="utf-8")
    return _saved_bytes(folder, CONFIG_FILE, WEIGHTS_FILE)


def _saved_bytes(folder: Path, config: str, weights: str) -> int:
    """The bytes of a saved model's ``config`` file and ``weights`` files (not its tokenizer's)."""
    return sum(path.stat().st_size for path in [folder / config, *folder.glob(weights)])


def save_trained(model: nn.Module, tokenizer, folder: str | Path, method: str) -> int:
    """Keep what a run trained: its peft adapter, or for full fine-tuning a ``save_pretrained`` checkpoint with the
    tokenizer. Returns the bytes the method ships beyond the base model (the base's tokenizer not counted)."""
    if method != "full":
        return save_adapters(model, folder)
    if any(True for _ in adapter_layers(model)):
        raise ValueError("method 'full' but the model has adapters: save it with method set to its adapter method")
    return save_checkpoint(model, tokenizer, Path(folder))


def save_checkpoint(model: nn.Module, tokenizer, folder: Path) -> int:
    """A ``save_pretrained`` checkpoint with its tokenizer; returns the bytes of its config and weights."""
    with loading_bars_off():  # transformers' "Writing model shards" bar, between the project's own lines
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return _saved_bytes(folder, "config.json", "model*.safetensors*")


def check_saved(folder: Path, config: str, weights: str) -> dict:
    """The JSON of ``folder``'s ``config`` file, once it and every safetensors file matching ``weights`` (whose
    header places every tensor: a cut file fails) read: a damaged one is a ``ValueError`` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        value = json.loads((folder / config).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{folder / config}: not valid JSON ({error}): the file is damaged; save it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{folder / config}: expected a JSON object, got a JSON {type(value).__name__}")
    for path in sorted(folder.glob(weights)):
        try:
            with safe_open(str(path), framework="pt") as file:
                file.keys()
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error}): truncated or damaged; "
                             "save it again") from None
    return value


def _check_config(config: dict, path: Path) -> None:
    """Refuse, in one line naming ``path``, a peft config whose adapter peft_utils' layers do not compute."""
    refusals = [f"peft_type={config.get('peft_type')!r} (only 'LORA')"] if config.get("peft_type") != "LORA" else []
    for key, value in ONLY_VALUES.items():
        if config.get(key) not in (None, value):  # null: not set
            refusals.append(f"{key}={config[key]!r} (only {value!r})")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        refusals.append(f"init_lora_weights={config['init_lora_weights']!r} (it rewrites the base weights)")
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        refusals.append(f"target_modules={targets!r} (name the layers: a list of name suffixes or a regex)")
    elif isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error:
            refusals.append(f"target_modules={targets!r} (not a valid regular expression)")
    if refusals:
        raise ValueError(f"{path}: cannot load with peft_utils' LoRA/DoRA layers: {refusals[0]}")


def _check_fits(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Every adapted layer of the model (``expected``) has its tensors in the file, and every saved tensor a place of
    its shape in the model; a kept module the file lacks keeps the model's values, as in peft."""
    missing = next((m for m in map(ADAPTER_KEY.fullmatch, expected) if m and m[0] not in saved), None)
    if missing:
        raise ValueError(f"adapter does not fit this model: layer {missing[1]} matches the targets but the adapter "
                         f"has no tensors for it (was it trained on a model with other layers?)")
    for key, tensor in saved.items():
        name = key.removeprefix(PEFT_PREFIX)
        if key not in expected:
            match = ADAPTER_KEY.fullmatch(key)
            home = f"layer {match[1]} has no matching layer" if match else f"tensor {name} has no home"
            raise ValueError(f"adapter does not fit this model: saved {home} in it")
        if tensor.shape != expected[key].shape:
            raise ValueError(f"adapter does not fit this model: {name}: saved {tuple(tensor.shape)}, the model's "
                             f"is {tuple(expected[key].shape)}")


def _remove_adapters(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undo ``apply_adapters``: put the base layers back and restore which parameters train."""
    for name, layer in list(adapter_layers(model)):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    vars(model).pop("injected_adapters", None)


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the peft LoRA/DoRA adapter saved in ``folder`` into ``model``, checked first: a failure leaves the model
    as it was."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for path in (folder / CONFIG_FILE, folder / WEIGHTS_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a peft LoRA adapter folder (safetensors weights)")
    config = check_saved(folder, CONFIG_FILE, WEIGHTS_FILE)
    _check_config(config, folder / CONFIG_FILE)
    saved = load_file(folder / WEIGHTS_FILE)
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has adapters; load into a fresh model")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        # a string target_modules is a regex in peft (re.fullmatch), whatever it looks like
        targets = config["target_modules"]
        targets = re.compile(targets) if isinstance(targets, str) else targets
        # the head trains and is saved anyway; peft's SEQ_CLS lists both families' heads ('classifier', 'score')
        extra = [name for name in config.get("modules_to_save") or [] if name not in head_modules(model_type(model))]
        settings = {setting: config.get(key, default) for setting, (key, default) in PEFT_SETTINGS.items()}
        method = "dora" if config.get("use_dora", False) else "lora"
        apply_adapters(model, method, targets, modules_to_save=extra, **settings)
        expected = adapter_state_dict(model)
        _check_fits(expected, saved)
        with torch.no_grad():
            for key, tensor in saved.items():
                expected[key].copy_(tensor)
    except BaseException:
        _remove_adapters(model, requires_grad)
        raise
    return model


@torch.no_grad()
def _merged_weight(layer: LoRALayer) -> torch.Tensor:
    """The layer's effective (out, in) weight in float32, by its own ``merge`` on a dense float32 copy of its base:
    the model is untouched, and a 4-bit base (which cannot be merged into) merges exactly."""
    if layer.merged:
        return base_weight(layer.base).float()
    original = layer.base
    dense = nn.Linear(*base_features(original), bias=False, device=layer.lora_A.device)
    dense.weight.copy_(base_weight(original).float())
    layer.base = dense
    try:
        layer.merge()
        return dense.weight.detach()
    finally:
        layer.base, layer.merged = original, False


def _dense_state(model: nn.Module, plain: nn.Module) -> dict[str, torch.Tensor]:
    """``plain``'s state dict (the architecture without adapters or 4-bit layers) filled from ``model``: adapters
    merged, 4-bit weights dequantised, every other tensor as it is."""
    state = {}
    for key, target in plain.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        if leaf == "weight" and (isinstance(module, LoRALayer) or is_linear4bit(module)):
            tensor = _merged_weight(module) if isinstance(module, LoRALayer) else base_weight(module).float()
            if is_conv1d(plain.get_submodule(owner)):
                tensor = tensor.T  # GPT-2's Conv1D stores (in, out)
        else:
            tensor = getattr(module.base if isinstance(module, LoRALayer) else module, leaf)
        state[key] = tensor.to("cpu", target.dtype)
    return state


@dataclass(frozen=True)
class MergedExport:
    folder: Path
    bytes: int  # weights + config (tokenizer files not counted)
    max_logit_diff: float  # merged checkpoint vs the unmerged model, on PROBE_TEXTS


def class_logits(model: nn.Module, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The float32 logits of ``texts`` (one row each, on the CPU), the model evaluated and left in its mode."""
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**batch).logits.float().cpu()
    finally:
        model.train(was_training)


def export_merged(model: nn.Module, tokenizer, folder: str | Path, dtype: torch.dtype = torch.float32,
                  overwrite: bool = False) -> MergedExport:
    """``model`` with its adapters folded in, a plain checkpoint in ``dtype`` (re-quantising to 4-bit would round the
    update away); a folder with files (an adapter there is what ``from_pretrained`` loads) only with ``overwrite``."""
    from transformers import AutoModelForSequenceClassification

    checked_dtype(dtype, "dtype")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot export to {folder}: it is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"cannot export to {folder}: the folder is not empty; choose a new folder, "
                         "or pass overwrite=True to replace it")
    plain = AutoModelForSequenceClassification.from_config(_plain_config(model.config), dtype=dtype)
    plain.load_state_dict(_dense_state(model, plain), strict=True)
    size = write_atomically(folder, lambda staging: save_checkpoint(plain, tokenizer, staging))
    merged, unmerged = (class_logits(m, tokenizer, PROBE_TEXTS) for m in (plain, model))
    return MergedExport(folder, size, (merged - unmerged).abs().max().item())


def write_atomically(folder: Path, write: Callable[[Path], T]) -> T:
    """``write`` into a new folder beside ``folder``, then swap it in by two renames (Linux cannot rename over a
    non-empty folder): a reader never sees a half-written folder, and a failure leaves ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging, aside = (folder.parent / f".{folder.name}.{kind}-{uuid.uuid4().hex[:8]}" for kind in ("new", "old"))
    staging.mkdir()
    try:
        written = write(staging)
        if folder.is_dir() and any(folder.iterdir()):
            os.replace(folder, aside)
        try:
            os.replace(staging, folder)  # onto a missing or empty folder
        except BaseException:
            if aside.is_dir():
                os.replace(aside, folder)  # the old folder back
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
