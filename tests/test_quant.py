"""4-bit (QLoRA / QDoRA): NF4 numbers, our adapters over bitsandbytes ``Linear4bit`` against dense and peft, CPU
training, size accounting and error messages. Everything runs on CPU with tiny random GPT-2 models."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from peft_utils.checkpoints import save_adapters
from peft_utils.core.inject import apply_adapters
from peft_utils.core.layers import DoRALayer, LoRALayer, base_weight
from peft_utils.core.loop import enable_gradient_checkpointing
from peft_utils.core.quant import prepare_for_kbit_training, require_bitsandbytes
from peft_utils.models import load_model, save_random_gpt2
from peft_utils.sizes import SIZE_KEYS, model_size, nf4_bits_per_weight

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")
peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
CPU = {"": "cpu"}  # explicit, so the tests run the CPU path even on a machine with a GPU
# Per quantised layer, beside the n/2 packed bytes and the blockwise absmax: the 16-entry NF4 table and the 256-entry
# nested table (float32 each) and the float32 offset; ceil() on the nested blocks adds at most one float32 more.
TABLE_BYTES = 16 * 4 + 256 * 4 + 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """A random tiny GPT-2 classifier (n_embd=64: a multiple of the blocksize) with the real tokenizer, on disk."""
    return save_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), gpt2_tokenizer_dir, "tiny", seed=0)


def load(path, **kwargs):
    model, tokenizer = load_model(path, quantized=True, device_map=CPU, **kwargs)
    return model, tokenizer


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def linear4bit(weight: torch.Tensor, bias: torch.Tensor, double_quant: bool = True):
    """A bnb Linear4bit quantised from ``weight`` (out, in) the documented way: moving it to a device."""
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu")


# ---------------------------------------------------------------------------------------------------- NF4 numbers


def test_nf4_round_trip_error_and_double_quant_storage():
    torch.manual_seed(0)
    weight = torch.randn(768, 2304)
    n = weight.numel()
    errors, state_bytes = {}, {}
    for double_quant in (False, True):
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        restored = bnbf.dequantize_4bit(packed, state)
        errors[double_quant] = ((restored - weight).norm() / weight.norm()).item()
        assert packed.numel() * packed.element_size() == n // 2
        tensors = [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code] if double_quant else [])
        state_bytes[double_quant] = sum(t.numel() * t.element_size() for t in tensors)
    # NF4 on a Gaussian, blocksize 64: ~9.2% relative Frobenius error (measured 0.0920); double quantisation of
    # the absmax adds almost nothing.
    assert 0.090 < errors[False] < 0.094
    assert abs(errors[True] - errors[False]) < 0.001
    # float32 absmax per 64 weights, vs uint8 absmax + one float32 per 256 blocks (+ tables and offset).
    assert state_bytes[False] == n // 64 * 4 + 16 * 4
    assert state_bytes[True] == n // 64 + -(-n // (64 * 256)) * 4 + TABLE_BYTES
    assert state_bytes[True] < state_bytes[False] / 3


def test_bits_per_weight():
    assert nf4_bits_per_weight(64, double_quant=False) == 4.5
    assert nf4_bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert nf4_bits_per_weight() == pytest.approx(4.127, abs=1e-3)
    assert nf4_bits_per_weight(128, double_quant=False) == 4.25


# ------------------------------------------------------------------------- adapters over Linear4bit == over dense


@pytest.mark.parametrize("method, detach", [("lora", True), ("dora", True), ("dora", False)])
def test_adapter_over_linear4bit_equals_adapter_over_dequantised_dense(method, detach, monkeypatch):
    torch.manual_seed(0)
    quantized = linear4bit(torch.randn(192, 128) * 0.05, torch.randn(192) * 0.1)
    dense = nn.Linear(128, 192)
    with torch.no_grad():
        dense.weight.copy_(bnbf.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state))
        dense.bias.copy_(quantized.bias)
    kwargs = dict(rank=4, alpha=8) | ({"detach_norm": detach} if method == "dora" else {})
    cls = DoRALayer if method == "dora" else LoRALayer
    ours_4bit, ours_dense = cls(quantized, **kwargs), cls(dense, **kwargs)
    with torch.no_grad():
        ours_4bit.lora_A.normal_(std=0.3)
        ours_4bit.lora_B.normal_(std=0.3)  # non-zero B: the update matters
        if method == "dora":
            ours_4bit.magnitude.mul_(1 + 0.2 * torch.rand(192))
        for name, parameter in ours_4bit.named_parameters():
            if not name.startswith("base."):
                ours_dense.get_parameter(name).copy_(parameter)

    calls = []
    real_matmul = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: calls.append(1) or real_matmul(*a, **k))
    x = torch.randn(3, 5, 128)
    x4, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(3, 5, 192)
    y4, yd = ours_4bit(x4), ours_dense(xd)
    (y4 * upstream).sum().backward()
    (yd * upstream).sum().backward()
    assert calls, "the base forward did not go through bitsandbytes' 4-bit matmul"
    torch.testing.assert_close(y4, yd, **TOL)
    torch.testing.assert_close(x4.grad, xd.grad, **GRAD_TOL)  # backward through the 4-bit kernel
    trained = [n for n, p in ours_4bit.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted(["lora_A", "lora_B"] + (["magnitude"] if method == "dora" else []))
    for name in trained:
        grad_4bit, grad_dense = ours_4bit.get_parameter(name).grad, ours_dense.get_parameter(name).grad
        assert grad_4bit.abs().sum() > 0
        torch.testing.assert_close(grad_4bit, grad_dense, **GRAD_TOL)
    # No full-precision copy of the 192x128 weight stays alive in the wrapper between steps.
    dense_state = [t for n, t in ours_4bit.state_dict().items() if t.is_floating_point() and not n.startswith("base.weight")]
    assert all(t.numel() < 192 * 128 // 4 for t in dense_state), [(n, t.shape) for n, t in ours_4bit.state_dict().items()]
    assert quantized.weight.dtype == torch.uint8 and quantized.weight.grad is None


def test_dora_norm_uses_the_dequantised_weight():
    torch.manual_seed(0)
    quantized = linear4bit(torch.randn(64, 128) * 0.05, torch.zeros(64))
    layer = DoRALayer(quantized, rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    dequantised = bnbf.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    expected = (dequantised + layer.delta_weight()).norm(dim=1)
    torch.testing.assert_close(layer.weight_norm(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_weight(quantized), dequantised, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- against peft, same 4-bit model


def build_quantized_pair(path, method: str, rank: int = 4, alpha: float = 8.0):
    """The same tiny GPT-2 loaded in 4-bit twice: ours on one, peft's on the other, with identical A, B (and m)."""
    targets = ["c_attn", "mlp.c_fc"]
    ours, _ = load(path)
    ours = apply_adapters(prepare_for_kbit_training(ours), method, targets, rank, alpha)
    reference, _ = load(path)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=method == "dora",
                             modules_to_save=["score"])
    reference = peft.get_peft_model(reference, config)
    generator = torch.Generator().manual_seed(7)
    for name, layer in ours.named_modules():
        if not isinstance(layer, LoRALayer):
            continue
        peft_layer = reference.base_model.model.get_submodule(name)
        assert type(peft_layer.get_base_layer()).__name__ == "Linear4bit"
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
            if isinstance(layer, DoRALayer):
                layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=generator))
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            if isinstance(layer, DoRALayer):
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return ours.eval(), reference.eval()  # eval: the random model's own dropouts off


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_qdora_match_peft_on_the_same_4bit_model(tiny_dir, method):
    ours, reference = build_quantized_pair(tiny_dir, method)
    ids, labels = torch.randint(0, 50000, (3, 9), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1])
    out_ours, out_ref = ours(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, **TOL)
    out_ours.loss.backward()
    out_ref.loss.backward()
    pairs = []
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRALayer):
            peft_layer = reference.base_model.model.get_submodule(name)
            pairs += [(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad),
                      (layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad)]
            if isinstance(layer, DoRALayer):
                pairs.append((layer.magnitude.grad, peft_layer.lora_magnitude_vector["default"].weight.grad))
    assert len(pairs) == 4 * (3 if method == "dora" else 2)
    for grad_ours, grad_ref in pairs:
        assert grad_ours is not None and grad_ours.abs().sum() > 0
        torch.testing.assert_close(grad_ours, grad_ref, **GRAD_TOL)


