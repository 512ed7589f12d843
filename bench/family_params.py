"""Default LoRA targets and trainable parameters at r = 8 for one real size of every tested family, as a Markdown table.

    python -m bench.family_params            # about 10 s on a CPU; nothing is downloaded
    python -m bench.family_params --rank 16

Configs are written by hand from the published checkpoints' config.json (shapes only: layers, widths, heads, vocab),
since nothing is downloaded; each model is built on the meta device (no memory), adapters are injected with the
family's default targets, and ``count_parameters`` counts adapter + classification head (2 labels).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from peft_utils.core.inject import apply_adapters, count_parameters
from peft_utils.core.targets import default_targets
from peft_utils.models import gpt2_config

_DECODER = dict(tie_word_embeddings=True)
# (family, checkpoint, model_type, config keywords) -- shapes from each checkpoint's config.json.
REAL_SIZES = (
    ("GPT-2", "openai-community/gpt2-large", "gpt2", None),
    ("BERT", "sentence-transformers/all-MiniLM-L6-v2", "bert", dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)),
    ("RoBERTa", "FacebookAI/roberta-base", "roberta", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50265,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    ("DistilBERT", "distilbert/distilbert-base-uncased", "distilbert", dict(
        dim=768, n_layers=6, n_heads=12, hidden_dim=3072, vocab_size=30522)),
    ("DeBERTa-v3", "microsoft/deberta-v3-base", "deberta-v2", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=128100,
        relative_attention=True, position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)),
    ("ModernBERT", "answerdotai/ModernBERT-base", "modernbert", dict(
        hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152, vocab_size=50368,
        max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128)),
    ("Llama", "meta-llama/Llama-3.2-1B", "llama", dict(_DECODER,
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256)),
    ("Llama (SmolLM2)", "HuggingFaceTB/SmolLM2-360M", "llama", dict(_DECODER,
        hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
        intermediate_size=2560, vocab_size=49152)),
    ("Qwen2", "Qwen/Qwen2.5-0.5B", "qwen2", dict(_DECODER,
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936)),
    ("Qwen3", "Qwen/Qwen3-0.6B", "qwen3", dict(_DECODER,
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936)),
    ("Mistral", "mistralai/Mistral-7B-v0.1", "mistral", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32000)),
    ("Gemma", "google/gemma-2b", "gemma", dict(
        hidden_size=2048, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        intermediate_size=16384, vocab_size=256000)),
    ("Phi-3", "microsoft/Phi-3-mini-4k-instruct", "phi3", dict(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=32064, pad_token_id=32000)),
    ("GPT-NeoX (Pythia)", "EleutherAI/pythia-410m", "gpt_neox", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=50304,
        rotary_pct=0.25)),
    ("OPT", "facebook/opt-350m", "opt", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096, vocab_size=50272,
        word_embed_proj_dim=512, max_position_embeddings=2048, do_layer_norm_before=False)),
    ("Bloom", "bigscience/bloom-560m", "bloom", dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880)),
)


def family_row(family: str, checkpoint: str, model_type: str, config_kwargs: dict | None, rank: int) -> dict:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if config_kwargs is None:
        config = gpt2_config("large", num_labels=2)
    else:
        config = AutoConfig.for_model(model_type, num_labels=2, **config_kwargs)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    total = count_parameters(model).total
    targets = default_targets(model)
    apply_adapters(model, "lora", None, rank=rank, alpha=2 * rank)
    adapter = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    count = count_parameters(model)
    return {
        "family": family, "checkpoint": checkpoint, "targets": targets, "params": total,
        "adapter": adapter, "trainable": count.trainable, "percent": 100 * count.trainable / total,
    }


def markdown(rows: list[dict], rank: int) -> str:
    lines = [
        f"| family | size (hand-built config) | default targets | parameters | LoRA r={rank} adapter | trainable (+ head) | % |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['checkpoint']} | {', '.join(f'`{t}`' for t in row['targets'])} | "
            f"{row['params'] / 1e6:,.1f}M | {row['adapter']:,} | {row['trainable']:,} | {row['percent']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    rows = [family_row(*spec, rank=args.rank) for spec in REAL_SIZES]
    print(markdown(rows, args.rank))
    return rows


if __name__ == "__main__":
    main()
