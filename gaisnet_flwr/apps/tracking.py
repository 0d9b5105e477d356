"""Where researchers look at a run: TensorBoard event files (always) and MLflow (on request).

Every run writes TensorBoard events into its output directory, so `tensorboard --logdir outputs/`
lists every run side by side with no extra step. Each `metrics.json` row becomes scalars at
step = round, one tag per numeric key (`tag`):

    central/accuracy, central/loss              the mean over the edges' test sets
    central/edge<e>/accuracy, .../loss          each edge model on its own domain's test set
    train/<key>, train/edge<e>/<key>            the clusters' aggregated train metrics: train-acc,
                                                train-loss, d2d-bytes-fwd, d2d-bytes-bwd,
                                                upload-bytes, cs-bytes, latency-s,
                                                round-latency-s, energy-j, memory-max-bytes, ...
    evaluate/<metric>                           the clusters' aggregated validation (federated
                                                evaluation), when the round has one
    run/failed-clusters, run/round-time-s,      failed clusters, measured wall time per round and
    run/round-cpu-s                             the ServerApp process's CPU time over it
    run/central-eval-s                          the wall time of its central evaluation (part
                                                of the round's; round 0's too)

The run-config goes in as hyper-parameters (TensorBoard's HPARAMS tab, with the final central
accuracy and loss as its metrics). With run-config `mlflow-tracking-uri` set (e.g.
`file:///abs/path/mlruns`), the same params and metrics also go to an MLflow run (experiment
`gaisnet-flwr`, run name = the output directory's name; metric keys keep the group and dot the
rest, `central/edge0.accuracy`), with `summary.png`, `metrics.json` and `config.json` as
artifacts. MLflow is an optional extra (`pip install 'gaisnet-flwr[mlflow]'`);
a local URI needs no network, and MLflow's own telemetry is switched off unless the user set it.

Everything here runs on the ServerApp; the heavy imports (tensorboard, mlflow) happen lazily,
so nothing reaches a ClientApp's import path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gaisnet_flwr.contract import ACCURACY, EVALUATE_ROW, TRAIN_ROW

MLFLOW_EXPERIMENT = "gaisnet-flwr"
CENTRAL_METRICS = ("central/accuracy", "central/loss")  # the HPARAMS tab's metrics


def tag(key: str) -> str:
    """The TensorBoard tag (and MLflow metric key) of a `metrics.json` key."""
    if key.startswith((f"{TRAIN_ROW}/", f"{EVALUATE_ROW}/")):
        return key
    if key in (ACCURACY, "loss") or key.startswith("edge"):
        return f"central/{key}"
    return f"run/{key}"


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A row's numeric values by tag; the step (`round`) and lists (`failures`) are left out."""
    return {
        tag(k): float(v)
        for k, v in row.items()
        if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class MlflowLog:
    """The same params and metrics as an MLflow run (MlflowClient: no global active run, so
    several in-process runs never mix)."""

    def __init__(self, tracking_uri: str, run_name: str, params: Mapping[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if is_local_uri(tracking_uri):
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow  # the package is there: `check_mlflow` refused the URI before any work
        from mlflow.entities import Param

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(MLFLOW_EXPERIMENT)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for start in range(0, len(items), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def close(self, artifacts: list[Path], failed: bool = False) -> None:
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_key(name: str) -> str:
    """A tag as an MLflow metric key: the group, then the rest with dots (MLflow's file store
    keeps a key as a file path, where `train/energy-j` and `train/energy-j/peer1` clash)."""
    group, _, rest = name.partition("/")
    return f"{group}/{rest.replace('/', '.')}" if rest else group


def is_local_uri(uri: str) -> bool:
    """A file: URI or a plain path (MLflow's file store): no network."""
    return uri.startswith("file:") or "://" not in uri


NO_MLFLOW = (
    "run-config mlflow-tracking-uri is set but the mlflow package is not installed: "
    "pip install 'gaisnet-flwr[mlflow]' (or leave mlflow-tracking-uri empty)"
)


def check_mlflow(tracking_uri: str) -> None:
    """Refuse a tracking URI without the package before any work (a cheap look-up)."""
    import importlib.util

    if tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise RuntimeError(NO_MLFLOW)


class Tracking:
    """A run's trackers: TensorBoard events in `output_dir` (always; the run-config as
    hyper-parameters) and an MLflow run (with a tracking URI); each row goes to both."""

    def __init__(
        self, output_dir: Path, run_config: Mapping[str, Any], mlflow_tracking_uri: str = ""
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(output_dir))
        if run_config:
            # The HPARAMS tab: this run's config, its final central metrics read from the scalars.
            params = {
                k: v if isinstance(v, bool | int | float | str) else str(v)
                for k, v in run_config.items()
            }
            for summary in hparams(params, dict.fromkeys(CENTRAL_METRICS, 0.0)):
                self.writer.file_writer.add_summary(summary)  # type: ignore[attr-defined]
        self.mlflow = (
            MlflowLog(mlflow_tracking_uri, output_dir.name, run_config)
            if mlflow_tracking_uri
            else None
        )

    def log_row(self, row: Mapping[str, Any]) -> None:
        step, values = int(row["round"]), scalars(row)
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a run in progress is visible at once
        if self.mlflow is not None:
            self.mlflow.log(step, values)

    def close(self, artifacts: list[Path], failed: bool = False) -> None:
        """The run is over; MLflow gets the `artifacts` that exist and the run's status."""
        self.writer.close()
        if self.mlflow is not None:
            self.mlflow.close(artifacts, failed)