# ------------------------------------------------------------------------------------------------- loading, training


def test_4bit_load_layout_and_setup(tiny_dir):
    model, tokenizer = load(tiny_dir)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 4  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per block
    assert type(model.score) is nn.Linear and model.score.weight.dtype == torch.float32
    assert model.transformer.wte.weight.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token and model.config.pad_token_id == tokenizer.pad_token_id
    c_attn = model.transformer.h[0].attn.c_attn
    state = c_attn.weight.quant_state
    # GPT-2's Conv1D (in, out) became an (out, in) Linear4bit: 64 -> 192.
    assert (c_attn.in_features, c_attn.out_features) == (64, 192) and tuple(state.shape) == (192, 64)
    assert state.quant_type == "nf4" and state.nested and state.blocksize == 64 and c_attn.compute_dtype == torch.float32
    # The dequantised weight is the fp32 checkpoint's Conv1D weight, transposed, to NF4 precision.
    reference, _ = load_model(tiny_dir)
    original = reference.transformer.h[0].attn.c_attn.weight.T
    error = (base_weight(c_attn) - original).norm() / original.norm()
    assert 0.05 < error < 0.15
    ids = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits_4bit, logits_fp32 = model(**ids).logits, reference(**ids).logits
    assert logits_4bit.shape == (2, 2) and torch.allclose(logits_4bit, logits_fp32, atol=0.2)


