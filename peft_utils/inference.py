"""Predictions on your own sentences from what a run saved, loaded through transformers and peft only (never
peft_utils' own layers), so what works here works in any other project."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from .checkpoints import CONFIG_FILE, WEIGHTS_FILE, check_saved, class_logits
from .config import PARAMETERS
from .data import SST2_LABEL_NAMES
from .models import load_tokenizer, resolve_model_source
from .quiet import from_pretrained_noting_new_head, loading_bars_off


def load_saved(folder: str | Path, base_model: str | Path | None = None, labels: Sequence[str] = SST2_LABEL_NAMES):
    """``(model, tokenizer)`` from a run's folder: a full checkpoint, or a peft adapter on ``base_model`` (default:
    the one it records). ``labels``: an adapter's class names in order (peft has no field for them)."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: neither a peft adapter ({CONFIG_FILE}) nor a checkpoint (config.json)")
        check_saved(folder, "config.json", "model*.safetensors")
        with loading_bars_off():
            model = AutoModelForSequenceClassification.from_pretrained(folder)
        return model, load_tokenizer(folder, model)
    from peft import PeftConfig, PeftModel

    check_saved(folder, CONFIG_FILE, WEIGHTS_FILE)
    source = base_model if base_model is not None else PeftConfig.from_pretrained(folder).base_model_name_or_path
    if not source:
        raise ValueError(f"{folder / CONFIG_FILE} records no base_model_name_or_path: pass base_model")
    source = resolve_model_source(source)
    base = from_pretrained_noting_new_head(  # its head is the adapter's, loaded next: no report about it
        AutoModelForSequenceClassification, source, announce=False, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    tokenizer = load_tokenizer(source, base)  # GPT-2: pad with EOS, and tell the model which id is padding
    return PeftModel.from_pretrained(base, folder), tokenizer


def checked_sentences(sentences: str | Iterable[str]) -> list[str]:
    """``sentences`` as a list (a string is one; a Series, array or generator several), each checked by the
    notebook's rule for ``sentences`` under its index, so the error names the bad one."""
    one = isinstance(sentences, (str, bytes)) or not isinstance(sentences, Iterable)
    items = [sentences] if one else list(sentences)
    check = PARAMETERS["sentences"].check
    if not items:
        return list(check("sentences", items))  # its "is empty" error
    return [check(f"sentences[{i}]", [item])[0] for i, item in enumerate(items)]


def predict(folder: str | Path, sentences: str | Iterable[str], base_model: str | Path | None = None,
            labels: Sequence[str] = SST2_LABEL_NAMES) -> pd.DataFrame:
    """One row per sentence (a string is one; a list, Series, array or generator several): the predicted label and
    the probability of the last label (SST-2: positive)."""
    sentences = checked_sentences(sentences)
    probabilities = class_logits(*load_saved(folder, base_model, labels), sentences).softmax(dim=-1)
    if probabilities.shape[-1] != len(labels):
        raise ValueError(f"the model has {probabilities.shape[-1]} labels but labels names {len(labels)}: {list(labels)}")
    return pd.DataFrame({
        "sentence": sentences,
        "label": [labels[i] for i in probabilities.argmax(dim=-1).tolist()],
        f"p_{labels[-1]}": probabilities[:, -1].tolist(),
    })


def predict_runs(results_dir: str | Path, run_ids: Sequence[str], sentences: str | Iterable[str]) -> pd.DataFrame:
    """Each sentence under each run's saved result, one column per run: the probability of the last class with two
    classes (SST-2: positive), the predicted class's name with more."""
    from .store import RunStore

    store, sentences = RunStore(results_dir), checked_sentences(sentences)  # read once: a generator serves every run
    columns = {}
    for rid in run_ids:
        labels = store.events(rid)[0]["labels"]
        table = predict(store.saved_dir(rid), sentences, labels=labels)
        columns[rid] = table.iloc[:, -1 if len(labels) == 2 else 1].to_numpy()
    return pd.DataFrame({"sentence": sentences, **columns})
