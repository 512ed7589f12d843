"""The loop the notebook is for (issue 37): run, change rank and alpha, re-run into the same results folder, compare.

The second run trains the new setting beside the first instead of stopping; its table and figures show the settings
asked for now; re-running the first setting trains nothing; the settings view sets both side by side; and loading
the folder never makes a rank-4 run a seed of a rank-8 series.
"""
from __future__ import annotations

import contextlib
import io
import itertools

import pandas as pd
import pytest

from peft_utils import experiment, plots, report
from peft_utils.store import RunStore, read_events

# The CLI's smoke comparison, small: full fine-tuning and LoRA, 16 rows, 2 steps each.
ARGS = ["--profile", "smoke", "--no-sweep", "--methods", "full", "lora", "--train-size", "16", "--eval-size", "16",
        "--max-length", "24"]
FULL = "comparison-full-s0-random-gpt2-tiny"
RANK_4, RANK_8 = "comparison-lora-r4-a8-s0-random-gpt2-tiny", "comparison-lora-r8-a16-s0-random-gpt2-tiny"


def _main(results, sst2_dir, *more: str) -> str:
    """``python -m peft_utils.experiment`` in this process (so that a test can watch what it draws): its output."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = experiment.main([*ARGS, *more, "--data-dir", str(sst2_dir), "--results-dir", str(results)])
    assert code == 0, printed.getvalue()[-3000:]
    return printed.getvalue()


def _table(out: str) -> list[str]:
    """The run ids of the table the CLI prints: the first cell of each line under its header, as wide as it."""
    header, *lines = out.partition(" run_id ")[2].splitlines()
    width = len(header.split()) + 1
    return [line.split()[0] for line in itertools.takewhile(lambda line: len(line.split()) == width, lines)]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, sst2_dir, gpt2_tokenizer_dir):
    """Rank 4 / alpha 8, then rank 8 / alpha 16 (recording what the second run's figures drew), then rank 4 again
    with training forbidden: (results folder, the three outputs, the runs the second run's figures drew)."""
    results = tmp_path_factory.mktemp("loop")
    drawn: list[pd.DataFrame] = []
    with pytest.MonkeyPatch.context() as patch:
        first = _main(results, sst2_dir, "--rank", "4", "--alpha", "8")
        patch.setattr(plots, "FIGURES", (*plots.FIGURES, lambda loaded, _: drawn.append(loaded.runs)))
        second = _main(results, sst2_dir, "--rank", "8", "--alpha", "16")
        patch.undo()
        patch.setattr(experiment, "train", _fail)
        third = _main(results, sst2_dir, "--rank", "4", "--alpha", "8", "--no-figures")
    return results, (first, second, third), drawn[0]


def _fail(*args, **kwargs):
    raise AssertionError("a run trained again")


def test_the_second_setting_trains_beside_the_first(loop):
    results, (first, second, _), _ = loop
    assert _table(first) == [FULL, RANK_4]
    assert f"already complete in {results}, skipped: {FULL}" in second and f"{RANK_8}: training (" in second
    assert "SettingsConflict" not in second and "other settings" not in second
    records = {path.stem: read_events(path) for path in results.glob("*.jsonl")}
    assert set(records) == {FULL, RANK_4, RANK_8}  # both settings' records remain on disk, complete
    assert all(events[-1]["event"] == "summary" for events in records.values())
    assert (records[RANK_4][0]["rank"], records[RANK_8][0]["rank"]) == (4, 8)


def test_the_second_table_and_figures_show_rank_8_only(loop):
    results, (_, second, _), drawn = loop
    assert _table(second) == [FULL, RANK_8]
    assert sorted(drawn["run_id"]) == [FULL, RANK_8]
    assert set(drawn.query("method == 'lora'")["rank"]) == {8}
    assert (results / "imgs" / "settings.png").is_file()  # the one figure of both settings


def test_rerunning_the_first_setting_trains_nothing_and_shows_it(loop):
    results, (_, _, third), _ = loop
    assert f"2 of 2 runs already complete in {results}, skipped: {FULL}, {RANK_4}" in third
    assert "training (" not in third
    assert _table(third) == [FULL, RANK_4]
    lora = RunStore(results).load().runs.query("method == 'lora'")  # the folder's view: the setting asked last
    assert list(lora["run_id"]) == [RANK_4]


def test_the_settings_view_shows_both_settings(loop):
    results, (first, second, third), _ = loop
    table = report.settings_table(results)
    lora = table[table["series"] == "lora"].set_index("rank")
    assert sorted(lora.index) == [4, 8] and list(lora.loc[[4, 8], "alpha"]) == [8, 16]
    assert list(lora.loc[[4, 8], "n_seeds"]) == [1, 1] and lora["accuracy"].between(0, 1).all()
    assert list(lora.loc[[4, 8], "shown"]) == [True, False]  # rank 4 was asked for last
    assert "Settings tried in" not in first  # one setting: nothing to compare
    for out in (second, third):
        assert "Settings tried in" in out and out.index("Settings tried in") > out.index(" run_id ")


def test_loading_never_puts_two_ranks_in_one_series(loop):
    results, _, _ = loop
    store = RunStore(results)
    assert set(store.load().runs.query("method == 'lora'")["rank"]) == {4}
    assert set(store.load([FULL, RANK_8]).runs.query("method == 'lora'")["rank"]) == {8}
    every = store.load(every_setting=True).runs.query("method == 'lora'")
    assert sorted(every["rank"]) == [4, 8] and every["setting"].nunique() == 2
    with pytest.raises(ValueError, match=rf"{RANK_4} and {RANK_8} are two settings of one 'lora' run \(rank 4 vs 8, "
                                         r"alpha 8.0 vs 16.0\), not two seeds"):
        store.load([RANK_4, RANK_8])
    summary = report.summary_table(store.load().runs)
    assert summary.loc["lora", "n_seeds"] == 1  # never averaged with the other setting


def test_the_figures_command_draws_the_setting_asked_last_and_says_so(loop, tmp_path, capsys):
    results, _, _ = loop
    assert plots.main([str(results), str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "settings.png") in out and "Settings tried in" in out
    assert "asked for last" in out
