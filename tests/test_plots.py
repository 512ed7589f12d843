"""Figures from saved run records: every PNG is written, readable and skipped when it does not apply.

``write_multiseed_results`` and ``tune_runs_table`` are shared with ``test_report.py``.

The run files here are synthetic test fixtures written with the real ``RunRecorder`` (made-up numbers with
realistic magnitudes for GPT-2 124M on SST-2), so the plots are exercised through the on-disk format.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parents[1] / ".cache" / "matplotlib"))

from matplotlib.image import imread  # noqa: E402

from peft_utils import plots  # noqa: E402
from peft_utils.formatting import format_bytes, format_count, format_seconds  # noqa: E402
from peft_utils.data import load_sst2  # noqa: E402
from peft_utils.methods import METHOD_NAMES  # noqa: E402
from peft_utils.plots import style  # noqa: E402
from peft_utils.store import COMPARISON_GROUP, Results, RunRecorder, RunStore  # noqa: E402
from peft_utils.stats import ema_smooth, runs_in_group, wilson_interval  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPARISON_PNGS = {"loss.png", "accuracy.png", "cost.png", "pareto.png"}

# Fixture numbers per method: (final accuracy, train seconds, peak memory, trainable params, compute dtype).
FAKE_METHODS = {
    "full": (0.912, 610.0, 3.4e9, 124_441_344, "float32"),
    "lora": (0.901, 380.0, 1.7e9, 297_984, "bfloat16"),
    "dora": (0.905, 470.0, 1.9e9, 387_840, "bfloat16"),
    "qlora": (0.896, 560.0, 1.1e9, 297_984, "bfloat16"),
    "qdora": (0.899, 720.0, 1.2e9, 387_840, "bfloat16"),
}
TOTAL_PARAMS = 124_441_344


def _size_report(method: str, trainable: int) -> dict[str, object]:
    """A size report shaped like the training loop's: parts sum to the total."""
    if method == "full":
        parts = {"quantized_bytes": 0, "quant_state_bytes": 0, "frozen_bytes": 0, "trainable_bytes": trainable * 4}
        disk, kind = trainable * 4, "full checkpoint"
    elif method in ("qlora", "qdora"):
        parts = {"quantized_bytes": 42_467_328, "quant_state_bytes": 2_654_208, "frozen_bytes": 79_054_848,
                 "trainable_bytes": trainable * 4}
        disk, kind = 42_467_328 + 2_654_208 + 79_054_848 + trainable * 2, "4-bit base + adapter"
    else:
        parts = {"quantized_bytes": 0, "quant_state_bytes": 0, "frozen_bytes": TOTAL_PARAMS * 2,
                 "trainable_bytes": trainable * 4}
        disk, kind = trainable * 4 + 4096, "adapter"
    adapter = 0 if method == "full" else trainable
    return {**parts, "total_bytes": sum(parts.values()), "fp32_bytes": (TOTAL_PARAMS + adapter) * 4,
            "disk_bytes": disk, "disk_kind": kind}


def _write_run(results_dir: Path, run_id: str, *, method: str, group: str, accuracy: float, seconds: float,
               memory: float, trainable: int, dtype: str, rank: int = 8, alpha: int = 16, seed: int = 0,
               n_steps: int = 40, n_evals: int = 3, rng: np.random.Generator, memory_kind: str = "cuda",
               complete: bool = True, lr: float = 2e-4, n_eval: int = 872, predictions: np.ndarray | None = None,
               eval_loss: float = 0.3, **config_extra: object) -> None:
    summary_extra = {} if predictions is None else {"dev_predictions": predictions.tolist(),
                                                    "dev_probabilities": (0.1 + 0.8 * predictions).tolist()}
    with RunRecorder(results_dir, run_id) as rec:
        rec.log("config", run_id=run_id, group=group, method=method, model="gpt2 (124M)", rank=rank,
                alpha=alpha, seed=seed, epochs=n_evals, lr=lr, batch_size=32, train_size=4000,
                eval_size=n_eval, device="cuda (NVIDIA H100)", compute_dtype=dtype,
                trainable_params=trainable, total_params=TOTAL_PARAMS, size=_size_report(method, trainable),
                **config_extra)
        for step in range(1, n_steps + 1):
            loss = 0.25 + 0.45 * math.exp(-step / (n_steps / 4)) + rng.normal(0, 0.06)
            rec.log("step", step=step, epoch=step / (n_steps / n_evals), loss=loss, lr=2e-4,
                    elapsed_s=seconds * step / n_steps)
        for epoch in range(1, n_evals + 1):
            acc = accuracy - 0.03 * (n_evals - epoch) / n_evals
            rec.log("eval", step=epoch * n_steps // n_evals, epoch=epoch, accuracy=acc, loss=0.3, n=n_eval,
                    eval_time_s=2.0)
        if complete:
            rec.log("summary", train_time_s=seconds, eval_time_s=6.0, samples_per_s=4000 * n_evals / seconds,
                    tokens_per_s=4000 * n_evals * 40 / seconds, peak_memory_bytes=memory,
                    memory_kind=memory_kind, final_accuracy=accuracy, final_eval_loss=eval_loss, n_eval=n_eval,
                    steps=n_steps, **summary_extra)


