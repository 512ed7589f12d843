"""Hand-written LoRA / DoRA against peft (the reference) and against the papers' formulas, on the same weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_utils.core.inject import apply_adapters, count_parameters, merge_adapters, unmerge_adapters
from peft_utils.core.layers import DoRALayer, LoRALayer, base_weight
from peft_utils.models import random_gpt2

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0):
    # Model dropouts off so that the only randomness left is the adapters' own dropout.
    return random_gpt2("tiny", seed=seed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


MODELS = {
    "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_fc"], "score", 50257),
    "bert": (tiny_bert, ["query", "value", "intermediate.dense"], "classifier", 120),
}


def make_inputs(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 50000), (3, 9), generator=generator)
    return ids, torch.tensor([0, 1, 1])


def build_pair(kind: str, method: str, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0):
    """The same random model twice: one with peft's adapters, one with ours, sharing A, B (and m) values."""
    factory, targets, head, vocab = MODELS[kind]
    ours = apply_adapters(factory(), method, targets, rank, alpha, dropout)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_dora=method == "dora",
        fan_in_fan_out=kind == "gpt2", modules_to_save=[head],
    )
    reference = peft.get_peft_model(factory(), config)
    generator = torch.Generator().manual_seed(7)
    for name, layer in ours.named_modules():
        if not isinstance(layer, LoRALayer):
            continue
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)  # non-zero B
            if isinstance(layer, DoRALayer):
                layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=generator))
        peft_layer = reference.base_model.model.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            if isinstance(layer, DoRALayer):
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return ours, reference, vocab


def adapter_grads_by_layer(ours, reference):
    """(ours, peft) gradient pairs for every A, B and m."""
    pairs = []
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRALayer):
            peft_layer = reference.base_model.model.get_submodule(name)
            pairs.append((layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad))
            pairs.append((layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad))
            if isinstance(layer, DoRALayer):
                pairs.append((layer.magnitude.grad, peft_layer.lora_magnitude_vector["default"].weight.grad))
    return pairs


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_matches_peft_logits_and_gradients(kind, method):
    ours, reference, vocab = build_pair(kind, method)
    ids, labels = make_inputs(vocab)
    out_ours = ours(input_ids=ids, labels=labels)
    out_ref = reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, **TOL)
    out_ours.loss.backward()
    out_ref.loss.backward()
    pairs = adapter_grads_by_layer(ours, reference)
    assert len(pairs) >= 4
    for grad_ours, grad_ref in pairs:
        assert grad_ours is not None and grad_ours.abs().sum() > 0
        torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_matches_peft_with_dropout_in_training(method):
    """Same RNG stream, same dropout masks: peft's dropout convention for DoRA is reproduced exactly."""
    ours, reference, vocab = build_pair("gpt2", method, dropout=0.3)
    ours.train(), reference.train()
    ids, labels = make_inputs(vocab)
    torch.manual_seed(123)
    logits_ours = ours(input_ids=ids).logits
    torch.manual_seed(123)
    logits_ref = reference(input_ids=ids).logits
    torch.testing.assert_close(logits_ours, logits_ref, **TOL)
    torch.manual_seed(124)
    assert not torch.allclose(ours(input_ids=ids).logits, logits_ours), "dropout had no effect"


