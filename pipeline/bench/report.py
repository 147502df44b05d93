"""Benchmark rows, targets and the environment they were measured in.

A `Row` is one measurement: its value, unit and, where the issue sets one, a target
(`value >= target` or `value <= target`) that yields PASS or FAIL.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    section: str
    name: str
    value: float
    unit: str = ""
    target: float | None = None
    direction: Literal[">=", "<="] = ">="
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.value >= self.target if self.direction == ">=" else self.value <= self.target
        return "PASS" if ok else "FAIL"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "verdict": self.verdict or None}


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4g}"
    return f"{value:.3e}"


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table, grouped by section."""
    header = ("section", "measurement", "value", "unit", "target", "result")
    lines = []
    for row in rows:
        target = f"{row.direction} {_fmt(row.target)}" if row.target is not None else ""
        lines.append((row.section, row.name, _fmt(row.value), row.unit, target, row.verdict))
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]

    def render(cells: tuple) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [render(header), render(tuple("-" * w for w in widths))]
    previous = None
    for row, line in zip(rows, lines, strict=True):
        if previous is not None and row.section != previous:
            out.append("")
        out.append(render(line))
        previous = row.section
    notes = [f"  [{r.section}] {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, object]:
    """Versions, threads, CPU, load and date of this run."""
    import diffusers
    import numpy
    import pyarrow
    import torch

    from pipeline.scan import native

    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "torch_threads": threads,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "native_screen": asdict(native.status()),
    }
