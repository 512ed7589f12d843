"""Every supported model family, on tiny random configs: default targets and presets against peft's, LoRA / DoRA
against peft on the same weights, padding through the loader, and a training step of every method (full, LoRA,
DoRA and the 4-bit QLoRA / QDoRA) with the loss falling.

The tiny models are written to disk with a small word-level tokenizer built here, so the from_pretrained paths (the
fp32 loader and the NF4 loader) run offline. Decoder tokenizers ship without a pad token, like the real ones.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from peft_utils.core.layers import LoRALayer, is_linear4bit
from peft_utils.core.inject import apply_adapters, count_parameters
from peft_utils.models import load_model
from peft_utils.core.quant import prepare_for_kbit_training
from peft_utils.sizes import model_size
from peft_utils.core.targets import head_modules, preset_layers, resolve_targets

peft = pytest.importorskip("peft")

WORDS = "the a film movie is was good bad great awful not very fun dull plot acting story boring moving best".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
BPE_SIZE = 300
VOCAB = 320  # > the tokenizer's ids (BPE_SIZE, plus a pad token a family's tokenizer class may add)
PAD, UNK, CLS, SEP, EOS = range(5)
_SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
_GQA = dict(_SMALL, num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict
    default: tuple[str, ...]  # expected default targets (suffixes)
    attn_all: tuple[str, ...]  # expected last name components of the attention projections
    decoder: bool = True  # no pad token in the tokenizer; classified from the last real token
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "gpt2": Family("gpt2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64), ("c_attn",), ("c_attn", "c_proj")),
    "bert": Family("bert", dict(_SMALL, max_position_embeddings=64), ("query", "value"),
                   ("query", "key", "value", "dense"), decoder=False),
    "roberta": Family("roberta", dict(_SMALL, max_position_embeddings=66), ("query", "value"),
                      ("query", "key", "value", "dense"), decoder=False),
    "distilbert": Family("distilbert", dict(n_layers=2, dim=32, n_heads=4, hidden_dim=64, max_position_embeddings=64),
                         ("q_lin", "v_lin"), ("q_lin", "k_lin", "v_lin", "out_lin"), decoder=False),
    "deberta-v2": Family("deberta-v2", dict(_SMALL, max_position_embeddings=64, relative_attention=True,
                                            position_buckets=16, pos_att_type=["p2c", "c2p"], share_att_key=True,
                                            norm_rel_ebd="layer_norm"),
                         ("query_proj", "value_proj"), ("query_proj", "key_proj", "value_proj", "dense"), decoder=False),
    "modernbert": Family("modernbert", dict(_SMALL, max_position_embeddings=64, global_attn_every_n_layers=2,
                                            local_attention=16, cls_token_id=CLS, sep_token_id=SEP),
                         ("Wqkv",), ("Wqkv", "Wo"), decoder=False),
    "llama": Family("llama", _GQA, ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen2": Family("qwen2", _GQA, ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen3": Family("qwen3", dict(_GQA, head_dim=8), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mistral": Family("mistral", _GQA, ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gemma": Family("gemma", dict(_GQA, head_dim=8), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi3": Family("phi3", _GQA, ("qkv_proj",), ("qkv_proj", "o_proj")),
    "gpt_neox": Family("gpt_neox", _SMALL, ("query_key_value",), ("query_key_value", "dense")),
    "opt": Family("opt", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                              word_embed_proj_dim=32, max_position_embeddings=64),
                  ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj")),
    "bloom": Family("bloom", dict(n_layer=2, hidden_size=32, n_head=4), ("query_key_value",), ("query_key_value", "dense")),
}
NAMES = list(FAMILIES)


def tiny_config(name: str):
    """A 2-layer, hidden-32 config of the family, dropout off, special tokens inside the small vocabulary."""
    from transformers import AutoConfig

    family = FAMILIES[name]
    config = AutoConfig.for_model(
        family.model_type, vocab_size=VOCAB, num_labels=2, bos_token_id=CLS, eos_token_id=EOS,
        pad_token_id=None if family.decoder else PAD, **family.config,
    )
    for key, value in vars(config).items():  # every dropout probability of every family to zero
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key.endswith("_drop")):
            setattr(config, key, 0.0)
    return config


def tiny_model(name: str, seed: int = 0, pad: bool = True):
    """The family's classifier with random weights; ``pad``: give decoders a pad id (EOS), as the loader does."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(name)
    if pad and config.pad_token_id is None:
        config.pad_token_id = EOS
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


