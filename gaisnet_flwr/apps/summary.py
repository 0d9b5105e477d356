"""A picture of every run: `summary.png` next to `metrics.json`, drawn from its rows.

Four panels over the rounds (`panels`): central test accuracy, bytes by link (D2D forward and
backward, client-server upload; all clusters, log scale), the simulated round latency and the
simulated energy. With several edges each panel but the bytes has a line per edge and a dashed
one for them all (the mean accuracy, the round's latency, the total energy), with one edge a
line for it. Rounds with failed
clusters are marked. Matplotlib's object API on the Agg canvas: no pyplot, no global backend
switch, imported only when a run draws its picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gaisnet_flwr import contract as c

Rows = Sequence[Mapping[str, Any]]
TRAIN = f"{c.TRAIN_ROW}/"


@dataclass(frozen=True)
class Panel:
    """One panel: its lines as (metrics.json key, legend label, matplotlib format), each drawn
    if the rows have it and it is not zero throughout (a log scale has no zero)."""

    title: str
    ylabel: str
    lines: list[tuple[str, str, str]]
    axis: dict[str, Any] = field(default_factory=dict)  # more of `Axes.set`
    unit: float = 1.0  # values are divided by it


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows that have `key`."""
    points = [(int(r["round"]), float(r[key])) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def panels(rows: Rows) -> list[Panel]:
    # every edge model is evaluated from round 0 on (a deployed edge: its own)
    first, suffix = (rows[0] if rows else {}), f"/{c.ACCURACY}"
    edges = [int(k[4 : -len(suffix)]) for k in first if k.startswith("edge") and k.endswith(suffix)]
    several = len(edges) > 1
    whole = "k--" if several else "-o"  # the line of all edges together

    def per_edge(group: str, key: str) -> list[tuple[str, str, str]]:
        return [(group + c.edge_key(e, key), f"edge {e}", "-o") for e in edges] if several else []

    def top(key: str) -> tuple[float, float]:  # room for the legend above the lines
        return 0.0, 1.35 * max(series(rows, key)[1], default=0.0) or 1.0

    links = [
        (TRAIN + c.D2D_FWD, "D2D forward (smashed data)", "-o"),
        (TRAIN + c.D2D_BWD, "D2D backward (gradients)", "-o"),
        (TRAIN + c.UPLOAD, "client-server upload (tunable modules)", "-o"),
    ]
    mean = "mean over edges" if several else f"edge {edges[0]}" if edges else "central"
    latency = "round (slowest cluster + aggregation)"
    return [
        Panel(
            "Central test accuracy per edge",
            "accuracy (fraction correct)",
            [*per_edge("", c.ACCURACY), (c.ACCURACY, mean, whole)],
            {"ylim": (0, 1.02)},
        ),
        Panel(
            "Bytes per round by link (all clusters)",
            "MB per round (1 MB = 1e6 bytes, log scale)",
            links,
            {"yscale": "log"},
            unit=1e6,
        ),
        Panel(
            "Simulated latency per round (cost model)",
            "latency (s)",
            [*per_edge(TRAIN, c.LATENCY), (TRAIN + c.ROUND_LATENCY, latency, whole)],
            {"ylim": top(TRAIN + c.ROUND_LATENCY)},
        ),
        Panel(
            "Simulated energy per round (cost model)",
            "energy (J)",
            [*per_edge(TRAIN, c.ENERGY), (TRAIN + c.ENERGY, "all edges", whole)],
            {"ylim": top(TRAIN + c.ENERGY)},
        ),
    ]


def plot_summary(rows: Rows, path: Path, title: str = "") -> Path:
    """Draw the run's rows (metrics.json) into `path` (PNG) and return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()  # the same rounds under each other
    if failed := [int(r["round"]) for r in rows if r.get(c.FAILED_CLUSTERS)]:
        label = "round with failed clusters"
        axes[0].vlines(failed, 0, 1.02, color="red", alpha=0.3, lw=4, label=label)
    for ax, panel in zip(axes, panels(rows), strict=True):
        for key, label, style in panel.lines:
            rounds, values = series(rows, key)
            if any(values):
                ax.plot(rounds, [v / panel.unit for v in values], style, label=label)
        ax.set(title=panel.title, ylabel=panel.ylabel, **panel.axis)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    axes[0].set_xlim(-0.2, max((int(r["round"]) for r in rows), default=1) + 0.2)
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    fig.supxlabel("round (0 = before fine-tuning)")
    head = title or "GaisNet HFSL run"
    final = rows[-1] if rows else {}
    if not math.isnan(final.get(c.ACCURACY, math.nan)):
        head += f": final accuracy {final[c.ACCURACY]:.4f} after round {final['round']}"
    fig.suptitle(head, fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