def write_fake_results(results_dir: Path, methods: tuple[str, ...] = tuple(FAKE_METHODS), sweep: bool = True,
                       lora_seeds: int = 2, n_steps: int = 40) -> Path:
    """Synthetic fixture run set: the comparison methods (LoRA with several seeds) and a small sweep."""
    rng = np.random.default_rng(0)
    for method in methods:
        accuracy, seconds, memory, trainable, dtype = FAKE_METHODS[method]
        for seed in range(lora_seeds if method == "lora" else 1):
            _write_run(results_dir, f"cmp-{method}-s{seed}", method=method, group="comparison",
                       accuracy=accuracy - 0.004 * seed, seconds=seconds * (1 + 0.02 * seed), memory=memory,
                       trainable=trainable, dtype=dtype, seed=seed, n_steps=n_steps, rng=rng)
    if sweep:
        for rank in (4, 8, 16):
            for ratio in (1, 2):
                trainable = 1_536 + rank * 36_864
                _write_run(results_dir, f"sweep-r{rank}-a{rank * ratio}", method="lora", group="sweep",
                           accuracy=0.88 + 0.004 * math.log2(rank) + 0.003 * ratio, seconds=300 + 5 * rank,
                           memory=1.6e9, trainable=trainable, dtype="bfloat16", rank=rank, alpha=rank * ratio,
                           n_steps=10, n_evals=1, rng=rng)
    # An interrupted run (no summary) must be ignored by the figures.
    _write_run(results_dir, "cmp-crashed", method="lora", group="comparison", accuracy=0.1, seconds=1.0,
               memory=1.0, trainable=1, dtype="bfloat16", n_steps=5, rng=rng, complete=False)
    return results_dir


SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64)
SWEEP_RATIOS = (0.5, 1, 2, 4)
# Per method: the extra error rate over the errors every method shares (on the "hard" sentences).
MULTISEED_ERROR = {"full": 0.02, "lora": 0.035, "dora": 0.03, "qlora": 0.045}