@functools.lru_cache(maxsize=1)
def _byte_level_bpe():
    """A byte-level BPE (the GPT-2 / Llama-3 / Qwen kind) of ``BPE_SIZE`` ids, trained here on ``WORDS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(WORDS)], trainer)
    return backend


def tiny_tokenizer(decoder: bool):
    """A small tokenizer built offline; decoders get no pad token (the loader must add one), like Llama's."""
    from transformers import PreTrainedTokenizerFast

    specials = dict(unk_token="[UNK]", eos_token="</s>", bos_token="[CLS]")
    if not decoder:
        specials |= dict(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(), **specials)


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random family classifier plus its tokenizer on disk, as a hub checkpoint would be (decoders: no pad)."""
    model = tiny_model(name, seed, pad=False)
    model.save_pretrained(folder)
    tiny_tokenizer(FAMILIES[name].decoder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in folders:
            folders[name] = save_tiny(name, tmp_path_factory.mktemp(name))
        return folders[name]

    return get


def head_of(model) -> list[str]:
    kept = head_modules(model.config.model_type)
    return [n for n in kept if any(m == n or m.endswith("." + n) for m, _ in model.named_modules())]


def peft_adapted(model, targets, use_dora: bool = False, rank: int = 4, alpha: float = 8.0):
    """peft's LoRA/DoRA on ``model``: ``targets=None`` lets peft pick its per-architecture default."""
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_dora=use_dora, task_type="SEQ_CLS",
        fan_in_fan_out=model.config.model_type == "gpt2", modules_to_save=head_of(model),
    )
    return peft.get_peft_model(model, config)


def peft_layer_names(reference) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n.removeprefix("base_model.model.") for n, m in reference.named_modules() if isinstance(m, LoraLayer)]


def batch(n_rows: int = 4, length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), BPE_SIZE, (n_rows, length), generator=generator)
    return ids, torch.arange(n_rows) % 2


# ---------------------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_and_presets(name):
    family = FAMILIES[name]
    model = tiny_model(name)
    assert sorted(resolve_targets(model, None)) == sorted(family.default)
    attn_all = preset_layers(model, "attn-all")
    assert sorted({n.rsplit(".", 1)[-1] for n in attn_all}) == sorted(family.attn_all)
    assert len(attn_all) == 2 * len(family.attn_all)  # every projection in both layers
    assert set(preset_layers(model, "attn")) <= set(attn_all)
    if model.config.model_type in peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        ours = apply_adapters(tiny_model(name), "lora", None).injected_adapters.target_modules
        assert ours == peft_layer_names(peft_adapted(tiny_model(name), None))  # peft's default, same module order


@pytest.mark.parametrize("name", NAMES)
def test_all_linear_is_pefts_all_linear_without_the_head(name):
    model = tiny_model(name)
    head = tuple(head_of(model))
    ours = apply_adapters(model, "lora", "all-linear").injected_adapters.target_modules
    theirs = peft_layer_names(peft_adapted(tiny_model(name), "all-linear"))
    assert ours == [n for n in theirs if not n.startswith(head)]
    assert not any(n.startswith(head) for n in ours)


