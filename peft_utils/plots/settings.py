"""``settings.png``: every adapter setting tried in one results folder (the notebook's loop: change rank or alpha,
re-run into the same folder), each its own point, so two settings are never averaged into one."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from peft_utils.methods import series_label
from peft_utils.plots.footnote import count_range, save_with_footnote
from peft_utils.plots.style import comparison_runs, method_color, method_marker, new_figure
from peft_utils.report import setting_rows
from peft_utils.store import Results


def plot_settings(results: Results, out_dir: str | Path) -> Path | None:
    """From a folder loaded with ``every_setting=True``: per adapter setting, its mean dev accuracy ± 1 sd over its
    seeds above a tick naming its rank and alpha (and id, where another setting shares both); ``None`` unless a
    series holds several settings."""
    table = setting_rows(results.runs)
    table = table[table["rank"] > 0].reset_index(drop=True)
    if not table["series"].duplicated().any():
        return None
    fig, (ax,) = new_figure(max(5.5, 0.9 * len(table) + 3), 4.6, "Settings tried in this folder")
    for series, rows in table.groupby("series", sort=False):
        ax.errorbar(rows.index, 100 * rows["accuracy"], yerr=100 * rows["accuracy_sd"].fillna(0), markersize=8,
                    fmt=method_marker(series), color=method_color(series), elinewidth=1, capsize=3,
                    label=series_label(series))
    shared = table.duplicated(["series", "rank", "alpha"], keep=False)
    ax.set_xticks(np.arange(len(table)), [f"r={row.rank:g}\nα={row.alpha:g}" + (f"\n{row.setting}" if same else "")
                                          for row, same in zip(table.itertuples(), shared)])
    ax.set(xlim=(-0.6, len(table) - 0.4), ylabel="dev accuracy, % (mean ± sd over seeds)")
    fig.legend(loc="outside right upper", fontsize=8.5, frameon=False)
    notes = [f"One point per setting, {count_range(table['n_seeds'])} seed(s) each; settings listed by "
             "peft_utils.report.settings_table."]
    return save_with_footnote(fig, Path(out_dir) / "settings.png", comparison_runs(results.runs), notes)