def multiseed_predictions(labels: np.ndarray, method: str, seed: int) -> np.ndarray:
    """Predictions of a made-up run: wrong on the sentences every method finds hard (the first 10% of a fixed
    permutation) and on a method- and seed-specific random share, right elsewhere."""
    n = len(labels)
    hard = np.random.default_rng(12345).permutation(n)[: n // 10]
    wrong = np.zeros(n, dtype=bool)
    wrong[hard] = True
    wrong |= np.random.default_rng([seed, sorted(MULTISEED_ERROR).index(method)]).random(n) < MULTISEED_ERROR[method]
    return np.where(wrong, 1 - labels, labels)


def write_multiseed_results(results_dir: Path, labels: np.ndarray, seeds: tuple[int, ...] = (0, 1, 2),
                            sweep: bool = True, rslora: bool = False) -> Path:
    """A multi-seed comparison with per-sentence predictions for ``labels`` and the full rank x alpha/r grid."""
    rng = np.random.default_rng(1)
    for method in MULTISEED_ERROR:
        _, seconds, memory, trainable, dtype = FAKE_METHODS[method]
        for seed in seeds:
            predictions = multiseed_predictions(labels, method, seed)
            _write_run(results_dir, f"cmp-{method}-s{seed}", method=method, group="comparison",
                       accuracy=float((predictions == labels).mean()), seconds=seconds * (1 + 0.03 * seed),
                       memory=memory, trainable=trainable, dtype=dtype, seed=seed, n_steps=8, n_evals=2, rng=rng,
                       n_eval=len(labels), predictions=predictions, eval_labels=labels.tolist())
    if sweep:
        for seed in seeds[:2]:
            for rank in SWEEP_RANKS:
                for ratio in SWEEP_RATIOS:
                    accuracy = 0.86 + 0.004 * math.log2(rank) - 0.006 * abs(math.log2(ratio) - 1) + 0.002 * seed
                    _write_run(results_dir, f"sweep-r{rank}-a{rank * ratio:g}-s{seed}", method="lora", group="sweep",
                               accuracy=accuracy, seconds=300.0, memory=1.6e9, trainable=1_536 + rank * 36_864,
                               dtype="bfloat16", rank=rank, alpha=rank * ratio, seed=seed, n_steps=3, n_evals=1,
                               rng=rng, rslora=rslora)
    return results_dir


def tune_runs_table(methods: tuple[str, ...] = ("full", "lora", "dora"),
                    lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)) -> pd.DataFrame:
    """Learning-rate tuning runs (group "tune") as a run table; held-out accuracy peaks at a method's own rate."""
    peak = {"full": 1e-4, "lora": 1e-3, "dora": 3e-3}
    rows = []
    for method in methods:
        for seed in (0, 1):
            for lr in lrs:
                accuracy = 0.88 - 0.02 * math.log10(lr / peak[method]) ** 2 + 0.003 * seed - 0.004 * len(method)
                rows.append({"run_id": f"tune-{method}-lr{lr:g}-s{seed}", "group": "tune", "method": method,
                             "lr": lr, "seed": seed, "final_accuracy": accuracy, "final_eval_loss": 1 - accuracy,
                             "eval_split": "train-holdout", "n_eval": 500, "model": "gpt2 (124M)",
                             "train_time_s": 1.0})
    return pd.DataFrame(rows)


def _assert_png(path: Path, min_pixels: int = 400) -> None:
    assert path.is_file(), path
    image = imread(path)
    height, width = image.shape[:2]
    assert height >= min_pixels and width >= min_pixels, (path.name, image.shape)
    # A real figure has many distinct colours, not a blank canvas.
    assert np.unique(image.reshape(-1, image.shape[-1])[:: 97], axis=0).shape[0] > 20, path.name


@pytest.fixture(scope="module")
def full_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("plots")
    results_dir = write_fake_results(root / "results")
    return root / "imgs", plots.plot_all(results_dir, root / "imgs")


def test_plot_all_writes_every_figure(full_set: tuple[Path, list[Path]]) -> None:
    imgs_dir, paths = full_set
    assert {p.name for p in paths} == COMPARISON_PNGS | {"sweep.png"}
    assert all(p.parent == imgs_dir for p in paths)
    for path in paths:
        _assert_png(path)


def test_no_sweep_and_missing_methods(tmp_path: Path) -> None:
    """Without a sweep group and without full fine-tuning, the sweep is skipped and the rest still drawn."""
    results_dir = write_fake_results(tmp_path / "results", methods=("lora", "qlora"), sweep=False, lora_seeds=1,
                                     n_steps=12)
    paths = plots.plot_all(results_dir, tmp_path / "imgs")
    assert {p.name for p in paths} == COMPARISON_PNGS
    assert not (tmp_path / "imgs" / "sweep.png").exists()
    results = RunStore(results_dir).load()
    assert plots.plot_sweep(results, tmp_path / "imgs") is None


