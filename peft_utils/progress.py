"""Training progress a person can watch: a tqdm bar on a screen or in Jupyter, plain lines where output is a log
(``PEFT_LAB_PROGRESS``: ``bar`` | ``lines`` | ``off`` overrides the choice). It must not slow training: the loss is
read (``float()`` synchronises a GPU) only when something is drawn, a few times a second at most."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from .formatting import format_seconds

MODES = ("bar", "lines", "off")
MODE_ENV = "PEFT_LAB_PROGRESS"
BAR_INTERVAL_S = 0.25
LINE_INTERVAL_S = 10.0  # a log gets one line per 10 s of a run, plus one when it ends


def progress_mode() -> str:
    """``$PEFT_LAB_PROGRESS`` if set, else a bar in a Jupyter kernel or on a terminal, and lines in a log."""
    chosen = os.environ.get(MODE_ENV, "").strip().lower()
    if chosen and chosen not in MODES:
        raise ValueError(f"{MODE_ENV}={chosen!r}: choose one of {', '.join(MODES)}")
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return chosen or ("bar" if hasattr(shell, "kernel") or sys.stderr.isatty() else "lines")


class Progress:
    """One training run's progress, named ``label`` (``run 2/5 lora``). ``steps_after``: the steps of the plan's runs
    still to train after this one, for the plan's time left at this run's pace (it firms up run by run)."""

    def __init__(self, total_steps: int, label: str, mode: str | None = None,
                 line_interval_s: float = LINE_INTERVAL_S, stream=None, steps_after: int = 0) -> None:
        self.mode, self.total, self.label, self.stream = mode or progress_mode(), total_steps, label, stream
        self.steps_after = steps_after
        self.interval_s = BAR_INTERVAL_S if self.mode == "bar" else line_interval_s
        self.step, self._loss = 0, None
        self._started = time.perf_counter()
        self._next_draw = self._started + self.interval_s
        self._bar = tqdm(total=total_steps, desc=label, dynamic_ncols=True, file=stream) if self.mode == "bar" else None

    def update(self, step: int, loss: Any) -> None:
        self.step, self._loss = step, loss
        now = time.perf_counter()
        if now >= self._next_draw:
            self._next_draw = now + self.interval_s
            self._draw(now)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(f"{self.label} | {line}", file=self.stream)
        elif self.mode == "lines":
            print(f"{self.label} | {line}", file=self.stream, flush=True)

    def close(self) -> None:
        self._draw(time.perf_counter(), final=True)
        if self._bar is not None:
            self._bar.close()

    def _draw(self, now: float, final: bool = False) -> None:
        """The bar, with the loss and the plan's time left after it, or a line: ``step 40/250 (16%) | 3.1 steps/s |
        loss 0.6931 | ETA 67.7 s | plan ETA 2.1 h`` (``done ... in`` once finished)."""
        if self.mode == "off":
            return
        elapsed = now - self._started
        rate = self.step / elapsed if elapsed > 0 else 0.0
        left = self.total - self.step
        loss = [] if self._loss is None else [f"loss {float(self._loss):.4f}"]
        plan_eta = ([f"plan ETA {format_seconds((left + self.steps_after) / rate)}"]
                    if rate > 0 and not final and self.steps_after else [])
        if self._bar is not None:  # a bar shows the run's own time left
            self._bar.update(self.step - self._bar.n)
            self._bar.set_postfix_str(" | ".join(loss + plan_eta))  # and redraws
        else:
            head = (f"done {self.step} steps in {format_seconds(elapsed)}" if final else
                    f"step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%)")
            eta = [f"ETA {format_seconds(left / rate)}"] if rate > 0 and not final else []
            print(" | ".join([self.label, head, f"{rate:.2f} steps/s", *loss, *eta, *plan_eta]),
                  file=self.stream, flush=True)
