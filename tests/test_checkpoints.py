"""Adapters in peft's format, both ways, against real peft; safe loading; merged checkpoints; saved runs; predictions.

Every round trip compares logits of two independent implementations on the same inputs: ours saved -> peft's
``PeftModel.from_pretrained``, and peft's ``save_pretrained`` -> our ``load_adapters``.
"""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from peft_utils.core.inject import apply_adapters
from peft_utils.models import random_gpt2
from peft_utils.core.layers import LoRALayer
from peft_utils.checkpoints import (
    CONFIG_FILE, WEIGHTS_FILE, export_merged, load_adapters, peft_adapter_json, save_adapters, save_trained,
    write_atomically,
)
from peft_utils.inference import predict
from peft_utils.models import hub_id, load_model, save_random_gpt2

from test_adapters import MODELS, make_inputs, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")

REL_TOL = 1e-5
VARIANTS = {"lora": dict(method="lora"), "dora": dict(method="dora"), "rslora": dict(method="lora", rslora=True)}


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> float:
    """Relative max error, as the issue states it; returns the absolute max difference for the record."""
    difference = (got - expected).abs().max().item()
    assert difference <= rel * expected.abs().max().item(), f"max logit difference {difference:.3g}"
    return difference


def randomize(model: torch.nn.Module, seed: int = 7) -> None:
    """Trained-looking adapters and head: non-zero B, magnitudes off their initial norm, a moved head."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


def ours(kind: str, variant: str, factory=None, **overrides):
    build, targets, _, _ = MODELS[kind]
    model = apply_adapters((factory or build)(), targets=targets, rank=4, alpha=8, **(VARIANTS[variant] | overrides))
    randomize(model)
    return model.eval()


def peft_made(kind: str, variant: str, base=None, **config):
    """An adapter trained (here: randomised) and saved by peft itself, task SEQ_CLS like ours."""
    build, targets, _, _ = MODELS[kind]
    options = VARIANTS[variant]
    lora = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets, use_dora=options["method"] == "dora",
        use_rslora=options.get("rslora", False), **({"fan_in_fan_out": kind == "gpt2"} | config),
    )
    model = peft.get_peft_model(base if base is not None else build(), lora)
    randomize(model)
    return model.eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in model.state_dict().items()}


def assert_refused_untouched(model: torch.nn.Module, folder, error: type[Exception], match: str) -> None:
    """Loading ``folder`` into ``model`` raises ``error`` and leaves the model exactly as it was."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapters(model, folder)
    assert is_untouched(model, before)


def is_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return (
        not any(isinstance(m, LoRALayer) for m in model.modules())
        and not hasattr(model, "injected_adapters")
        and all(p.requires_grad for p in model.parameters())
        and state.keys() == before.keys()
        and all(torch.equal(state[k], before[k]) for k in before)
    )


