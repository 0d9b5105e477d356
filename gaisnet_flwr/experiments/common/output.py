"""What an experiment writes: CSV files, markdown tables, line plots (PNG)."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaisnet_flwr.experiments.common.stats import mean_sd


def pyplot() -> Any:
    """matplotlib's pyplot, imported when a figure is drawn (not on import: a command's --help
    stays instant), drawing to files only: headless on servers and in CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: floats to `digits` decimals, NaN/None as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through `fmt`."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells: {rows}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-o"
    sd: Sequence[float] | None = None  # drawn as a band of mean ± sd over seeds


def seed_series(
    label: str, x: Sequence[float], runs: Sequence[Sequence[float]], style: str = "-o"
) -> Series:
    """The mean over seeds of `runs` (one sequence per seed), with its sd band."""
    stats = [mean_sd(values) for values in zip(*runs, strict=True)]
    return Series(label, x, [m for m, _ in stats], style, [sd for _, sd in stats])


def line_plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Sequence[Series],
    ax: Any = None,
    ylim: tuple[float, float] | None = None,
    logy: bool = False,
) -> Path:
    """One readable line chart (title, axis labels with units, legend) saved as PNG; pass `ax`
    to draw into a panel of a larger figure instead (the caller saves it)."""
    own = ax is None
    if own:
        fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for s in series:
        (line,) = ax.plot(s.x, s.y, s.style, label=s.label, markersize=4)
        if s.sd is not None and any(s.sd):
            low = [m - d for m, d in zip(s.y, s.sd, strict=True)]
            high = [m + d for m, d in zip(s.y, s.sd, strict=True)]
            ax.fill_between(list(s.x), low, high, color=line.get_color(), alpha=0.2)
    ax.set_title(title)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, rounds, peers: whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if own:
        save(fig, path)
    return path


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def relative_links(text: str, folder: str) -> str:
    """Prefix the section's local links (images, CSVs) with its folder, for the joint report."""
    return re.sub(r"\]\((?!https?://|#|/)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", text)
