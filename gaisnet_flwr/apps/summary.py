"""A picture of every run: `summary.png` next to `metrics.json`, drawn from its rows.

Four panels over the rounds: central test accuracy (one line per edge, and their mean when
there are several), bytes by link (D2D forward and backward, client-server upload; all
clusters, log scale), the simulated round latency and the simulated energy (per edge and in
total). Rounds with failed clusters are marked. Matplotlib's object API on the Agg canvas: no
pyplot, no global backend switch, imported only when a run draws its picture.

A run's picture can be drawn again from its rows (after the drawing changed, or for a run
whose folder kept only metrics.csv):

    python -m gaisnet_flwr.apps.summary outputs/<run>/metrics.json [--out PNG] [--title TITLE]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gaisnet_flwr import contract as c

TRAIN = f"{c.TRAIN_ROW}/"
LINKS = (
    (c.D2D_FWD, "D2D forward (smashed data)"),
    (c.D2D_BWD, "D2D backward (gradients)"),
    (c.UPLOAD, "client-server upload (tunable modules)"),
)
# the cost panels: (name, unit, an edge's train metric, the round's, the round's label)
COSTS = (
    ("latency", "s", c.LATENCY, c.ROUND_LATENCY, "round (slowest cluster + aggregation)"),
    ("energy", "J", c.ENERGY, c.ENERGY, "all edges"),
)


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows that have `key`."""
    points = [(int(r["round"]), float(r[key])) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_summary(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Draw the run's rows (metrics.json) into `path` (PNG) and return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    # the same rounds under each other
    (acc, links), (latency, energy) = fig.subplots(2, 2, sharex=True)
    # every edge model is evaluated from round 0 on (a deployed edge: its own)
    first, suffix = (rows[0] if rows else {}), f"/{c.ACCURACY}"
    edges = [int(k[4 : -len(suffix)]) for k in first if k.startswith("edge") and k.endswith(suffix)]
    several = len(edges) > 1

    for e in edges:
        acc.plot(*series(rows, c.edge_key(e, c.ACCURACY)), "-o", label=f"edge {e}")
    if several or not edges:
        label = "mean over edges" if several else "central"
        acc.plot(*series(rows, c.ACCURACY), "k--" if several else "-o", label=label)
    if failed := [int(r["round"]) for r in rows if r.get(c.FAILED_CLUSTERS)]:
        label = "round with failed clusters"
        acc.vlines(failed, 0, 1.02, color="red", alpha=0.3, lw=4, label=label)
    acc.set(
        title="Central test accuracy per edge",
        ylabel="accuracy (fraction correct)",
        ylim=(0, 1.02),
    )

    for key, label in LINKS:
        rounds, values = series(rows, TRAIN + key)
        if any(values):  # a log scale has no zero
            links.plot(rounds, [v / 1e6 for v in values], "-o", label=label)
    links.set(
        title="Bytes per round by link (all clusters)",
        ylabel="MB per round (1 MB = 1e6 bytes, log scale)",
        yscale="log",
    )

    for ax, (name, unit, per_edge, total, label) in zip((latency, energy), COSTS, strict=True):
        for e in edges if several else []:
            ax.plot(*series(rows, TRAIN + c.edge_key(e, per_edge)), "-o", label=f"edge {e}")
        rounds, values = series(rows, TRAIN + total)
        ax.plot(rounds, values, "k--" if several else "-o", label=label)
        top = 1.35 * max(values, default=0.0)  # room for the legend above the lines
        ax.set(
            title=f"Simulated {name} per round (cost model)",
            ylabel=f"{name} ({unit})",
            ylim=(0, top or 1.0),
        )

    latency.set_xlim(-0.2, max((int(r["round"]) for r in rows), default=1) + 0.2)
    latency.xaxis.get_major_locator().set_params(integer=True)
    fig.supxlabel("round (0 = before fine-tuning)")
    for ax in (acc, links, latency, energy):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    head = title or "GaisNet HFSL run"
    final = rows[-1] if rows else {}
    if not math.isnan(final.get(c.ACCURACY, math.nan)):
        head += f": final accuracy {final[c.ACCURACY]:.4f} after round {final['round']}"
    fig.suptitle(head, fontsize=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A run's rows from its metrics.json, or from its metrics.csv (a cell as an int or float
    where it is one, an empty cell left out: the row did not have that key)."""
    if path.suffix == ".json":
        rows: list[dict[str, Any]] = json.loads(path.read_text())
        return rows
    with path.open(newline="") as f:
        return [{k: _value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _value(text: str) -> Any:
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gaisnet_flwr.apps.summary",
        description="Draw a run's summary.png again from its metrics.json or metrics.csv.",
    )
    parser.add_argument("metrics", type=Path, help="the run's metrics.json or metrics.csv")
    parser.add_argument("--out", type=Path, help="the picture (default: summary.png beside it)")
    parser.add_argument("--title", help="the picture's title (default: the run folder's name)")
    args = parser.parse_args(argv)
    if args.metrics.suffix not in (".json", ".csv") or not args.metrics.is_file():
        parser.error(f"{args.metrics} is not a run's metrics.json or metrics.csv file")
    out = args.out or args.metrics.with_name("summary.png")
    title = args.title if args.title is not None else args.metrics.resolve().parent.name
    print(plot_summary(read_rows(args.metrics), out, title))


if __name__ == "__main__":
    main()