# ------------------------------------------------------------------------------------- ours <-> peft, 16/32-bit


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_ours_saved_loads_in_peft_with_the_same_logits(tmp_path, kind, variant):
    model = ours(kind, variant)
    ids, _ = make_inputs(MODELS[kind][3])
    save_adapters(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    assert not torch.allclose(model(input_ids=ids).logits, MODELS[kind][0]()(input_ids=ids).logits), "adapter inert"
    reference = peft.PeftModel.from_pretrained(MODELS[kind][0](), tmp_path).eval()
    assert_same_logits(reference(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.equal(load_adapters(MODELS[kind][0](), tmp_path).eval()(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_peft_saved_loads_in_ours_with_the_same_logits(tmp_path, kind, variant):
    reference = peft_made(kind, variant)
    reference.save_pretrained(tmp_path)
    model = load_adapters(MODELS[kind][0](), tmp_path).eval()
    ids, _ = make_inputs(MODELS[kind][3])
    assert not torch.allclose(reference(input_ids=ids).logits, MODELS[kind][0]()(input_ids=ids).logits), "inert"
    assert_same_logits(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert model.injected_adapters.method == VARIANTS[variant]["method"]


def test_transformers_load_adapter_reads_ours(tmp_path):
    """transformers' own PEFT integration (``model.load_adapter``) reads the folder too. LoRA only: transformers 5.23
    drops DoRA's ``lora_magnitude_vector`` (a key-renaming bug that hits adapters saved by peft itself alike)."""
    model = ours("bert", "lora")
    save_adapters(model, tmp_path)
    base = tiny_bert()
    base.load_adapter(str(tmp_path))
    ids, _ = make_inputs(120)
    assert_same_logits(base.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_saved_config_names_the_base_model(tmp_path, gpt2_tokenizer_dir, minilm_dir):
    folder = save_random_gpt2(tmp_path / "base", gpt2_tokenizer_dir)
    model, _ = load_model(folder)
    assert peft_adapter_json(apply_adapters(model, "lora", ["c_attn"]))["base_model_name_or_path"] == str(folder)
    assert peft_adapter_json(apply_adapters(tiny_gpt2(), "lora", ["c_attn"]))["base_model_name_or_path"] is None
    for name in ("minilm", minilm_dir, "sentence-transformers/all-MiniLM-L6-v2"):
        assert hub_id(name) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("openai-community/gpt2-large") == "openai-community/gpt2-large"


# ------------------------------------------------------------------------------------------------ 4-bit (NF4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer_dir):
    return save_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), gpt2_tokenizer_dir, "tiny", seed=0)


def quantized(tiny_dir):
    return load_model(tiny_dir, quantized=True, device_map={"": "cpu"})[0].eval()


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_4bit_round_trips_with_peft_on_the_same_4bit_base(tmp_path, tiny_dir, variant):
    pytest.importorskip("bitsandbytes")
    ids, _ = make_inputs(50257)
    model = ours("gpt2", variant, factory=lambda: quantized(tiny_dir))
    save_adapters(model, tmp_path / "ours")
    reference = peft.PeftModel.from_pretrained(quantized(tiny_dir), tmp_path / "ours").eval()
    assert_same_logits(reference(input_ids=ids).logits, model(input_ids=ids).logits)

    trained_by_peft = peft_made("gpt2", variant, base=quantized(tiny_dir), fan_in_fan_out=False)
    trained_by_peft.save_pretrained(tmp_path / "peft")
    loaded = load_adapters(quantized(tiny_dir), tmp_path / "peft").eval()
    assert_same_logits(loaded(input_ids=ids).logits, trained_by_peft(input_ids=ids).logits)


def test_a_4bit_gpt2_adapter_loads_on_the_full_precision_base_without_a_warning(tmp_path, tiny_dir):
    """fan_in_fan_out describes the architecture (GPT-2's Conv1D), not the Linear4bit layers a 4-bit model holds in
    its place: peft loading the adapter onto the usual full-precision base then has nothing to correct or warn
    about, and the same logits come out as from the adapter trained on that base's layout."""
    pytest.importorskip("bitsandbytes")
    model = ours("gpt2", "lora", factory=lambda: quantized(tiny_dir))
    save_adapters(model, tmp_path / "qlora")
    assert json.loads((tmp_path / "qlora" / CONFIG_FILE).read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft.PeftModel.from_pretrained(load_model(tiny_dir)[0], tmp_path / "qlora")


# ------------------------------------------------------------------------------------------------ refusals


def edit_config(folder, **changes):
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(peft_type="IA3"), "peft_type='IA3'"),
        (dict(task_type="CAUSAL_LM"), "task_type='CAUSAL_LM'"),
        (dict(rank_pattern={"c_attn": 2}), "rank_pattern="),
        (dict(alpha_pattern={"c_attn": 2}), "alpha_pattern="),
        (dict(lora_bias=True), "lora_bias=True"),
        (dict(layer_replication=[[0, 1]]), "layer_replication="),
        (dict(bias="all"), "bias='all'"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (dict(target_modules="all-linear"), "target_modules='all-linear'"),
    ],
)
def test_what_our_layers_cannot_represent_is_refused_by_name(tmp_path, change, message):
    peft_made("gpt2", "lora").save_pretrained(tmp_path)
    edit_config(tmp_path, **change)
    assert_refused_untouched(tiny_gpt2(), tmp_path, ValueError, f"cannot load with peft_utils.*{message}")


def test_unknown_harmless_keys_are_ignored(tmp_path):
    reference = peft_made("gpt2", "lora")
    reference.save_pretrained(tmp_path)
    edit_config(tmp_path, some_future_option={"x": 1}, peft_version="9.9.9")
    ids, _ = make_inputs(50257)
    assert_same_logits(load_adapters(tiny_gpt2(), tmp_path)(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_an_adapter_for_another_layer_type_is_refused(tmp_path):
    peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["wte"])).save_pretrained(tmp_path)
    assert_refused_untouched(tiny_gpt2(), tmp_path, ValueError, "targets match the embedding layer 'transformer.wte'")


def test_old_format_and_missing_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_adapters(tiny_gpt2(), tmp_path / "nothing")
    save_adapters(ours("gpt2", "lora"), tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"method": "lora", "rank": 4, "alpha": 8.0}))
    with pytest.raises(ValueError, match="peft_type=None"):
        load_adapters(tiny_gpt2(), tmp_path)


def test_an_adapter_saved_as_bin_or_a_config_that_is_not_an_object_is_one_line(tmp_path):
    bin_folder, list_folder = tmp_path / "bin", tmp_path / "list"
    peft_made("gpt2", "lora").save_pretrained(bin_folder, safe_serialization=False)
    assert_refused_untouched(tiny_gpt2(), bin_folder, FileNotFoundError,
                             rf"^{re.escape(str(bin_folder / WEIGHTS_FILE))} not found: .*\(safetensors weights\)$")
    save_adapters(ours("gpt2", "lora"), list_folder)
    (list_folder / CONFIG_FILE).write_text("[]")
    assert_refused_untouched(tiny_gpt2(), list_folder, ValueError,
                             rf"^{re.escape(str(list_folder / CONFIG_FILE))}: expected a JSON object, got a JSON list$")


@pytest.mark.parametrize(
    "saved_on, loaded_into, message",
    [
        (dict(), dict(n_layer=3), r"layer transformer\.h\.2\.attn\.c_attn matches the targets but .* no tensors"),
        (dict(n_layer=3), dict(), r"saved layer transformer\.h\.2\.attn\.c_attn has no matching layer"),
        (dict(), dict(n_embd=32), r"does not fit this model: [\w.]+: saved \(\d+, 64\), the model's is \(\d+, 32\)"),
    ],
)
def test_a_model_of_another_depth_or_width_is_refused_and_left_as_it_was(tmp_path, saved_on, loaded_into, message):
    save_adapters(ours("gpt2", "dora", factory=lambda: random_gpt2("tiny", **saved_on)), tmp_path)
    assert_refused_untouched(random_gpt2("tiny", seed=1, **loaded_into), tmp_path, ValueError, message)


def test_other_targets_or_architecture_are_refused(tmp_path):
    save_adapters(ours("gpt2", "lora"), tmp_path)
    with pytest.raises(ValueError, match=r"no module matched targets \['c_attn', 'mlp.c_fc'\]"):
        load_adapters(tiny_bert(), tmp_path)
    edit_config(tmp_path, target_modules=["c_attn"])  # the file still holds mlp.c_fc tensors
    with pytest.raises(ValueError, match=r"saved layer transformer\.h\.0\.mlp\.c_fc has no matching layer"):
        load_adapters(tiny_gpt2(), tmp_path)


def test_a_failure_while_injecting_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    import peft_utils.checkpoints as checkpoints

    save_adapters(ours("gpt2", "dora"), tmp_path)

    def inject_then_fail(model, *args, **kwargs):
        apply_adapters(model, *args, **kwargs)
        raise RuntimeError("simulated failure after injection")

    monkeypatch.setattr(checkpoints, "apply_adapters", inject_then_fail)
    assert_refused_untouched(tiny_gpt2(), tmp_path, RuntimeError, "simulated")


def test_loading_into_a_model_with_adapters_and_saving_merged_or_bare_models_fail(tmp_path):
    from peft_utils.core.inject import merge_adapters

    save_adapters(ours("gpt2", "lora"), tmp_path / "adapter")
    with pytest.raises(ValueError, match="already has adapters"):
        load_adapters(ours("gpt2", "lora"), tmp_path / "adapter")
    with pytest.raises(ValueError, match="unmerge"):
        save_adapters(merge_adapters(ours("gpt2", "lora")), tmp_path / "merged")
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(tiny_gpt2(), tmp_path / "none")


# ------------------------------------------------------------------------------------------- merged checkpoints


def pipeline_logits(folder, texts):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(folder), function_to_apply="none", top_k=None, device="cpu")
    rows = classify(list(texts))
    return torch.tensor([[next(s["score"] for s in row if s["label"] == f"LABEL_{i}") for i in range(2)] for row in rows])


def own_logits(model, tokenizer, texts):
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


TEXTS = ("a gripping , beautifully acted film", "dull , predictable and far too long", "fine")


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merged_export_equals_the_unmerged_model_through_pipeline(tmp_path, tiny_dir, minilm_dir, variant):
    for source, targets in ((tiny_dir, ["c_attn", "mlp.c_fc"]), (minilm_dir, ["query", "value"])):
        model, tokenizer = load_model(source)
        apply_adapters(model, VARIANTS[variant]["method"], targets, rank=4, alpha=8)
        randomize(model)
        report = export_merged(model, tokenizer, tmp_path / source.name)
        assert report.max_logit_diff < 1e-4
        assert_same_logits(pipeline_logits(report.folder, TEXTS), own_logits(model, tokenizer, TEXTS), rel=1e-4)
        assert any(isinstance(m, LoRALayer) and not m.merged for m in model.modules()), "the model was changed"


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_4bit_merged_export_is_dequantised_and_close_to_the_4bit_model(tmp_path, tiny_dir, variant):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pytest.importorskip("bitsandbytes")
    model = ours("gpt2", variant, factory=lambda: quantized(tiny_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    report = export_merged(model, tokenizer, tmp_path)
    assert report.max_logit_diff < 1e-4  # float32 compute on CPU: only summation order differs
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not hasattr(plain.config, "quantization_config") and plain.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    assert_same_logits(pipeline_logits(tmp_path, TEXTS), own_logits(model, tokenizer, TEXTS), rel=1e-4)


# --------------------------------------------------------------------------------------- saved runs, predictions


def test_save_trained_and_predict_through_the_standard_api(tmp_path, tiny_dir):
    sentences = list(TEXTS)
    for method in ("full", "dora"):
        model, tokenizer = load_model(tiny_dir)
        if method != "full":
            apply_adapters(model, method, ["c_attn"], rank=4, alpha=8)
        randomize(model)
        folder = tmp_path / method
        size = save_trained(model, tokenizer, folder, method)
        shipped = [WEIGHTS_FILE, CONFIG_FILE] if method != "full" else ["model.safetensors", "config.json"]
        assert size == sum((folder / name).stat().st_size for name in shipped)
        table = predict(folder, sentences)
        expected = own_logits(model, tokenizer, sentences).softmax(dim=-1)
        assert list(table.columns) == ["sentence", "label", "p_positive"] and list(table["sentence"]) == sentences
        torch.testing.assert_close(torch.tensor(table["p_positive"].tolist()), expected[:, 1], rtol=1e-5, atol=1e-6)
        assert list(table["label"]) == [("negative", "positive")[i] for i in expected.argmax(dim=-1).tolist()]
    with pytest.raises(ValueError, match="method 'full' but the model has adapters"):
        save_trained(model, tokenizer, tmp_path / "wrong", "full")


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    import os

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    replace, calls = os.replace, []

    def second_rename_fails(source, target):  # the first moves the old folder aside, the second swaps the new in
        calls.append(source)
        if len(calls) == 2:
            raise OSError("simulated failure of the swap")
        replace(source, target)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="simulated"):
        write_atomically(folder, lambda staging: (staging / "new.txt").write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (folder / "old.txt").read_text() == "old"
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
