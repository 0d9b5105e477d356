"""Per-round results: aggregated client metrics, central evaluation, files on disk, one line.

Every round is appended to `metrics.csv` and `metrics.json` and to the run's TensorBoard events
(and MLflow run, with a tracking URI; `tracking.py`) as soon as it is known, so a run that stops
early keeps every finished round. The final tunable modules go to `final_tunable.npz`; `close`
draws `summary.png` (`summary.py`) and closes the trackers.

What a person reads while a run goes is the round in one line (`describe`); the numbers are in
the files. Flower's `Strategy.start` logs every aggregated MetricRecord whole (with 40-odd
metrics per edge, a train round's line ran to ~2,000 characters) and, at the end, every round's
metrics again ("Final results", some 70 lines a round): run.log held 46 KB for 5 rounds.
`quiet_strategy_log` drops exactly those records while the ServerApp runs: the ones Flower's
`Strategy.start` (its own source file) logs with one of the formats in `METRIC_DUMPS`.
Everything else, Flower's round markers, sampling and failure lines included, stays.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp.strategy import strategy as flower_strategy

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.summary import plot_summary
from gaisnet_flwr.apps.tracking import Tracking
from gaisnet_flwr.contract import (
    ACCURACY,
    ENERGY,
    EVALUATE_ROW,
    FAILED_CLUSTERS,
    ROUND_CPU,
    ROUND_LATENCY,
    ROUND_TIME,
    STOPPED,
    TOTAL_ENERGY,
    TOTAL_LATENCY,
    TRAIN_ROW,
    edge_key,
)
from gaisnet_flwr.deploy.shipping import write_atomic


@dataclass
class RunResult:
    """What one run produced, as the in-process run returns it (the same the files hold):
    `rows` of metrics.json (round 0 the initial model), every round's global modules
    (`edge<e>/<module>` keys), the served requests (inference.json) and, in the integrated
    mode, each round's decision (integrated.json)."""

    output_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    round_modules: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    final_modules: dict[str, np.ndarray] = field(default_factory=dict)
    served: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.json: one row per round, round 0 the initial model."""
        return self.rows

    def inference(self) -> list[dict[str, Any]]:
        """inference.json: one row per served request."""
        return self.served

    def integrated(self) -> list[dict[str, Any]]:
        """integrated.json: one row per round of the integrated mode."""
        return self.decisions

    def modules(self, server_round: int | None = None) -> dict[str, np.ndarray]:
        """The final modules, or those after round `server_round` (keys `edge<e>/...`)."""
        return self.final_modules if server_round is None else self.round_modules[server_round]

    def accuracy(self, server_round: int, edge: int | None = None) -> float:
        """The central test accuracy after `server_round`: the mean over the edges, or edge's."""
        return self._central(server_round, ACCURACY if edge is None else edge_key(edge, ACCURACY))

    def loss(self, server_round: int, edge: int | None = None) -> float:
        return self._central(server_round, "loss" if edge is None else edge_key(edge, "loss"))

    def _central(self, server_round: int, key: str) -> float:
        row = self.rows[server_round]
        if key not in row:
            evaluated = [r["round"] for r in self.rows if key in r]
            raise KeyError(
                f"round {server_round} has no {key!r}: the central evaluation ran after rounds "
                f"{evaluated} (run-config central-eval-every)"
            )
        return float(row[key])

    def train(self, server_round: int, key: str, default: Any = None) -> Any:
        """A round's aggregated train metric (`contract` keys, e.g. `contract.LATENCY`);
        `default` for round 0 (the initial model) or a metric the round lacks."""
        return self.rows[server_round].get(f"{TRAIN_ROW}/{key}", default)

    def round_time(self, server_round: int) -> float:
        """The round's measured wall time in the ServerApp (0 for round 0)."""
        return float(self.rows[server_round].get(ROUND_TIME, 0.0))

    def round_cpu(self, server_round: int) -> float:
        """The ServerApp process's CPU time over the round (0 for round 0)."""
        return float(self.rows[server_round].get(ROUND_CPU, 0.0))


