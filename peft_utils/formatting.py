"""Numbers as short readable text: byte sizes, parameter counts, durations, accuracy points, p-values.

One module, because two formatters of one quantity drift apart ("498 MB" here, "474.70 MiB" there, for one file).
"""
from __future__ import annotations

import math

# (unit, factor) from the largest down; the last unit has factor 1.
Units = tuple[tuple[str, float], ...]
DECIMAL_BYTE_UNITS: Units = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1))
BINARY_BYTE_UNITS: Units = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
_COUNT_UNITS: Units = (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1))


def format_bytes(n_bytes: float | None, *, binary: bool = False, decimals: int | None = None) -> str:
    """A byte size in the largest unit it reaches: ``"497.8 MB"`` (1 MB = 10^6 B); ``binary=True``: powers of 1024
    (``"2.88 GiB"``), in which memory is allocated and model sizes are often quoted."""
    units = BINARY_BYTE_UNITS if binary else DECIMAL_BYTE_UNITS
    return _in_largest_unit(n_bytes, units, " ", decimals)


def format_count(n: float | None) -> str:
    """Parameter counts as ``124.4M`` / ``294.9K``: exact digits are noise at this scale."""
    return _in_largest_unit(n, _COUNT_UNITS, "")


def _in_largest_unit(value: float | None, units: Units, separator: str, decimals: int | None = None) -> str:
    """``value`` in the largest unit it reaches: one decimal below 100, none above, unless ``decimals`` says; whole
    numbers in the smallest unit."""
    if value is None or not math.isfinite(value):
        return "n/a"
    unit, factor = next((unit, factor) for unit, factor in units if abs(value) >= factor or factor == 1)
    scaled = value / factor
    if factor == 1:
        return f"{scaled:.0f}{separator}{unit}".rstrip()
    if decimals is None:
        decimals = 1 if scaled < 100 else 0
    return f"{scaled:.{decimals}f}{separator}{unit}"


def format_seconds(seconds: float | None) -> str:
    """Durations as seconds, minutes or hours, whichever keeps the number short."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_points(fraction: float, signed: bool = False, decimals: int = 1) -> str:
    """A fraction in percentage points: ``-0.004`` -> ``"-0.4"``; ``signed`` (differences) writes "+" and a true
    minus sign; ``decimals=2`` where rounding would hide which side of a threshold a value lies."""
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    text = f"{100 * fraction:{'+' if signed else ''}.{decimals}f}"
    return text.replace("-", "\N{MINUS SIGN}") if signed else text


def format_p_value(p: float) -> str:
    """``p=0.61``, ``p=0.034``, ``p<0.001``: two significant digits, and no false precision for tiny values."""
    if p is None or not math.isfinite(p):
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def format_paired_difference(difference: float, low: float, high: float, p_value: float) -> str:
    """A paired accuracy difference for a figure or table: ``"-0.4 pt [-1.6, +0.8], p=0.61"`` (fractions in)."""
    return (f"{format_points(difference, signed=True)} pt [{format_points(low, signed=True)}, "
            f"{format_points(high, signed=True)}], {format_p_value(p_value)}")