def test_minilm_alias_loads_in_4bit_with_its_head_unquantized(minilm_dir):
    model, tokenizer = load("minilm")
    assert type(model).__name__ == "BertForSequenceClassification" and type(model.classifier) is nn.Linear
    assert len(quantized_layers(model)) == 6 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    model = apply_adapters(model, "dora", None, rank=2, alpha=4)  # BERT default targets: query, value
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.magnitude.grad is not None


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_trains_on_cpu_and_leaves_packed_weights_alone(tiny_dir, method):
    model, tokenizer = load(tiny_dir)
    packed = [(m, m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in quantized_layers(model).values()]
    model = apply_adapters(prepare_for_kbit_training(model), method, ["c_attn", "mlp.c_fc"], rank=4, alpha=8)
    batch = tokenizer(["a gripping, beautiful film", "dull and lifeless", "wonderful acting", "a total mess"],
                      padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("score.") or n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude")
                             for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    model.train()
    losses = []
    for step in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        for name, parameter in model.named_parameters():
            assert (parameter.grad is not None) == (name in trainable), name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 3:  # an evaluation in between must not change what training computes (bnb CPU repacking)
            model.eval()
            with torch.no_grad():
                model(**batch)
            model.train()
    assert losses[-1] < 0.7 * losses[0], losses
    assert len(quantized_layers(model)) == len(packed) == 8
    for layer, data, absmax in packed:
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(layer.weight.data, data) and torch.equal(layer.weight.quant_state.absmax, absmax)
        assert layer.weight.grad is None


def test_prepare_for_kbit_training(tiny_dir):
    model, _ = load(tiny_dir)
    packed = {n: m.weight.data.clone() for n, m in quantized_layers(model).items()}
    with torch.no_grad():  # as if loaded in bf16: prepare must bring the un-quantised share back to float32
        model.transformer.ln_f.to(torch.bfloat16)
        model.score.to(torch.bfloat16)
    prepare_for_kbit_training(model)
    enable_gradient_checkpointing(model)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.dtype != torch.uint8)
    for name, layer in quantized_layers(model).items():
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight.data, packed[name])
    assert model.transformer.gradient_checkpointing
    ids = torch.randint(0, 50000, (2, 6))
    model = apply_adapters(model, "lora", ["c_attn"], rank=2, alpha=4)
    prepare_for_kbit_training(model)  # again, after the adapters: they (and the head) stay trainable
    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 and model.score.weight.grad is not None