class RoundRecorder:
    """Collects each round's train metrics and central evaluation and writes them out.

    A round arrives in steps, each handed over explicitly: `train_round` with the aggregated
    train metrics and the failed clusters (from the strategy's replies), `evaluate_round` with
    the clusters' aggregated validation (when the round has one), then `record` with the
    central evaluation, which completes the row, writes it (files and trackers) and logs its
    one-line summary. `close` ends the run: summary.png, trackers closed."""

    def __init__(
        self,
        output_dir: Path,
        num_rounds: int,
        run_config: Mapping[str, Any],
        mlflow_tracking_uri: str = "",
        result: RunResult | None = None,
    ) -> None:
        """A run's recorder with its trackers: TensorBoard events in `output_dir` (the
        run-config as hyper-parameters), MLflow too when a tracking URI is given."""
        output_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir = output_dir
        self.num_rounds = num_rounds
        self.tracking = Tracking(output_dir, run_config, mlflow_tracking_uri)
        self.result = result if result is not None else RunResult(output_dir)
        self.rows = self.result.rows
        self._clock = time.perf_counter(), time.process_time()  # the round's start
        self._rounds: dict[int, dict[str, Any]] = {}  # a round's row so far, until `record`

    def train_round(
        self,
        server_round: int,
        train: Mapping[str, Any],
        failures: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """A round's aggregated training metrics and the clusters that failed it."""
        row = self._rounds.setdefault(server_round, {})
        row.update((f"{TRAIN_ROW}/{k}", v) for k, v in train.items())
        row["failures"] = list(failures)

    def evaluate_round(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """A round's aggregated cluster validation (federated evaluation)."""
        row = self._rounds.setdefault(server_round, {})
        row.update((f"{EVALUATE_ROW}/{k}", v) for k, v in metrics.items())

    def record(self, server_round: int, central: Mapping[str, float]) -> None:
        """Complete a round with its central evaluation (none on a round that
        `central-eval-every` skips; a round with failures is complete, but marked) and write
        every row so far."""
        now = time.perf_counter(), time.process_time()
        row: dict[str, Any] = {"round": server_round, **central}
        if server_round > 0:
            row.update(self._rounds.pop(server_round, {}))
            # the strategy counted them (an edge's refused aggregate is not a cluster's failure)
            row[FAILED_CLUSTERS] = row.get(f"{TRAIN_ROW}/{FAILED_CLUSTERS}", 0)
            row["failures"] = row.pop("failures", [])  # the list after the counts
            row[ROUND_TIME], row[ROUND_CPU] = now[0] - self._clock[0], now[1] - self._clock[1]
        before = self.rows[-1] if self.rows else {}
        for total, key in ((TOTAL_LATENCY, ROUND_LATENCY), (TOTAL_ENERGY, ENERGY)):
            row[total] = before.get(total, 0.0) + row.get(f"{TRAIN_ROW}/{key}", 0.0)
        self._clock = now
        self.rows.append(row)
        write_rows(self.output_dir, self.rows)
        self.tracking.log_row(row)
        log(INFO, self.describe(row))

    def stopped(self, why: str) -> None:
        """Fine-tuning stopped before num-rounds (apps/convergence.py): the last row says why."""
        self.rows[-1][STOPPED] = why
        write_rows(self.output_dir, self.rows)

    def close(self, failed: bool = False) -> Path:
        """The run is over: draw summary.png, hand it and the metrics to the trackers and
        close them. Returns the picture's path."""
        path = plot_summary(self.rows, self.output_dir / "summary.png", self.output_dir.name)
        names = (path.name, "metrics.json", "config.json")
        self.tracking.close([self.output_dir / n for n in names], failed)
        return path

    def describe(self, row: dict[str, Any]) -> str:
        """The round in one line (under ~200 characters with one edge; the rest is in the
        files): central accuracy and loss (per edge, with several), failures, the clusters'
        training, the traffic, the cost model's price, the wall time."""
        head = f"[round {row['round']}/{self.num_rounds}] " + (
            f"acc {row[ACCURACY]:.4f} loss {row['loss']:.4f}"
            if ACCURACY in row
            else "(no central evaluation)"
        )
        edges = [k for k in row if k.startswith("edge") and k.endswith(f"/{ACCURACY}")]
        if len(edges) > 1:
            head += " (" + ", ".join(f"{k.split('/')[0]} {row[k]:.4f}" for k in edges) + ")"
        if row["round"] == 0:
            return head + " (initial model)"
        if row[FAILED_CLUSTERS]:
            head += f" | {row[FAILED_CLUSTERS]} cluster(s) FAILED, left out"

        def train(key: str, default: float = 0.0) -> float:
            return float(row.get(f"{TRAIN_ROW}/{key}", default))

        return (
            f"{head} | train acc {train(c.TRAIN_ACC, float('nan')):.3f} "
            f"loss {train(c.TRAIN_LOSS, float('nan')):.3f} | "
            f"D2D {(train(c.D2D_FWD) + train(c.D2D_BWD)) / 1e6:.2f} MB, "
            f"upload {train(c.UPLOAD) / 1e3:.1f} kB | "
            f"sim latency {train(c.ROUND_LATENCY):.1f} s, energy {train(c.ENERGY):.1f} J, "
            f"max mem {train(c.MEMORY_MAX) / 1e6:.1f} MB | {row[ROUND_TIME]:.1f} s"
        )

    def save_modules(self, state: dict[str, np.ndarray]) -> Path:
        """The final global modules (final_tunable.npz)."""
        self.result.final_modules = state
        return save_npz(self.output_dir / "final_tunable.npz", state)

    def save_round_modules(self, server_round: int, state: dict[str, np.ndarray]) -> Path:
        """Every round's global modules (small: prompts and heads), to resume or compare."""
        self.result.round_modules[server_round] = state
        return save_npz(round_file(self.output_dir, server_round), state)


# The files below are replaced whole (`write_atomic`): a reader never sees half of one. The
# deployed cloud writes its rows and modules with them too (apps/cloud_app.py).
def write_rows(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.json and metrics.csv: every row so far (a column for every key any row has)."""
    write_atomic(output_dir / "metrics.json", json.dumps(rows, indent=2).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(output_dir / "metrics.csv", text.getvalue().encode())


def round_file(output_dir: Path, server_round: int, kind: str = "round") -> Path:
    """rounds/<kind>-NNN.npz: a round's global modules ('round'), or what the edges' strategies
    keep on the server after it ('server-state', apps/resume.py)."""
    return output_dir / "rounds" / f"{kind}-{server_round:03d}.npz"


def save_npz(path: Path, modules: Mapping[str, np.ndarray]) -> Path:
    """Modules by name as an .npz file (its folder made if need be)."""
    buffer = io.BytesIO()
    np.savez(buffer, **modules)  # type: ignore[arg-type]
    write_atomic(path, buffer.getvalue())
    return path


# -- the console: the round's line instead of Flower's metric dumps (module docstring) ---------
# What `Strategy.start` logs (flwr 1.42) that metrics.csv holds: the aggregated metrics of each
# round's train and evaluate replies, the central evaluation, and the final report's lines.
METRIC_DUMPS = frozenset(
    {
        "\t└──> Aggregated MetricRecord: %s",
        "Initial global evaluation results: %s",
        "Global evaluation",
        "\t└──> MetricRecord: %s",
        "Final results:",
        "\t%s",
    }
)
STRATEGY_SOURCE = flower_strategy.__file__


def not_a_metric_dump(record: logging.LogRecord) -> bool:
    """False for `Strategy.start`'s metric dumps (module docstring); True for everything else."""
    return record.msg not in METRIC_DUMPS or record.pathname != STRATEGY_SOURCE


@contextmanager
def quiet_strategy_log() -> Iterator[None]:
    """Flower's logger without `Strategy.start`'s metric dumps inside the block."""
    FLOWER_LOGGER.addFilter(not_a_metric_dump)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(not_a_metric_dump)
