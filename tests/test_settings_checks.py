"""One line for every mistake (issue 27), part two: parameters checked by name wherever they come in (the API and
the notebook's driver), settings that would have no effect refused, and a classification
head that always trains and is always saved.

Each refusal test failed on the code before the fix: a misspelt notebook parameter trained the profile's value, an
``lr_grid`` without ``lr="tune"`` or a ``sweep_ranks`` with ``sweep=False`` was ignored, and
``modules_to_save=[]`` froze the head and left it out of the saved adapter. The tests of settings that *are* used
guard the other side: a profile's values and settings that take effect are never refused.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO_ROOT
from peft_utils import experiment, run_notebook
from peft_utils.checkpoints import CONFIG_FILE, save_adapters
from peft_utils.config import make_config
from peft_utils.core.inject import apply_adapters
from peft_utils.core.layers import LoRALayer
from test_adapters import make_inputs, tiny_gpt2

RNAK = "unknown parameter(s) 'rnak' (did you mean 'rank'?)"


def _fail(*args, **kwargs):
    raise AssertionError("nothing may start, train or be built after a refused input")


# ------------------------------------------------------------------------------------------- 1. names


def test_a_misspelt_parameter_names_the_closest_one():
    with pytest.raises(ValueError) as error:
        make_config("cpu", rnak=16)
    assert str(error.value) == RNAK


def test_the_notebook_driver_refuses_a_misspelt_parameter_before_any_kernel(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(kwargs["parameters"]))
    notebook, executed = REPO_ROOT / "peft.ipynb", tmp_path / "out.ipynb"
    with pytest.raises(ValueError) as error:
        run_notebook.execute_notebook(notebook, executed, {"profile": "smoke", "rnak": 16})
    assert str(error.value) == RNAK and not started
    with pytest.raises(ValueError, match="unknown parameter.*'weight_decay'"):  # not a name of the notebook's cell
        run_notebook.execute_notebook(notebook, executed, {"weight_decay": 0.1})
    run_notebook.execute_notebook(notebook, executed, {"rank": 4})
    assert started == [{"rank": 4}]


# ------------------------------------------------------------------------------------------- 2. no effect

NO_EFFECT = [
    ({"lr_grid": {"lora": [1e-3, 1e-2]}}, "lr_grid has no effect unless lr='tune'; leave it out"),
    ({"tune_train_size": 100}, "tune_train_size has no effect unless lr='tune'; leave it out"),
    ({"tune_holdout_size": 100}, "tune_holdout_size has no effect unless lr='tune'; leave it out"),
    ({"sweep": False, "sweep_ranks": [2, 4]}, "sweep_ranks has no effect while the sweep is off (sweep=False)"),
    ({"sweep": False, "sweep_alpha_ratios": [1]}, "sweep_alpha_ratios has no effect while the sweep is off"),
    ({"sweep": False, "sweep_train_size": 100}, "sweep_train_size has no effect while the sweep is off"),
    ({"sweep": False, "sweep_rslora": True}, "sweep_rslora has no effect while the sweep is off"),
    ({"methods": ["full"], "rank": 4}, "rank has no effect here: methods ['full'] include no adapter method"),
    ({"methods": ["full"], "alpha": 4}, "alpha has no effect here: methods ['full'] include no adapter method"),
    ({"methods": ["full"], "sweep": False, "dropout": 0.1},
     "dropout has no effect here: methods ['full'] include no adapter method and the sweep is off"),
    ({"methods": ["full"], "sweep": False, "targets": "attn"}, "targets has no effect here"),
    ({"methods": ["lora"], "sweep": False, "lr": {"lora": 5e-4, "dora": 5e-4}},
     "lr gives 'dora' a rate, but only ['lora'] run here; leave the others out"),
    ({"methods": ["full"], "lr": "tune", "lr_grid": {"dora": [1e-3, 1e-2]}},
     "lr_grid gives 'dora' a rate, but only ['full', 'lora'] run here"),  # the sweep runs LoRA
]


@pytest.mark.parametrize("parameters,message", NO_EFFECT)
def test_a_setting_with_no_effect_is_refused(parameters, message):
    with pytest.raises(ValueError) as error:
        make_config("cpu", **parameters)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("parameters", [
    {"sweep": False}, {"methods": ["full"], "sweep": False}, {"lr": "tune"},  # the profile's sweep, rank, grid
    {"rank": None, "lr_grid": None, "sweep_ranks": None},  # None: not given
    {"methods": ["full"], "dropout": 0.1, "lr": {"lora": 1e-3}},  # the sweep's LoRA reads them
    {"sweep": True, "sweep_ranks": [2], "sweep_rslora": True},
    {"lr": "tune", "lr_grid": {"lora": [1e-3, 1e-2]}, "tune_train_size": 100, "tune_holdout_size": 100},
    # the profile's own values, as a parameters cell showing them passes them: not a change, so not refused
    {"methods": ["full"], "sweep": False, "rank": 8, "alpha": 16, "sweep_ranks": [1, 2, 4, 8, 16, 32, 64]},
])
def test_settings_that_take_effect_and_profile_values_are_kept(parameters):
    make_config("cpu", **parameters)


def test_the_command_line_says_it_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "plan_experiment", _fail)
    code = experiment.main(["--profile", "smoke", "--results-dir", str(tmp_path), "--no-sweep", "--sweep-ranks", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: sweep_ranks has no effect while the sweep is off (sweep=False); leave it out\n"


def test_sweep_only_with_no_sweep_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "plan_experiment", _fail)
    code = experiment.main(["--profile", "smoke", "--results-dir", str(tmp_path), "--sweep-only", "--no-sweep"])
    assert code == 2 and capsys.readouterr().err == (
        "error: --sweep-only runs only the sweep and --no-sweep turns it off: give one of them\n")


# ------------------------------------------------------------------------------------------- 3. the head


def test_the_head_trains_and_is_saved_whatever_modules_to_save_lists(tmp_path):
    peft = pytest.importorskip("peft")
    model = apply_adapters(tiny_gpt2(), "lora", ["c_attn"], rank=2, alpha=4, modules_to_save=[])
    assert model.injected_adapters.saved_modules == ["score"]
    ids, labels = make_inputs(model.config.vocab_size)
    model(input_ids=ids, labels=labels).loss.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.score.weight.add_(1.0)  # a trained head: without it the saved adapter would classify differently
    save_adapters(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["modules_to_save"] == ["score"]
    reference = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    torch.testing.assert_close(reference(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_modules_to_save_adds_to_the_head_and_every_name_must_match():
    model = apply_adapters(tiny_gpt2(), "lora", ["c_attn"], rank=2, alpha=4, modules_to_save=["ln_f"])
    assert model.injected_adapters.saved_modules == ["transformer.ln_f", "score"]
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"^modules_to_save \['lm_haed'\] matched no module$"):
        apply_adapters(model, "lora", ["c_attn"], rank=2, alpha=4, modules_to_save=["ln_f", "lm_haed"])
    assert not any(isinstance(m, LoRALayer) for m in model.modules())  # refused before the model changed
    assert all(p.requires_grad for p in model.parameters())