def dora_by_formula(layer: DoRALayer, x: torch.Tensor, detach: bool) -> torch.Tensor:
    """The paper's equation, literally: W' = m (W0 + sBA) / ||W0 + sBA||_row; y = x W'ᵀ + b."""
    direction = base_weight(layer.base).detach() + layer.scaling * layer.lora_B @ layer.lora_A
    norm = direction.norm(dim=1, keepdim=True)
    weight = layer.magnitude[:, None] * direction / (norm.detach() if detach else norm)
    return F.linear(x, weight, layer.base.bias)


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("detach", [True, False])
def test_dora_equals_paper_formula_in_both_norm_gradient_modes(base_kind, detach):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(12, 10) if base_kind == "linear" else Conv1D(10, 12)
    with torch.no_grad():
        base.bias.normal_()
    layer = DoRALayer(base, rank=3, alpha=6, detach_norm=detach)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.magnitude.mul_(1.3)
    x = torch.randn(4, 5, 12)
    weights = torch.randn(4, 5, 10)
    ours = layer(x)
    (ours * weights).sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    for p in (layer.lora_A, layer.lora_B, layer.magnitude):
        p.grad = None
    expected = dora_by_formula(layer, x, detach)
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours, expected, **TOL)
    for got, want in zip(grads, (layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_norm_gradient_modes_differ():
    """The switch matters: keeping the norm's gradient changes A's and B's gradients."""
    torch.manual_seed(0)
    grads = {}
    for detach in (True, False):
        torch.manual_seed(0)
        layer = DoRALayer(nn.Linear(8, 6), rank=2, alpha=4, detach_norm=detach)
        with torch.no_grad():
            layer.lora_B.normal_()
        layer(torch.randn(3, 8)).pow(2).sum().backward()
        grads[detach] = layer.lora_B.grad
    assert not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_adapter_changes_nothing(kind, method):
    factory, targets, _, vocab = MODELS[kind]
    ids, _ = make_inputs(vocab)
    before = factory()(input_ids=ids).logits
    model = apply_adapters(factory(), method, targets, rank=4, alpha=8)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_only_adapters_and_head_train_and_base_is_untouched(method):
    model = apply_adapters(tiny_gpt2(), method, ["c_attn"], rank=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_names = {"lora_A", "lora_B"} | ({"magnitude"} if method == "dora" else set())
    assert trainable and all(n.rsplit(".", 1)[-1] in adapter_names or n.startswith("score.") for n in trainable)
    assert any(n.startswith("score.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids, labels = make_inputs(50257)
    for _ in range(2):
        model(input_ids=ids, labels=labels).loss.backward()
        for name, parameter in model.named_parameters():
            assert (parameter.grad is not None) == (name in trainable), name
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"{name} changed"


@pytest.mark.parametrize("cls", [LoRALayer, DoRALayer])
def test_base_bias_is_kept(cls):
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.bias.fill_(3.0)
    layer = cls(base, rank=2, alpha=2)
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.base.bias is base.bias and torch.all(base.bias == 3.0)


def test_rslora_scaling():
    layer = LoRALayer(nn.Linear(4, 4), rank=16, alpha=8, rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)
    assert LoRALayer(nn.Linear(4, 4), rank=16, alpha=8).scaling == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_equals_unmerged_and_unmerge_restores(kind, method):
    ours, _, vocab = build_pair(kind, method)
    ids, _ = make_inputs(vocab)
    originals = {n: l.base.weight.detach().clone() for n, l in ours.named_modules() if isinstance(l, LoRALayer)}
    unmerged = ours(input_ids=ids).logits
    merge_adapters(ours)
    changed = [n for n, l in ours.named_modules() if isinstance(l, LoRALayer) and not torch.equal(l.base.weight, originals[n])]
    assert changed, "merge did not change any base weight"
    torch.testing.assert_close(ours(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-5)
    unmerge_adapters(ours)
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRALayer):
            torch.testing.assert_close(layer.base.weight, originals[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-5)


def test_count_parameters_matches_peft():
    model = apply_adapters(tiny_gpt2(), "lora", ["c_attn"], rank=8, alpha=16)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["score"])
    reference = peft.get_peft_model(tiny_gpt2(), config)
    trainable, _ = reference.get_nb_trainable_parameters()
    count = count_parameters(model)
    assert count.trainable == trainable
    assert count.total == sum(p.numel() for p in model.parameters())
    assert 0 < count.percent < 100 and "trainable%" in str(count)


def test_presets_and_regex_targets():
    model = apply_adapters(tiny_gpt2(), "lora", "all-linear", rank=2, alpha=2)
    assert sum(isinstance(m, LoRALayer) for m in model.modules()) == 2 * 4
    model = apply_adapters(tiny_gpt2(), "lora", r"transformer\.h\.0\.attn\.c_attn", rank=2, alpha=2)
    assert model.injected_adapters.target_modules == ["transformer.h.0.attn.c_attn"]
    model = apply_adapters(tiny_bert(), "dora", None, rank=2, alpha=2)  # default for BERT: query, value
    assert sorted({n.rsplit(".", 1)[-1] for n in model.injected_adapters.target_modules}) == ["query", "value"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rank=0), ValueError, "rank must be a positive integer"),
        (dict(rank=-2), ValueError, "rank must be a positive integer"),
        (dict(rank=2.5), ValueError, "rank must be a positive integer"),
        (dict(method="ia3"), ValueError, "unknown adapter method"),
        (dict(targets=["q_proj"]), ValueError, "candidate layers: .*attn.c_attn"),
        (dict(targets=["wte"]), ValueError, r"embedding layer 'transformer\.wte' \(Embedding\)"),
        (dict(targets=["ln_1"]), TypeError, r"ln_1 \(LayerNorm\)"),
        (dict(alpha=0), ValueError, "alpha must be positive"),
        (dict(dropout=1.0), ValueError, "dropout must be in"),
        (dict(modules_to_save=["classifier_head"]), ValueError, "matched no module"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    arguments = dict(method="lora", targets=["c_attn"], rank=4, alpha=8) | kwargs
    with pytest.raises(error, match=message):
        apply_adapters(tiny_gpt2(), **arguments)


def test_applying_twice_fails():
    model = apply_adapters(tiny_gpt2(), "lora", ["c_attn"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, "lora", ["c_attn"], rank=2, alpha=2)
