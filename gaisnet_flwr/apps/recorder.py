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
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log

from gaisnet_flwr.apps.tracking import Tracking

# Counters add up over clusters; the slowest cluster sets the round's critical path.
SUMMED = (
    "num-examples",
    "d2d-bytes-fwd",
    "d2d-bytes-bwd",
    "upload-bytes",
    "compute-flops",
    "energy-j",
    "sensing-j",
    "compute-j",
    "tx-j",
    "cs-bytes",
    "edge-flops",  # the edge server's part of the clusters' chains (edge-offload)
    "edge-energy-j",
    "edge-hop-bytes",
)
# Clusters train in parallel: the round's simulated convergence latency is the slowest cluster's;
# per-node memory is reported as the largest any cluster needs at that role.
# Each cluster's sensing, compute and D2D time likewise: the largest any cluster spent.
MAXED = (
    "train-time-s",
    "latency-s",
    "bottleneck-s",
    "sensing-s",
    "compute-s",
    "d2d-s",
    "memory-max-bytes",
    "memory-bytes",
    "edge-compute-s",
)
NOT_AGGREGATED = ("partition-id", "edge-id", "cluster-id")


def aggregate_train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Sum counters, take the max of times, weight-average the rest (loss, accuracy)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = np.array([float(m[weighting_key]) for m in metrics])  # type: ignore[arg-type]
    out: dict[str, Any] = {"num-clusters": len(metrics)}
    # every key any cluster sent (an edge node's per-node keys come from the clusters with one)
    for key in dict.fromkeys(k for m in metrics for k in m):
        values = [m[key] for m in metrics if key in m]
        family = key.split("/")[0]  # per-node keys such as energy-j/peer1
        if key in NOT_AGGREGATED:
            continue
        if family in SUMMED:
            out[key] = sum(values)  # type: ignore[arg-type]
        elif family in MAXED:
            out[key] = max(values)  # type: ignore[type-var]
        elif len(values) == len(metrics) and weights.sum() > 0:
            out[key] = float(np.average(np.asarray(values, dtype=float), weights=weights))
    return MetricRecord(out)


class RoundRecorder:
    """Collects each round's train metrics and central evaluation and writes them out.

    A round arrives in two steps, both handed over explicitly: `train_round` with the
    aggregated train MetricRecord and the failed clusters (from the strategy's replies), then
    `record` with the central evaluation, which completes the row and writes it (files and
    trackers). `close` ends the run: summary.png, trackers closed."""

    def __init__(self, output_dir: Path, num_rounds: int, tracking: Tracking | None = None) -> None:
        self.output_dir = output_dir
        self.num_rounds = num_rounds
        self.tracking = tracking
        self.rows: list[dict[str, Any]] = []
        self._round_started = time.perf_counter()
        self._train: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        output_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_run(
        cls,
        output_dir: Path,
        num_rounds: int,
        run_config: Mapping[str, Any],
        mlflow_tracking_uri: str = "",
    ) -> RoundRecorder:
        """A run's recorder with its trackers: TensorBoard events in `output_dir` (the
        run-config as hyper-parameters), MLflow too when a tracking URI is given."""
        output_dir.mkdir(parents=True, exist_ok=True)
        tracking = Tracking.open(output_dir, run_config, mlflow_tracking_uri)
        return cls(output_dir, num_rounds, tracking)

    def train_round(
        self,
        server_round: int,
        train: Mapping[str, Any],
        failures: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """A round's aggregated training metrics and the clusters that failed it."""
        self._train[server_round] = (dict(train), [dict(f) for f in failures])

    def record(self, server_round: int, central: Mapping[str, float]) -> None:
        """Complete a round with its central evaluation (a round with failures is complete,
        but marked) and write every row so far."""
        now = time.perf_counter()
        train, failures = self._train.pop(server_round, ({}, []))
        row: dict[str, Any] = {"round": server_round, **central}
        if server_round > 0:
            row.update({f"train/{k}": v for k, v in (train or {}).items()})
            # An edge's refused aggregate (node -1) is a failure of the round, not of a cluster.
            row["failed-clusters"] = sum(f.get("node") != -1 for f in failures or [])
            row["failures"] = list(failures or [])
            row["round-time-s"] = now - self._round_started
        self._round_started = now
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
        head = (
            f"[round {row['round']}/{self.num_rounds}] central acc {row['accuracy']:.4f} "
            f"loss {row['loss']:.4f}"
        )
        edges = sorted(k for k in row if k.startswith("edge") and k.endswith("/accuracy"))
        if len(edges) > 1:
            head += " (" + ", ".join(f"{k.split('/')[0]} {row[k]:.4f}" for k in edges) + ")"
        if row["round"] == 0:
            return head + " (initial model)"
        if row.get("failed-clusters"):
            head += f" | {row['failed-clusters']} cluster(s) FAILED, left out"
        return (
            f"{head} | train acc {row.get('train/train-acc', float('nan')):.4f} "
            f"loss {row.get('train/train-loss', float('nan')):.4f} | "
            f"D2D fwd {row.get('train/d2d-bytes-fwd', 0) / 1e6:.2f} MB "
            f"bwd {row.get('train/d2d-bytes-bwd', 0) / 1e6:.2f} MB | "
            f"upload {row.get('train/upload-bytes', 0) / 1e3:.1f} kB | "
            f"sim latency {row.get('train/round-latency-s', 0):.1f} s, "
            f"energy {row.get('train/energy-j', 0):.1f} J (sensing "
            f"{row.get('train/sensing-j', 0):.1f}, compute {row.get('train/compute-j', 0):.1f}, "
            f"tx {row.get('train/tx-j', 0):.1f}), "
            f"max node mem {row.get('train/memory-max-bytes', 0) / 1e6:.1f} MB | "
            f"{row['round-time-s']:.1f} s"
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
        return path

    def save_round_modules(self, server_round: int, state: dict[str, np.ndarray]) -> Path:
        """Every round's global modules (small: prompts and heads), to resume or compare."""
        return self.save_modules(state, f"rounds/round-{server_round:03d}.npz")
