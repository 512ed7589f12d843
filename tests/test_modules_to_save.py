"""What trains beside the adapters (issue 25): ``modules_to_save`` (BERT's pooler, which full fine-tuning trains and
an adapter run would leave frozen) trains in full, stays out of the 4-bit layers, ships in the peft adapter so that
peft loads it, is part of a run's identity, and is checked against the model before anything trains."""
from __future__ import annotations

import json

import pytest
import torch

from peft_utils import experiment
from peft_utils.checkpoints import CONFIG_FILE, save_trained
from peft_utils.config import make_config
from peft_utils.core.quant import is_linear4bit
from peft_utils.core.settings import AdapterSettings
from peft_utils.experiment import plan_experiment
from peft_utils.models import build_model

POOLER = AdapterSettings(rank=4, alpha=8, targets=("query", "value"), modules_to_save=("pooler",))


def _trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_pooler_trains_in_full_beside_the_adapters_and_the_head(minilm_dir, method):
    model, _ = build_model(method, minilm_dir, POOLER)
    trainable = _trainable(model)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"} <= trainable
    assert all("lora_" in n or n.startswith(("bert.pooler.", "classifier.")) for n in trainable)
    assert not is_linear4bit(model.bert.pooler.dense)  # trained in full, so never quantised
    plain, _ = build_model(method, minilm_dir, AdapterSettings(rank=4, alpha=8, targets=("query", "value")))
    assert not any(n.startswith("bert.pooler.") for n in _trainable(plain))  # the default: the head only


def test_peft_loads_the_pooler_with_the_adapter(minilm_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = build_model("lora", minilm_dir, POOLER)
    with torch.no_grad():  # a trained pooler and adapter: without them peft's model would classify differently
        model.bert.pooler.dense.weight.add_(0.05)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    save_trained(model, tokenizer, tmp_path, "lora")
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["modules_to_save"] == ["bert.pooler", "classifier"]
    batch = tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=1e-5, atol=1e-6)


def test_modules_to_save_is_checked_before_training_and_part_of_a_runs_identity(tmp_path, sst2_dir, monkeypatch):
    def smoke(**parameters):
        return make_config("smoke", data_dir=str(sst2_dir), results_dir=str(tmp_path), methods=["lora"], sweep=False,
                           train_size=16, eval_size=16, **parameters)

    with pytest.raises(ValueError, match=r"modules_to_save=\['poolr'\] for random-gpt2-tiny: \['poolr'\] matched no "
                                         r"module"):
        plan_experiment(smoke(modules_to_save=["poolr"]))
    with pytest.raises(ValueError, match=r"module transformer.h.0 holds the adapter target transformer.h.0.attn.c_attn"):
        plan_experiment(smoke(modules_to_save=["h.0"]))
    plan = plan_experiment(smoke(modules_to_save=["ln_f"]))
    assert plan.runs[0].record["modules_to_save"] == ("ln_f",)
    experiment.run_plan(plan)
    head_only = plan_experiment(smoke())  # another setting: planned beside the ln_f run, never taken for it
    assert not head_only.runs[0].complete and head_only.runs[0].run_id != plan.runs[0].run_id
    assert plan_experiment(smoke(modules_to_save=["ln_f"])).runs[0].complete