def test_robust_to_missing_optional_columns(tmp_path: Path) -> None:
    """A minimal record (no sizes, memory or evals) still gives the figures that apply, and no crash."""
    with RunRecorder(tmp_path / "results", "bare") as rec:
        rec.log("config", run_id="bare", group="comparison", method="lora")
        rec.log("step", step=1, epoch=0.5, loss=0.7, lr=1e-4, elapsed_s=1.0)
        rec.log("step", step=2, epoch=1.0, loss=0.6, lr=1e-4, elapsed_s=2.0)
        rec.log("summary", train_time_s=2.0, final_accuracy=0.8, n_eval=100)
    names = {p.name for p in plots.plot_all(tmp_path / "results", tmp_path / "imgs")}
    assert names == COMPARISON_PNGS  # the cost figure with its time panel alone, no sweep


def test_cost_figure_draws_a_panel_per_recorded_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Time, memory and size get a panel each, times as a share of full fine-tuning's; without full fine-tuning the
    slowest method is the reference, and memory of two kinds (not one quantity) is left out with a note."""
    from peft_utils.plots import cost

    drawn = []
    monkeypatch.setattr(cost, "save_with_footnote", lambda fig, path, runs, notes: drawn.append((fig, notes)) or path)
    results = RunStore(write_fake_results(tmp_path / "results", sweep=False, lora_seeds=1, n_steps=5)).load()
    cost.plot_cost(results, tmp_path)
    mixed = results.runs.assign(memory_kind=np.where(results.runs["method"] == "lora", "rss", "cuda"))
    cost.plot_cost(Results(mixed[mixed["method"] != "full"], results.steps, results.evals), tmp_path)
    (fig, _), (partial, notes) = drawn
    assert [ax.get_title(loc="left").split("\n")[0] for ax in fig.axes] == [
        "Training time, all epochs", "Peak memory during training", "What each method ships"]
    assert "10.2 min (100%)" in [text.get_text() for text in fig.axes[0].texts]  # full fine-tuning's own time
    assert "the base model in fp32: 498 MB" in fig.axes[2].get_title(loc="left")
    assert len(partial.axes) == 2 and "% of QDoRA's, the slowest" in partial.axes[0].get_title(loc="left")
    assert any(note.startswith("Peak memory not drawn") for note in notes)
    assert plots.plot_cost(Results(results.runs.iloc[0:0], results.steps, results.evals), tmp_path) is None


def test_cli_regenerates_figures(tmp_path: Path) -> None:
    results_dir = write_fake_results(tmp_path / "results", methods=("full", "lora"), sweep=False, lora_seeds=1,
                                     n_steps=12)
    # Same matplotlib config/cache folder as this process (set above, or by the Makefile): never the user's
    # home, and the subprocess does not rebuild the font cache (seconds on a busy CI machine).
    env = {**os.environ, "MPLCONFIGDIR": os.environ["MPLCONFIGDIR"]}
    done = subprocess.run([sys.executable, "-m", "peft_utils.plots", str(results_dir), str(tmp_path / "imgs")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {Path(line).name for line in done.stdout.split()} == COMPARISON_PNGS
    for name in COMPARISON_PNGS:
        _assert_png(tmp_path / "imgs" / name)


def test_cli_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.plot_all(missing, tmp_path / "imgs")
    with pytest.raises(SystemExit) as exit_info:
        plots.main([str(missing), str(tmp_path / "imgs")])
    assert exit_info.value.code == 2


def test_no_complete_run_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    _write_run(tmp_path / "results", "crashed", method="lora", group="comparison", accuracy=0.5, seconds=1.0,
               memory=1.0, trainable=1, dtype="bfloat16", n_steps=3, rng=rng, complete=False)
    with pytest.raises(ValueError, match="no complete run"):
        plots.plot_all(tmp_path / "results", tmp_path / "imgs")
    with pytest.raises(SystemExit):
        plots.main([str(tmp_path / "results"), str(tmp_path / "imgs")])
    assert "no complete run" in capsys.readouterr().err


def test_wilson_interval_matches_hand_formula() -> None:
    p, n, z = 0.9, 872, 1.96
    # Wilson score interval written out: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    low, high = wilson_interval(p, n)
    assert low == pytest.approx(center - half, abs=1e-12)
    assert high == pytest.approx(center + half, abs=1e-12)
    assert (low, high) == pytest.approx((0.87830, 0.91819), abs=5e-5)  # worked by hand
    assert low < p < high
    # Stays inside [0, 1] where the normal approximation would have zero width.
    low1, high1 = wilson_interval(1.0, 100)
    assert 0.95 < low1 < 1.0 and high1 == pytest.approx(1.0)


def test_helpers() -> None:
    assert format_bytes(497_765_376) == "498 MB"
    assert format_bytes(1_196_032) == "1.2 MB"
    assert format_bytes(3.4e9) == "3.4 GB"
    assert format_count(124_441_344) == "124M"
    assert format_count(297_984) == "298K"
    assert format_count(1_234_567) == "1.2M"
    smoothed = ema_smooth([1.0, 1.0, 1.0, 0.0], span=3)
    assert smoothed[0] == 1.0 and 0.0 < smoothed[-1] < 1.0  # bias-corrected: starts at the first value
    assert set(METHOD_NAMES) <= set(style.METHOD_COLORS) & set(style.METHOD_MARKERS)  # every method drawable
    assert len(set(style.METHOD_COLORS.values())) == len(style.METHOD_COLORS)


def test_format_bytes_binary_units_and_fixed_decimals() -> None:
    """Binary units for memory/size reports: GPT-2 Large in fp32 (774,030,080 params x 4 B) is 2.883 GiB."""
    gpt2_large_fp32 = 774_030_080 * 4
    assert gpt2_large_fp32 / 2**30 == pytest.approx(2.8835, abs=1e-4)  # the number the unit must show
    assert format_bytes(gpt2_large_fp32, binary=True, decimals=3) == "2.883 GiB"
    assert format_bytes(gpt2_large_fp32, binary=True, decimals=2) == "2.88 GiB"
    assert format_bytes(gpt2_large_fp32) == "3.1 GB"  # decimal default unchanged
    # The aligned-table style (two decimals at every unit, whole bytes below 1 KiB): 1 KiB = 1024 B, 1 MiB = 1024 KiB.
    assert [format_bytes(v, binary=True, decimals=2) for v in (0, 1023, 1024, 1536, 5 * 2**20 + 2**19, 2**40)] == [
        "0 B", "1023 B", "1.00 KiB", "1.50 KiB", "5.50 MiB", "1.00 TiB"]
    assert format_bytes(float("nan")) == format_bytes(None) == "n/a"
    assert [format_seconds(s) for s in (42.0, 600.0, 9000.0)] == ["42.0 s", "10.0 min", "2.50 h"]


def test_sweep_only_run_set(tmp_path: Path) -> None:
    """A folder holding only the sweep gives the sweep figure and no empty comparison figures."""
    write_fake_results(tmp_path / "results", methods=(), sweep=True)
    paths = plots.plot_all(tmp_path / "results", tmp_path / "imgs")
    assert [p.name for p in paths] == ["sweep.png"]
    _assert_png(paths[0])


def test_footnote_says_when_compute_dtypes_differ(tmp_path: Path) -> None:
    results_dir = write_fake_results(tmp_path / "results", methods=("full", "lora"), sweep=False, lora_seeds=1,
                                     n_steps=5)
    runs = RunStore(results_dir).load().runs
    text = " ".join(style._provenance(runs))
    assert "gpt2" in text and "cuda" in text
    assert "compute dtype: bfloat16 / float32" in text and "NOTE: the runs differ in compute dtype" in text
    same = " ".join(style._provenance(runs[runs["method"] == "lora"]))
    assert "compute dtype: bfloat16" in same and "differ" not in same


def test_footnote_names_the_hardware_and_says_when_it_differs(tmp_path: Path) -> None:
    """Times compare only within one machine: the footnote names it, and says when runs come from several."""
    results_dir = write_fake_results(tmp_path / "results", methods=("full", "lora"), sweep=False, lora_seeds=2,
                                     n_steps=5)
    runs = RunStore(results_dir).load().runs
    assert "hardware" not in " ".join(style._provenance(runs))  # not recorded: nothing claimed
    one = runs.assign(hardware="AMD EPYC, 2 threads")
    assert "hardware: AMD EPYC, 2 threads" in " ".join(style._provenance(one))
    assert "NOTE" not in " ".join(style._provenance(one.assign(compute_dtype="float32")))
    partly = runs.assign(hardware=["AMD EPYC, 2 threads"] + [None] * (len(runs) - 1))
    assert f"(not recorded for {len(runs) - 1} of {len(runs)} runs)" in " ".join(style._provenance(partly))
    several = runs.assign(hardware=["AMD EPYC, 2 threads"] + ["Intel Xeon, 2 threads"] * (len(runs) - 1))
    text = " ".join(style._provenance(several))
    assert "hardware: AMD EPYC, 2 threads / Intel Xeon, 2 threads" in text
    assert "the runs differ in hardware, so their times are not like-for-like" in text
    # runs that shared the device (``workers`` at once) took other times than runs alone
    shared = one.assign(workers=[2] + [1] * (len(runs) - 1))
    text = " ".join(style._provenance(shared))
    assert "workers: 1 / 2" in text and "the runs differ in workers, so their times are not like-for-like" in text


def test_footnote_says_what_a_bare_adapter_label_means_beside_a_bracketed_one() -> None:
    """Beside "LoRA (all-linear)" a bare "LoRA" needs saying which layers it adapts; alone it needs nothing."""
    runs = pd.DataFrame({"method": ["full", "lora", "lora", "dora"],
                         "targets": [None, None, "all-linear", "all-linear"]})
    note = "LoRA without brackets: adapters on the model's default layers"
    assert note in " ".join(style._provenance(runs))
    assert "without brackets" not in " ".join(style._provenance(runs[runs["targets"].isna()]))
    assert "without brackets" not in " ".join(style._provenance(runs[runs["method"] != "lora"]))


# --------------------------------------------------------------------------------------------------------------
# Seeds, paired differences, run groups, learning-rate tuning and the rank x alpha map
# --------------------------------------------------------------------------------------------------------------
def test_multiseed_figures_with_paired_differences(tmp_path: Path, sst2_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    labels = load_sst2(sst2_dir)["dev"]["label"].to_numpy()
    results_dir = write_multiseed_results(tmp_path / "results", labels)
    paths = plots.plot_all(results_dir, tmp_path / "imgs")
    assert {p.name for p in paths} == COMPARISON_PNGS | {"sweep.png"}
    assert "skipped" not in capsys.readouterr().err
    for path in paths:
        _assert_png(path)
    # The paired panel is drawn beside the per-method panel: the figure is much wider than without it (no labels).
    loaded = RunStore(results_dir).load()
    unlabelled = Results(loaded.runs.drop(columns="eval_labels"), loaded.steps, loaded.evals)
    without = plots.plot_accuracy(unlabelled, tmp_path / "plain")
    assert imread(tmp_path / "imgs" / "accuracy.png").shape[1] > 1.5 * imread(without).shape[1]


def test_tune_runs_never_enter_comparison_figures(tmp_path: Path) -> None:
    results_dir = write_fake_results(tmp_path / "results", methods=("full", "lora"), sweep=False, lora_seeds=1,
                                     n_steps=5)
    loaded = RunStore(results_dir).load()
    tune = tune_runs_table(("full", "lora", "dora"))
    results = Results(pd.concat([loaded.runs, tune], ignore_index=True), loaded.steps, loaded.evals)
    comparison = runs_in_group(results.runs, COMPARISON_GROUP)
    assert set(comparison["run_id"]) == set(loaded.runs["run_id"])
    assert list(style.method_summary(comparison).index) == ["full", "lora"]  # no DoRA: it was only tuned
    assert plots.plot_sweep(results, tmp_path / "imgs") is None


def test_lr_tuning_figure_and_its_absence(tmp_path: Path) -> None:
    empty = Results(pd.DataFrame({"run_id": ["a"], "group": ["comparison"], "method": ["lora"]}), pd.DataFrame(),
                    pd.DataFrame())
    assert plots.plot_lr_tuning(empty, tmp_path) is None
    path = plots.plot_lr_tuning(Results(tune_runs_table(), pd.DataFrame(), pd.DataFrame()), tmp_path)
    assert path == tmp_path / "lr_tuning.png"
    _assert_png(path)


@pytest.mark.parametrize("spread, decimals", [(0.02, 1), (0.1, 0)])
def test_lr_tuning_ticks_print_distinct_percents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spread: float,
                                                  decimals: int) -> None:
    """Scores within a point or two get one decimal (whole percents would print "90%" on three ticks); a wide
    range keeps whole percents."""
    from peft_utils.plots import grids

    drawn = []
    monkeypatch.setattr(grids, "save_with_footnote", lambda fig, path, runs, notes: drawn.append(fig) or path)
    tune = tune_runs_table(methods=("full",), lrs=(5e-5, 1e-4, 2e-4))
    tune["final_accuracy"] = 0.88 + spread * np.linspace(0, 1, len(tune))
    grids.plot_lr_tuning(Results(tune, pd.DataFrame(), pd.DataFrame()), tmp_path)
    ax = drawn[0].axes[0]
    drawn[0].draw_without_rendering()
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert len(set(ticks)) == len(ticks) > 2
    assert all(len(t.rstrip("%").partition(".")[2]) == decimals for t in ticks), ticks


def test_lr_tuning_axis_keeps_a_diverged_rate_off_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rate that sends a method to chance would stretch the axis to 50% and flatten the differences near the
    optimum: the axis stops LR_AXIS_DEPTH points below each method's best and the diverged score is written on
    the floor; without such a rate every score stays on the axis."""
    from peft_utils.plots import grids

    drawn = []
    monkeypatch.setattr(grids, "save_with_footnote", lambda fig, path, runs, notes: drawn.append((fig, notes)) or path)
    tune = tune_runs_table(methods=("full", "lora"))
    grids.plot_lr_tuning(Results(tune, pd.DataFrame(), pd.DataFrame()), tmp_path)
    tune.loc[(tune["method"] == "lora") & (tune["lr"] == 3e-3), "final_accuracy"] = 0.5
    grids.plot_lr_tuning(Results(tune, pd.DataFrame(), pd.DataFrame()), tmp_path)
    (intact, intact_notes), (diverged, diverged_notes) = [(fig.axes[0], notes) for fig, notes in drawn]
    lowest_kept = tune.loc[tune["final_accuracy"] > 0.5, "final_accuracy"].min() * 100
    assert intact.get_ylim()[0] < lowest_kept and not any("▽" in note for note in intact_notes)
    best = tune.groupby("method")["final_accuracy"].max().min() * 100
    assert best - grids.LR_AXIS_DEPTH - 1.5 < diverged.get_ylim()[0] < lowest_kept
    assert any("▽" in note and "LoRA at 3e-03: 50.0%" in note for note in diverged_notes)


