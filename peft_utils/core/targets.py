"""Which layers get adapters, on any transformers classifier: presets, per-family defaults, and the
classification head that keeps training.

Targets are matched on module names as peft does (``name == suffix`` or ``name.endswith("." + suffix)``), so one
rule serves GPT-2 (``Conv1D``), encoders and decoders (``nn.Linear``) and 4-bit models (``Linear4bit``). What a
``targets`` value means (:func:`parse_targets`), for the notebook, the command line and the API alike:

- ``None``: the family's default, peft's: the ``attn`` preset, plus ``PEFT_EXTRA_DEFAULTS`` (tested against peft);
- a preset: ``attn`` (query and value, or the fused qkv layer such as GPT-2's ``c_attn``: the LoRA paper's
  choice), ``attn-all`` (every projection of the attention blocks), ``all-linear`` (every linear layer but the head);
- a string of word characters and dots (``"c_attn"``, ``"attn.c_attn"``): one module-name suffix;
- any other string, or an ``re.Pattern``: a regex matched against the whole name (``re.fullmatch``, as peft);
- a list of module-name suffixes.

An attention projection is a linear layer inside a module whose class name contains ``Attention``: no per-family
table, so a family added to transformers later works as soon as it follows the convention. The classification
head (and the layers a family's head adds) trains in full, as peft's ``modules_to_save``; it and the embeddings
are never targets.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence, Union

import torch
from torch import nn

from .layers import is_supported_base

MODEL_PRESETS = ("attn", "attn-all", "all-linear")
# Last name component of a query or value projection, and of a fused query-key-value projection.
QUERY_VALUE_NAMES = frozenset(
    {"q_proj", "v_proj", "query", "value", "q_lin", "v_lin", "query_proj", "value_proj", "q", "v"})
FUSED_QKV_NAMES = frozenset({"c_attn", "query_key_value", "qkv_proj", "Wqkv", "in_proj", "qkv", "W_pack"})
# peft's defaults that are more than the attention rule (peft.utils.constants); the tests compare with peft.
PEFT_EXTRA_DEFAULTS: dict[str, tuple[str, ...]] = {"phi": ("q_proj", "v_proj", "fc1", "fc2")}

# Classification heads: new at load time and trained with the adapters (GPT-2/decoders: score, encoders: classifier).
HEAD_MODULES = ("score", "classifier")
# Layers a family's classifier adds in front of the head that the pretrained checkpoints do not hold (DistilBERT's
# pre_classifier; DeBERTa-v2/v3 checkpoints ship no pooler), so they start random and must train too. BERT's and
# RoBERTa's poolers are pretrained and stay frozen.
NEW_HEAD_LAYERS: dict[str, tuple[str, ...]] = {"distilbert": ("pre_classifier",), "deberta-v2": ("pooler",)}


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def head_modules(model_type_name: str) -> tuple[str, ...]:
    """Module-name suffixes of the classification head of a ``model_type``: they always train (``apply_adapters``
    keeps them whatever else it is asked to keep, and they are saved as peft's ``modules_to_save``: a new head is
    random), and are never quantised."""
    return HEAD_MODULES + NEW_HEAD_LAYERS.get(model_type_name, ())


Targets = Union[str, re.Pattern, Sequence[str], None]
# One module-name suffix: word characters and dots ("c_attn", "attn.c_attn", "h.0.attn.c_attn").
_SUFFIX = re.compile(r"\w+(?:\.\w+)*")


def is_name_suffix(text: str) -> bool:
    """Whether ``text`` reads as a module-name suffix rather than a regex: word characters and dots only."""
    return _SUFFIX.fullmatch(text) is not None


def parse_targets(targets: Targets, setting: str = "targets") -> str | re.Pattern | tuple[str, ...] | None:
    """What ``targets`` means before any model is seen: ``None``, a preset name, a compiled regex, or suffixes.

    A string that is not a preset is a suffix when it reads as one (:func:`is_name_suffix`), else a regex; a
    regex that does not compile, or a list item that is not a name, is a one-line ``ValueError`` naming the
    ``setting`` (how the caller calls it), not a ``re.error`` from deep inside matching.
    """
    if targets is None or isinstance(targets, re.Pattern) or targets in MODEL_PRESETS:
        return targets
    if isinstance(targets, str):
        if is_name_suffix(targets):
            return (targets,)
        try:
            return re.compile(targets)
        except re.error as error:
            raise ValueError(f"{setting} {targets!r} is not a valid regular expression ({error})") from None
    suffixes = tuple(targets)
    if not suffixes:
        raise ValueError(f"{setting} is empty: name at least one module (e.g. 'c_attn') or a preset")
    for item in suffixes:
        if not isinstance(item, str) or not is_name_suffix(item):
            raise ValueError(f"{setting} item {item!r} is not a module name (word characters and dots); "
                             "a regex goes alone, as one string")
    return suffixes


def name_matcher(targets: str | re.Pattern | Sequence[str]) -> Callable[[str], bool]:
    """A regex (full match on the module name) or a list of name suffixes, as a predicate on module names.

    A plain string is a regex here, as in peft's ``target_modules`` (saved adapters are read this way); what a
    user's string means is :func:`parse_targets`'s decision.
    """
    if isinstance(targets, (str, re.Pattern)):
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = tuple(targets)
    if not suffixes:
        raise ValueError("targets is empty: name at least one module (e.g. 'c_attn') or a preset")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def head_names(model: nn.Module) -> set[str]:
    """Names of the classification-head modules and everything inside them."""
    heads = name_matcher(head_modules(model_type(model)))
    roots = [n for n, _ in model.named_modules() if n and heads(n)]
    return {n for n, _ in model.named_modules() if any(n == r or n.startswith(r + ".") for r in roots)}


def linear_layers(model: nn.Module) -> list[str]:
    """Every adaptable layer (``nn.Linear``, ``Conv1D``, ``Linear4bit``) outside the classification head."""
    head = head_names(model)
    return [n for n, m in model.named_modules() if n and is_supported_base(m) and n not in head]


def _attention_layers(model: nn.Module) -> list[str]:
    """Adaptable layers inside an attention block (a module whose class name contains ``Attention``)."""
    blocks = [n for n, m in model.named_modules() if n and "Attention" in type(m).__name__]
    return [n for n in linear_layers(model) if any(n.startswith(b + ".") for b in blocks)]


def preset_layers(model: nn.Module, preset: str) -> list[str]:
    """Full names of the layers a model-resolved preset selects on ``model``, in module order."""
    if preset == "all-linear":
        layers = linear_layers(model)
    elif preset == "attn-all":
        layers = _attention_layers(model)
    elif preset == "attn":
        attention = _attention_layers(model)
        layers = [n for n in attention if n.rsplit(".", 1)[-1] in QUERY_VALUE_NAMES | FUSED_QKV_NAMES]
        if attention and not layers:
            raise ValueError(
                f"cannot tell the query and value projections of {model_type(model) or type(model).__name__!r} apart; "
                f"its attention layers end in {sorted({n.rsplit('.', 1)[-1] for n in attention})}: "
                "pass targets='attn-all' or their names"
            )
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {MODEL_PRESETS}")
    if not layers:
        raise ValueError(
            f"preset {preset!r} found no layer in {type(model).__name__}: no linear layer"
            + (" inside a module whose class name contains 'Attention'" if preset != "all-linear" else "")
            + "; pass targets as module names or a regex"
        )
    return layers


def shortest_suffixes(model: nn.Module, layers: Sequence[str]) -> tuple[str, ...]:
    """The shortest name suffixes (same depth for all) that select exactly ``layers``: ("q_proj", "v_proj"), or
    ("attn.c_attn", "attn.c_proj") where a bare "c_proj" would also hit GPT-2's MLP."""
    wanted = set(layers)
    names = [n for n, _ in model.named_modules() if n]
    for depth in range(1, max(n.count(".") for n in layers) + 2):
        suffixes = tuple(dict.fromkeys(".".join(n.split(".")[-depth:]) for n in layers))
        matches = name_matcher(suffixes)
        if {n for n in names if matches(n)} == wanted:
            return suffixes
    return tuple(layers)  # unreachable: full names select exactly themselves


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The layers ``targets=None`` adapts: peft's default for the family, i.e. the ``attn`` preset (query and value,
    or the fused qkv layer) unless peft lists more (``PEFT_EXTRA_DEFAULTS``)."""
    extra = PEFT_EXTRA_DEFAULTS.get(model_type(model))
    return extra if extra is not None else shortest_suffixes(model, preset_layers(model, "attn"))


def resolve_targets(model: nn.Module, targets: Targets) -> re.Pattern | tuple[str, ...]:
    """``targets`` as something ``name_matcher`` takes: None -> the default, a preset -> its suffixes on ``model``,
    a suffix -> a tuple of one, a regex -> compiled (see :func:`parse_targets`). Resolving twice changes nothing."""
    parsed = parse_targets(targets)
    if parsed is None:
        return default_targets(model)
    if isinstance(parsed, str):
        return shortest_suffixes(model, preset_layers(model, parsed))
    return parsed


def head_or_embedding(model: nn.Module, names: Sequence[str]) -> str | None:
    """Why the first of ``names`` that must not be a target is refused (``None``: all may be targets).

    The classification head is new and random at load time: it trains in full (peft's ``modules_to_save``), and a
    frozen head under an adapter would stay random. Embeddings are not layers our adapters wrap.
    """
    head, modules = head_names(model), dict(model.named_modules())
    for name in names:
        if name in head:
            return (f"targets match {name!r}, a layer of the classification head: the head always trains in full "
                    "(peft's modules_to_save) and cannot take an adapter; name the layers before it")
        if isinstance(modules[name], nn.Embedding):
            return (f"targets match the embedding layer {name!r} ({type(modules[name]).__name__}): adapters go on "
                    "linear layers, and the embeddings stay frozen")
    return None


def meta_skeleton(model_config) -> nn.Module:
    """The sequence-classification model of ``model_config`` on the meta device: its layer names and types, with no
    weight read or allocated (cheap even for a 7B model), so targets can be checked before anything loads."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(model_config)
