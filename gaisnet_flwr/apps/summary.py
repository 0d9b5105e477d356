"""A picture of every run: `summary.png` next to `metrics.json`, drawn from its rows.

Four panels over the rounds: central test accuracy (one line per edge, and their mean when
there are several), bytes by link (D2D forward and backward, client-server upload; all
clusters, log scale), the simulated round latency and the simulated energy (per edge and in
total). Rounds with failed clusters are marked. Matplotlib's object API on the Agg canvas: no
pyplot, no global backend switch, imported only when a run draws its picture.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EDGE_ACCURACY = re.compile(r"^edge(\d+)/accuracy$")
LINKS = (
    ("train/d2d-bytes-fwd", "D2D forward (smashed data)"),
    ("train/d2d-bytes-bwd", "D2D backward (gradients)"),
    ("train/upload-bytes", "client-server upload (tunable modules)"),
)


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows that have `key`."""
    points = [(int(r["round"]), float(r[key])) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def edges_of(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    found = {int(m.group(1)) for r in rows for k in r if (m := EDGE_ACCURACY.match(k))}
    return sorted(found)


def plot_summary(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Draw the run's rows (metrics.json) into `path` (PNG) and return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (acc, links), (latency, energy) = fig.subplots(2, 2)
    edges = edges_of(rows)
    several = len(edges) > 1

    for e in edges:
        acc.plot(*series(rows, f"edge{e}/accuracy"), marker="o", label=f"edge {e}")
    if several:
        acc.plot(*series(rows, "accuracy"), "k--", label="mean over edges")
    elif not edges:
        acc.plot(*series(rows, "accuracy"), marker="o", label="central")
    failed = [int(r["round"]) for r in rows if r.get("failed-clusters")]
    for i, r in enumerate(failed):
        label = "round with failed clusters" if i == 0 else "_nolegend_"
        acc.axvline(r, color="red", alpha=0.3, lw=4, label=label)
    acc.set(
        title="Central test accuracy per edge",
        xlabel="round (0 = before fine-tuning)",
        ylabel="accuracy (fraction correct)",
        ylim=(0, 1.02),
    )

    for key, label in LINKS:
        rounds, values = series(rows, key)
        if values and max(values) > 0:
            links.plot(rounds, [v / 1e6 for v in values], marker="o", label=label)
    links.set(
        title="Bytes per round by link (all clusters)",
        xlabel="round",
        ylabel="MB per round (1 MB = 1e6 bytes, log scale)",
        yscale="log",
    )

    for ax, name, unit, total_key in (
        (latency, "latency", "s", "train/round-latency-s"),
        (energy, "energy", "J", "train/energy-j"),
    ):
        per_edge = "latency-s" if name == "latency" else "energy-j"
        if several:
            for e in edges:
                ax.plot(*series(rows, f"train/edge{e}/{per_edge}"), marker="o", label=f"edge {e}")
        total_label = "round (slowest cluster + aggregation)" if name == "latency" else "all edges"
        ax.plot(*series(rows, total_key), "k--" if several else "-o", label=total_label)
        ax.set(
            title=f"Simulated {name} per round (cost model)",
            xlabel="round",
            ylabel=f"{name} ({unit})",
        )
        top = max((float(r.get(total_key, 0.0)) for r in rows), default=0.0)
        ax.set_ylim(0, 1.35 * top if top > 0 else 1.0)  # room for the legend above the lines

    last = max((int(r["round"]) for r in rows), default=1)
    for ax in (acc, links, latency, energy):
        ax.set_xlim(-0.2, last + 0.2)  # the same rounds under each other
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    final = rows[-1] if rows else {}
    head = title or "GaisNet HFSL run"
    if "accuracy" in final and not math.isnan(float(final["accuracy"])):
        head += f": final accuracy {float(final['accuracy']):.4f} after round {final['round']}"
    fig.suptitle(head, fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