def test_prepare_does_not_upcast_float_packed_storage():
    """With a float quant_storage (used for FSDP) the packed weight *is* a bf16 tensor: it must stay as it is."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4",
                                     quant_storage=torch.bfloat16)
    model = nn.Sequential(layer.to("cpu"), nn.LayerNorm(64).to(torch.bfloat16))
    packed = model[0].weight.data.clone()
    prepare_for_kbit_training(model)
    assert model[0].weight.dtype == torch.bfloat16 and torch.equal(model[0].weight.data, packed)
    assert model[1].weight.dtype == torch.float32 and model[0].bias.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------- size report


@pytest.mark.parametrize("double_quant", [True, False])
def test_size_report_adds_up_and_matches_the_nf4_bound(tiny_dir, tmp_path, double_quant):
    model, _ = load(tiny_dir, double_quant=double_quant)
    plain = model_size(model, "full")
    fp32_model, _ = load_model(tiny_dir)
    fp32_report = model_size(fp32_model, "full")
    # Logical element counts: the 4-bit model "in fp32" is exactly the fp32 model.
    assert plain["fp32_bytes"] == fp32_report["total_bytes"] == fp32_report["fp32_bytes"] == fp32_report["disk_bytes"]
    assert fp32_report["quantized_bytes"] == fp32_report["quant_state_bytes"] == fp32_report["nf4_bound_bytes"] == 0

    model = apply_adapters(prepare_for_kbit_training(model), "lora", ["c_attn"], rank=8, alpha=16)
    file_bytes = save_adapters(model, tmp_path / "adapter")
    report = model_size(model, "qlora", saved_bytes=file_bytes)
    assert tuple(report) == SIZE_KEYS
    parts = report["quantized_bytes"] + report["quant_state_bytes"] + report["frozen_bytes"] + report["trainable_bytes"]
    assert report["total_bytes"] == parts
    assert report["disk_kind"] == "4-bit base + adapter"
    assert report["disk_bytes"] == report["quantized_bytes"] + report["quant_state_bytes"] + report["frozen_bytes"] + file_bytes

    layers = quantized_layers(model)
    n_weights = sum(int(torch.Size(m.weight.quant_state.shape).numel()) for m in layers.values())
    assert report["quantized_bytes"] == n_weights // 2
    bits = nf4_bits_per_weight(64, double_quant)
    assert report["nf4_bound_bytes"] == round(n_weights * bits / 8)
    measured = report["quantized_bytes"] + report["quant_state_bytes"]
    tables = len(layers) * (TABLE_BYTES if double_quant else 16 * 4)
    slack = measured - tables - report["nf4_bound_bytes"]  # only ceil() of the nested blocks is left
    assert 0 <= slack <= (4 * len(layers) if double_quant else 1), (measured, tables, report["nf4_bound_bytes"])
    # The quantised share is 32/bits (~7.75x with double quantisation, 7.1x without) smaller than in fp32, and the
    # fp32 model minus the 4-bit model is exactly that saving (everything else is stored alike).
    saving = report["fp32_bytes"] - report["total_bytes"]
    assert saving == 4 * n_weights - measured
    assert 4 * n_weights / (measured - tables) == pytest.approx(32 / bits, rel=2e-3)

    adapter = model_size(model, "lora", saved_bytes=file_bytes)
    assert adapter["disk_kind"] == "adapter" and adapter["disk_bytes"] == file_bytes
    tensors_only = model_size(model, "lora")["disk_bytes"]
    assert 0 < tensors_only < file_bytes  # the file adds a header and the JSON config
    assert {k: v for k, v in adapter.items() if k.startswith("disk")} != {k: v for k, v in report.items() if k.startswith("disk")}


def test_size_report_for_qdora_ships_no_derived_buffers(tiny_dir):
    model, _ = load(tiny_dir)
    model = apply_adapters(model, "dora", ["c_attn"], rank=4, alpha=8)
    report = model_size(model, "qdora")
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffers > 0  # DoRA's cached ||W0||² and merge norm: in memory, not shipped
    adapter_tensors = model_size(model, "dora")["disk_bytes"]
    assert report["disk_bytes"] == report["quantized_bytes"] + report["quant_state_bytes"] + report["frozen_bytes"] - buffers + adapter_tensors


# ---------------------------------------------------------------------------------------------------------- errors


def test_missing_bitsandbytes_says_how_to_install(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"not installed: pip install bitsandbytes==0\.50\.2"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match=r"pip install bitsandbytes==0\.50\.2"):
        load_model(tiny_dir, quantized=True, device_map=CPU)


def test_broken_bitsandbytes_says_how_to_reinstall(monkeypatch, tmp_path):
    fake = tmp_path / "fake" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake.parent))
    with pytest.raises(ImportError, match=r"failed to load \(OSError: libbitsandbytes.*pip install bitsandbytes==0\.50\.2"):
        require_bitsandbytes()


def test_model_without_quantizable_layers_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="no layer to quantise"):
        load_model(tiny_dir, quantized=True, device_map=CPU, skip_modules=["transformer"])


def test_bf16_compute_on_a_cpu_without_native_bf16_warns_loudly(tiny_dir, monkeypatch):
    monkeypatch.setattr("peft_utils.devices.cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="float32 is the CPU default"):
        model, _ = load_model(tiny_dir, quantized=True, device_map=CPU, dtype=torch.bfloat16)
    assert all(m.compute_dtype == torch.bfloat16 for m in quantized_layers(model).values())
    with pytest.warns(UserWarning, match="emulated"):
        load_model(tiny_dir, quantized=True, device_map=CPU, dtype=torch.float16)  # fp16: on every CPU
    monkeypatch.setattr("peft_utils.devices.cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16 where the CPU has it, and float32 (the default), are silent
        load_model(tiny_dir, quantized=True, device_map=CPU, dtype="bf16")
        load_model(tiny_dir, quantized=True, device_map=CPU, dtype="float32")


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(quant_type="int4"), "unknown quant_type 'int4'"), (dict(dtype="int8"), "dtype must be")],
)
def test_bad_loader_arguments(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_dir, quantized=True, device_map=CPU, **kwargs)


def test_bad_size_requests(tiny_dir):
    model, _ = load(tiny_dir)
    with pytest.raises(ValueError, match="unknown method 'ia3'"):
        model_size(model, "ia3")
    with pytest.raises(ValueError, match="model has no adapters"):
        model_size(model, "qlora")
    fp32_model, _ = load_model(tiny_dir)
    apply_adapters(fp32_model, "lora", ["c_attn"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="needs a 4-bit model"):
        model_size(fp32_model, "qlora")


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_wrapping_a_layer_repacked_for_cpu_inference_is_refused():
    torch.manual_seed(0)
    layer = linear4bit(torch.randn(64, 64), torch.zeros(64)).eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))  # bitsandbytes repacks the weight in place here
    assert layer.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="repacked by bitsandbytes for CPU"):
        LoRALayer(layer, rank=2, alpha=2)
