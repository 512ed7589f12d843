"""The Pareto figure: the frontier on hand-made points (dominated methods off it, ties as the definition says), the
figure drawn from synthetic records with exactly the frontier's methods named, and skipped without its inputs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parents[1] / ".cache" / "matplotlib"))

from peft_utils import plots  # noqa: E402
from peft_utils.plots import cost  # noqa: E402
from peft_utils.plots.cost import pareto_front, plot_pareto  # noqa: E402
from peft_utils.store import Results, RunStore  # noqa: E402
from test_plots import _assert_png, write_fake_results, write_multiseed_results  # noqa: E402


# --------------------------------------------------------------------------------------------------------------
# The frontier
# --------------------------------------------------------------------------------------------------------------
def test_a_dominated_point_is_off_the_front() -> None:
    # (1, 80%) and (2, 90%) trade cost for accuracy; (3, 85%) costs more than (2, 90%) and is less accurate.
    assert pareto_front([1.0, 2.0, 3.0], [0.80, 0.90, 0.85]).tolist() == [True, True, False]
    # The cheapest point and the most accurate one are always on it, whatever the order of the points.
    assert pareto_front([5.0, 1.0, 3.0], [0.95, 0.70, 0.60]).tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("costs", "accuracies", "front"),
    [
        ([1.0, 1.0], [0.80, 0.90], [False, True]),  # same cost: the less accurate is beaten
        ([1.0, 2.0], [0.90, 0.90], [True, False]),  # same accuracy: the costlier is beaten
        ([1.0, 1.0], [0.90, 0.90], [True, True]),  # identical: neither beats the other
        ([1.0, 1.0, 2.0], [0.90, 0.90, 0.85], [True, True, False]),  # identical pair, and one both beat
    ],
    ids=["equal-cost", "equal-accuracy", "identical", "identical-pair-and-dominated"],
)
def test_ties(costs: list[float], accuracies: list[float], front: list[bool]) -> None:
    assert pareto_front(costs, accuracies).tolist() == front


def test_missing_values_are_neither_on_the_front_nor_beat_anything() -> None:
    # A method whose cost was not recorded (NaN) would beat everything if NaN compared as cheap.
    assert pareto_front([np.nan, 1.0, 2.0], [0.99, 0.80, 0.70]).tolist() == [False, True, False]
    assert pareto_front([0.5, 1.0], [np.nan, 0.80]).tolist() == [False, True]


def test_the_front_is_exactly_the_undominated_points() -> None:
    """On random points (ties included): along the front, accuracy rises with cost; every point off it is beaten."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        costs, accuracies = rng.integers(1, 6, 12).astype(float), rng.integers(70, 76, 12) / 100
        front = pareto_front(costs, accuracies)
        order = np.argsort(costs[front], kind="stable")
        on_front_costs, on_front_accuracies = costs[front][order], accuracies[front][order]
        assert np.all(np.diff(on_front_accuracies) >= 0) and np.all(np.diff(on_front_costs) >= 0)
        for i in np.flatnonzero(~front):
            beats = (costs <= costs[i]) & (accuracies >= accuracies[i]) & ((costs < costs[i]) | (accuracies >
                                                                                               accuracies[i]))
            assert beats.any(), (costs[i], accuracies[i])


# --------------------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def drawn_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures plot_pareto saves, kept for inspection (it returns only the file's path)."""
    figures, save = [], cost.save_with_footnote

    def keep(fig, path, runs, notes=()):
        figures.append((fig, list(notes)))
        return save(fig, path, runs, notes)

    monkeypatch.setattr(cost, "save_with_footnote", keep)
    return figures


def _title(ax) -> str:
    return ax.get_title(loc="left").split("\n")[0]


def _labelled(ax) -> set[str]:
    """The methods a panel's title names as its frontier ("frontier: LoRA: 12.0 min, Full FT: 20 min" -> both)."""
    frontier = " ".join(ax.get_title(loc="left").split("\n")[1:]).removeprefix("frontier: ")
    return {member.split(":")[0].replace("\N{NO-BREAK SPACE}", " ") for member in frontier.split(", ") if member}


