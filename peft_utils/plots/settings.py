"""``settings.png``: every adapter setting tried in one results folder, dev accuracy against its rank and alpha.

Why a figure of its own: the loop the notebook is for (change rank or alpha, re-run into the same folder) leaves
several settings of a series side by side. Every other figure draws one setting per series (the plan's, or the one
asked for last); this one draws each setting as its own point, the mean over that setting's seeds alone, so two
settings are compared and never averaged into one.
"""
from __future__ import annotations

from pathlib import Path

from peft_utils.plots.footnote import save_with_footnote
from peft_utils.plots.selection import comparison_runs
from peft_utils.plots.style import method_color, method_label, method_marker, new_figure, png_path, style_axes
from peft_utils.report import setting_rows
from peft_utils.store import Results


def plot_settings(results: Results, out_dir: str | Path) -> Path | None:
    """``settings.png`` from a folder loaded with every setting (``RunStore.load(every_setting=True)``): for each
    adapter series, one point per setting at its rank (log scale), its mean dev accuracy with ± 1 sd over its seeds,
    labelled with its alpha (and its setting's id where another setting of the series shares its rank and alpha).
    ``None`` unless an adapter series holds more than one setting."""
    table = setting_rows(results.runs)
    table = table[table["rank"] > 0]
    if not table["series"].duplicated().any():
        return None
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    for series, rows in table.groupby("series", sort=False):
        ax.errorbar(rows["rank"], 100 * rows["accuracy"], yerr=100 * rows["accuracy_sd"].fillna(0), fmt="none",
                    ecolor=method_color(series), elinewidth=1, capsize=3)
        ax.scatter(rows["rank"], 100 * rows["accuracy"], s=60, color=method_color(series),
                   marker=method_marker(series), label=method_label(series), zorder=3)
        shared = rows.duplicated(["rank", "alpha"], keep=False)
        for row, same_place in zip(rows.itertuples(), shared):
            text = f"α={row.alpha:g}" + (f" ({row.setting})" if same_place else "")
            ax.annotate(text, (row.rank, 100 * row.accuracy), xytext=(6, 4), textcoords="offset points", fontsize=8)
    ranks = sorted(table["rank"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [f"{r:g}" for r in ranks])
    ax.set_xlim(ranks[0] / 1.6, ranks[-1] * 1.6)
    ax.set_xlabel("rank r")
    ax.set_ylabel("dev accuracy, % (mean ± sd over seeds)")
    ax.legend(fontsize=8, frameon=False)
    style_axes(ax, "y")
    fig.suptitle("Settings tried in this folder", fontsize=13, x=0.01, ha="left")
    fewest, most = int(table["n_seeds"].min()), int(table["n_seeds"].max())
    seeds = f"{fewest}" if fewest == most else f"{fewest}-{most}"
    notes = [f"One point per setting, {seeds} seed(s) each; settings listed by peft_utils.report.settings_table."]
    return save_with_footnote(fig, png_path(out_dir, "settings.png"), comparison_runs(results.runs), notes)