def test_sweep_heatmap_full_grid_and_rslora(tmp_path: Path) -> None:
    labels = np.zeros(50, dtype=int)
    for rslora in (False, True):
        results_dir = write_multiseed_results(tmp_path / f"results-{rslora}", labels, seeds=(0,), rslora=rslora)
        path = plots.plot_sweep(RunStore(results_dir).load(), tmp_path / f"imgs-{rslora}")
        _assert_png(path)
    # Both scalings in one folder are drawn as two heatmaps, never averaged into one.
    frame = pd.concat([RunStore(tmp_path / f"results-{r}").load().runs.assign(rslora=r) for r in (False, True)])
    both = plots.plot_sweep(Results(frame, pd.DataFrame(), pd.DataFrame()), tmp_path / "imgs-both")
    assert imread(both).shape[1] > imread(tmp_path / "imgs-True" / "sweep.png").shape[1] * 1.3


@pytest.mark.parametrize(
    ("folder", "extra_pngs"),
    [("cpu-reference", {"sweep.png"}), ("cpu-fulltrain", {"lr_tuning.png"}), ("cpu-fulltrain-tune4k", {"lr_tuning.png"}),
     ("cpu-fulltrain-all-linear", {"lr_tuning.png"})],
)
def test_committed_records_regenerate(folder: str, extra_pngs: set[str], tmp_path: Path, sst2_dir: Path) -> None:
    """The committed records still draw: cpu-reference has a sweep, the full-train runs their tuning grid."""
    paths = plots.plot_all(REPO_ROOT / "results" / folder, tmp_path)
    expected = COMPARISON_PNGS | extra_pngs
    assert {p.name for p in paths} == expected
    for path in paths:
        _assert_png(path)