def test_the_figure_names_the_frontier_of_each_cost(tmp_path: Path, drawn_figures: list) -> None:
    """The fixture's numbers (tests/test_plots.py FAKE_METHODS): on time and on shipped size QLoRA and QDoRA are
    beaten (by LoRA, and by DoRA); on memory the 4-bit methods are cheapest, so every method is on the front."""
    results = RunStore(write_fake_results(tmp_path / "results", sweep=False, lora_seeds=1, n_steps=5)).load()
    path = plot_pareto(results, tmp_path / "imgs")
    assert path == tmp_path / "imgs" / "pareto.png"
    _assert_png(path)
    (fig, _), = drawn_figures
    axes = fig.axes
    assert [_title(ax) for ax in axes] == ["vs training time", "vs peak memory", "vs shipped size"]
    assert _labelled(axes[0]) == {"Full FT", "LoRA", "DoRA"}
    assert _labelled(axes[1]) == {"Full FT", "LoRA", "DoRA", "QLoRA", "QDoRA"}
    assert _labelled(axes[2]) == {"Full FT", "LoRA", "DoRA"}
    assert axes[2].get_xscale() == "log" and axes[0].get_xscale() == "linear"  # 1.2 MB to 498 MB; 6-12 min
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[2])
    # The names sit in the titles, which the layout keeps off the data: no text is drawn inside a panel.
    assert not any(ax.texts for ax in axes)
    assert len({ax.get_title(loc="left").count("\n") for ax in axes}) == 1  # padded alike: first lines align


def test_several_seeds_draw_a_dot_each(tmp_path: Path, drawn_figures: list) -> None:
    labels = np.random.default_rng(0).integers(0, 2, 200)
    results = RunStore(write_multiseed_results(tmp_path / "results", labels, sweep=False)).load()
    _assert_png(plot_pareto(results, tmp_path / "imgs"))
    (fig, notes), = drawn_figures
    seed_dots = [c for c in fig.axes[0].collections if len(c.get_offsets()) == 3]  # one per method: 3 seeds each
    assert len(seed_dots) == 4
    assert any(note.startswith("Over a method's seeds") for note in notes)
    assert "one seed" in [t.get_text() for t in fig.legends[0].get_texts()]


def _results(**columns: list) -> Results:
    """A run table of comparison runs with the given columns, one per method in ``columns["method"]``."""
    frame = pd.DataFrame({"group": "comparison", **columns})
    frame["run_id"] = [f"run-{method}" for method in frame["method"]]
    return Results(frame, pd.DataFrame(), pd.DataFrame())


def test_skipped_without_its_inputs(tmp_path: Path) -> None:
    methods = ["full", "lora"]
    assert plot_pareto(_results(method=methods, train_time_s=[10.0, 5.0]), tmp_path) is None  # no accuracy
    assert plot_pareto(_results(method=methods, final_accuracy=[0.9, 0.8]), tmp_path) is None  # no cost at all
    tuned = _results(method=methods, final_accuracy=[0.9, 0.8], train_time_s=[10.0, 5.0]).runs.assign(group="tune")
    assert plot_pareto(Results(tuned, pd.DataFrame(), pd.DataFrame()), tmp_path) is None  # no comparison run
    assert not (tmp_path / "pareto.png").exists()


def test_only_the_recorded_costs_get_a_panel(tmp_path: Path, drawn_figures: list) -> None:
    """Time alone gives one panel; memory of two kinds (a GPU's allocations, a CPU run's RSS) gives none, and says so."""
    plot_pareto(_results(method=["full", "lora"], final_accuracy=[0.9, 0.8], train_time_s=[10.0, 5.0],
                         peak_memory_bytes=[3e9, 2e9], memory_kind=["cuda", "rss"]), tmp_path)
    (fig, notes), = drawn_figures
    assert [_title(ax) for ax in fig.axes] == ["vs training time"]
    assert _labelled(fig.axes[0]) == {"Full FT", "LoRA"}
    assert any("Peak memory not drawn" in note and "cuda, rss" in note for note in notes)


def test_two_series_close_in_cost_are_both_named(tmp_path: Path, drawn_figures: list) -> None:
    """Three series close in cost (the all-linear experiment's first seed): each panel's title names its frontier
    with each method's cost, whole on one line, however close the points lie."""
    plot_pareto(_results(method=["full", "lora:all-linear", "dora:all-linear"], n_eval=[872] * 3, memory_kind="rss",
                         final_accuracy=[0.8819, 0.8784, 0.8796], train_time_s=[1490.0, 1444.0, 2364.0],
                         peak_memory_bytes=[1.64e9, 1.59e9, 1.96e9], **{"size.disk_bytes": [90.9e6, 1.4e6, 1.5e6]}),
                tmp_path)
    (fig, _), = drawn_figures
    for ax in fig.axes:
        assert _labelled(ax) == {"Full FT", "LoRA (all-linear)", "DoRA (all-linear)"} - (
            {"DoRA (all-linear)"} if _title(ax) != "vs shipped size" else set())
    assert "LoRA\N{NO-BREAK SPACE}(all-linear):\N{NO-BREAK SPACE}24.1\N{NO-BREAK SPACE}min" in fig.axes[0].get_title(
        loc="left")


def test_plot_all_draws_it() -> None:
    assert plot_pareto in plots.FIGURES
