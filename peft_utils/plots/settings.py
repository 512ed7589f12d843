"""``settings.png``: every adapter setting tried in one results folder, side by side.

Why a figure of its own: the loop the notebook is for (change rank or alpha, re-run into the same folder) leaves
several settings of a series beside each other. Every other figure draws one setting per series; this one draws each
setting as its own point, the mean over that setting's seeds alone, so two settings are never averaged into one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from peft_utils.plots.footnote import save_with_footnote
from peft_utils.plots.style import (comparison_runs, method_color, method_label, method_marker, new_figure, png_path,
                                    style_axes)
from peft_utils.report import setting_rows
from peft_utils.store import Results


def plot_settings(results: Results, out_dir: str | Path) -> Path | None:
    """``settings.png`` from a folder loaded with every setting (``RunStore.load(every_setting=True)``): one point
    per adapter setting, its mean dev accuracy ± 1 sd over its seeds, above a tick naming its rank and alpha (and its
    setting's id where another setting of the series shares both). ``None`` unless a series holds several."""
    table = setting_rows(results.runs)
    table = table[table["rank"] > 0].reset_index(drop=True)
    if not table["series"].duplicated().any():
        return None
    fig = new_figure(max(5.5, 0.9 * len(table) + 3), 4.6)
    ax = fig.add_subplot()
    for series, rows in table.groupby("series", sort=False):
        x, accuracy = rows.index.to_numpy(), 100 * rows["accuracy"]
        ax.errorbar(x, accuracy, yerr=100 * rows["accuracy_sd"].fillna(0), fmt=method_marker(series), markersize=8,
                    color=method_color(series), elinewidth=1, capsize=3, label=method_label(series))
    shared = table.duplicated(["series", "rank", "alpha"], keep=False)
    ax.set_xticks(np.arange(len(table)), [f"r={row.rank:g}\nα={row.alpha:g}" + (f"\n{row.setting}" if same else "")
                                          for row, same in zip(table.itertuples(), shared)])
    ax.set_xlim(-0.6, len(table) - 0.4)
    ax.set_ylabel("dev accuracy, % (mean ± sd over seeds)")
    fig.legend(loc="outside right upper", fontsize=8.5, frameon=False)
    style_axes(ax, "y")
    fig.suptitle("Settings tried in this folder", fontsize=13, x=0.01, ha="left")
    fewest, most = int(table["n_seeds"].min()), int(table["n_seeds"].max())
    notes = [f"One point per setting, {fewest if fewest == most else f'{fewest}-{most}'} seed(s) each; settings "
             "listed by peft_utils.report.settings_table."]
    return save_with_footnote(fig, png_path(out_dir, "settings.png"), comparison_runs(results.runs), notes)
