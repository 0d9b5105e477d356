"""Per-round results: aggregated client metrics, central evaluation, files on disk.

Every round is appended to `metrics.csv` and `metrics.json` and to the run's TensorBoard events
(and MLflow run, with a tracking URI; `tracking.py`) as soon as it is known, so a run that stops
early keeps every finished round. The final tunable modules go to `final_tunable.npz`; `close`
draws `summary.png` (`summary.py`) and closes the trackers.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.tracking import Tracking
from gaisnet_flwr.contract import (
    ACCURACY,
    EVALUATE_ROW,
    FAILED_CLUSTERS,
    ROUND_CPU,
    ROUND_TIME,
    TRAIN_ROW,
    edge_key,
)


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
        row = self.rows[server_round]
        return float(row[ACCURACY if edge is None else edge_key(edge, ACCURACY)])

    def loss(self, server_round: int, edge: int | None = None) -> float:
        row = self.rows[server_round]
        return float(row["loss" if edge is None else edge_key(edge, "loss")])

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
    train MetricRecord and the failed clusters (from the strategy's replies), `evaluate_round`
    with the clusters' aggregated validation (when the round has one), then `record` with the
    central evaluation, which completes the row, writes it (files and trackers) and logs its
    one-line summary. `close` ends the run: summary.png, trackers closed."""

    def __init__(
        self,
        output_dir: Path,
        num_rounds: int,
        tracking: Tracking | None = None,
        result: RunResult | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.num_rounds = num_rounds
        self.tracking = tracking
        self.result = result if result is not None else RunResult(output_dir)
        self.rows: list[dict[str, Any]] = self.result.rows
        self._round_started = time.perf_counter()
        self._round_cpu_started = time.process_time()
        self._train: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        self._evaluate: dict[int, dict[str, Any]] = {}
        output_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_run(
        cls,
        output_dir: Path,
        num_rounds: int,
        run_config: Mapping[str, Any],
        mlflow_tracking_uri: str = "",
        result: RunResult | None = None,
    ) -> RoundRecorder:
        """A run's recorder with its trackers: TensorBoard events in `output_dir` (the
        run-config as hyper-parameters), MLflow too when a tracking URI is given."""
        output_dir.mkdir(parents=True, exist_ok=True)
        tracking = Tracking.open(output_dir, run_config, mlflow_tracking_uri)
        return cls(output_dir, num_rounds, tracking, result)

    def train_round(
        self,
        server_round: int,
        train: Mapping[str, Any],
        failures: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """A round's aggregated training metrics and the clusters that failed it."""
        self._train[server_round] = (dict(train), [dict(f) for f in failures])

    def evaluate_round(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """A round's aggregated cluster validation (federated evaluation)."""
        self._evaluate[server_round] = dict(metrics)

    def record(self, server_round: int, central: Mapping[str, float]) -> None:
        """Complete a round with its central evaluation (a round with failures is complete,
        but marked) and write every row so far."""
        now, cpu = time.perf_counter(), time.process_time()
        train, failures = self._train.pop(server_round, ({}, []))
        row: dict[str, Any] = {"round": server_round, **central}
        if server_round > 0:
            row.update({f"{TRAIN_ROW}/{k}": v for k, v in (train or {}).items()})
            evaluated = self._evaluate.pop(server_round, {})
            row.update({f"{EVALUATE_ROW}/{k}": v for k, v in evaluated.items()})
            # An edge's refused aggregate (node -1) is a failure of the round, not of a cluster.
            row[FAILED_CLUSTERS] = sum(f.get("node") != -1 for f in failures or [])
            row["failures"] = list(failures or [])
            row[ROUND_TIME] = now - self._round_started
            row[ROUND_CPU] = cpu - self._round_cpu_started
        self._round_started, self._round_cpu_started = now, cpu
        self.rows.append(row)
        self._write()
        if self.tracking is not None:
            self.tracking.log_row(row)
        log(INFO, self.describe(row))

    @property
    def summary_path(self) -> Path:
        return self.output_dir / "summary.png"

    def close(self, failed: bool = False) -> Path:
        """The run is over: draw summary.png, hand it and the metrics to the trackers and
        close them. Returns the picture's path."""
        from gaisnet_flwr.apps.summary import plot_summary

        path = plot_summary(self.rows, self.summary_path, title=self.output_dir.name)
        if self.tracking is not None:
            names = ("summary.png", "metrics.json", "config.json")
            self.tracking.close([self.output_dir / n for n in names], failed)
            self.tracking = None
        return path

    def describe(self, row: dict[str, Any]) -> str:
        """The round in one line (under ~200 characters with one edge; the rest is in the
        files): central accuracy and loss (per edge, with several), failures, the clusters'
        training, the traffic, the cost model's price, the wall time."""
        head = (
            f"[round {row['round']}/{self.num_rounds}] acc {row['accuracy']:.4f} "
            f"loss {row['loss']:.4f}"
        )
        edges = sorted(k for k in row if k.startswith("edge") and k.endswith("/accuracy"))
        if len(edges) > 1:
            head += " (" + ", ".join(f"{k.split('/')[0]} {row[k]:.4f}" for k in edges) + ")"
        if row["round"] == 0:
            return head + " (initial model)"
        if row.get(FAILED_CLUSTERS):
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

    def _write(self) -> None:
        (self.output_dir / "metrics.json").write_text(json.dumps(self.rows, indent=2))
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        with (self.output_dir / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def save_modules(self, state: dict[str, np.ndarray], name: str = "final_tunable.npz") -> Path:
        path = self.output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **state)  # type: ignore[arg-type]
        if name == "final_tunable.npz":
            self.result.final_modules = dict(state)
        return path

    def save_round_modules(self, server_round: int, state: dict[str, np.ndarray]) -> Path:
        """Every round's global modules (small: prompts and heads), to resume or compare."""
        self.result.round_modules[server_round] = dict(state)
        return self.save_modules(state, f"rounds/round-{server_round:03d}.npz")