def test_rule_agrees_with_pefts_mapping_on_every_family_it_lists():
    """peft's own table, on every family of it that transformers builds as a sequence classifier (meta device)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from peft_utils.core.targets import name_matcher

    mapping = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    checked = []
    for model_type, targets in mapping.items():
        if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            continue
        config = AutoConfig.for_model(model_type)
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, 1)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        names = [n for n, _ in model.named_modules() if n]
        expected, matches = [n for n in names if name_matcher(targets)(n)], name_matcher(resolve_targets(model, None))
        assert [n for n in names if matches(n)] == expected, model_type
        checked.append(model_type)
    assert {"bert", "roberta", "deberta-v2", "llama", "qwen2", "mistral", "gemma", "gpt_neox", "bloom", "phi"} <= set(checked)


# ------------------------------------------------------------------------------------------------- parity with peft


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_peft_logits_gradients_and_count(name, method):
    """Every linear layer adapted (fused projections included), the same non-zero A, B (and m) in both."""
    targets = resolve_targets(tiny_model(name), "all-linear")
    ours = apply_adapters(tiny_model(name), method, targets, rank=4, alpha=8)
    reference = peft_adapted(tiny_model(name), list(targets), use_dora=method == "dora")
    generator = torch.Generator().manual_seed(7)
    pairs = []
    for layer_name, layer in ours.named_modules():
        if not isinstance(layer, LoRALayer):
            continue
        theirs = reference.base_model.model.get_submodule(layer_name)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
            pairs += [(layer.lora_A, theirs.lora_A["default"].weight), (layer.lora_B, theirs.lora_B["default"].weight)]
            if method == "dora":
                layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=generator))
                theirs.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
                pairs.append((layer.magnitude, theirs.lora_magnitude_vector["default"].weight))
    assert count_parameters(ours).trainable == reference.get_nb_trainable_parameters()[0]
    ids, labels = batch()
    out_ours, out_ref = ours(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    assert out_ours.logits.std() > 0
    out_ours.loss.backward()
    out_ref.loss.backward()
    for mine, theirs in pairs:
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", NAMES)
def test_loader_pads_and_a_padded_sentence_reads_like_the_sentence_alone(name, saved):
    from transformers import AutoTokenizer

    had_pad = AutoTokenizer.from_pretrained(saved(name)).pad_token is not None  # Qwen2's tokenizer class adds one
    model, tokenizer = load_model(saved(name))
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert had_pad or tokenizer.pad_token == tokenizer.eos_token  # reused, not a new token
    assert had_pad != FAMILIES[name].decoder or name == "qwen2"
    model.eval()
    short, long = "the film was good", "the plot was not very moving and the acting dull"
    padded = tokenizer([short, long], padding=True, return_tensors="pt")
    assert (padded["attention_mask"][0] == 0).any(), "the short row was not padded"
    alone = tokenizer([short], return_tensors="pt")
    with torch.no_grad():
        logits_padded = model(**padded).logits
        logits_alone = model(**alone).logits
        logits_long = model(**tokenizer([long], return_tensors="pt")).logits
    torch.testing.assert_close(logits_padded[0], logits_alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_padded[1], logits_long[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits_alone[0], logits_long[0])


# ------------------------------------------------------------------------------------------------ training, 4-bit


def build(method: str, folder: Path):
    """What the experiment builds for each method, from the same folder."""
    if method == "full":
        model, tokenizer = load_model(folder)
        return model.requires_grad_(True), tokenizer
    if method in ("qlora", "qdora"):
        model, tokenizer = load_model(folder, dtype=torch.float32, quantized=True, device_map={"": "cpu"})
        prepare_for_kbit_training(model)
    else:
        model, tokenizer = load_model(folder)
    return apply_adapters(model, method.removeprefix("q"), None, rank=4, alpha=8), tokenizer


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora", "qdora"])
@pytest.mark.parametrize("name", NAMES)
def test_every_method_trains(name, method, saved):
    model, tokenizer = build(method, saved(name))
    if method.startswith("q"):
        quantised = [n for n, m in model.named_modules() if is_linear4bit(m)]
        head = tuple(head_of(model))
        # Every linear layer outside the head is 4-bit (the adapted ones sit under LoRA wrappers as ".base").
        assert [n.removesuffix(".base") for n in quantised] == preset_layers(tiny_model(name), "all-linear")
        assert quantised and not any(n.startswith(head) for n in quantised)
        assert all(is_linear4bit(layer.base) for layer in model.modules() if isinstance(layer, LoRALayer))
        size = model_size(model, method)
        n_weights = sum(int(torch.Size(p.quant_state.shape).numel()) for n, p in model.named_parameters()
                        if getattr(p, "quant_state", None) is not None)
        assert size["quantized_bytes"] == n_weights // 2
        assert 0 < size["nf4_bound_bytes"] <= size["quantized_bytes"] + size["quant_state_bytes"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    optimizer = torch.optim.AdamW(trainable, lr=1e-3 if method == "full" else 2e-2)
    texts = ["the film was good", "a dull and boring plot", "great acting", "the worst movie not fun"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
