"""Where researchers look: every run's TensorBoard events, summary.png and (on request) MLflow.

One real run of the apps in process (2 edges, 2 rounds, a tiny random-backbone ViT): the
TensorBoard scalars read back equal metrics.json, the run-config is there as hyper-parameters,
summary.png is a real picture and the FINAL line names it. MLflow's code path runs against a
small fake of its client (always) and against the real package with a local file: URI when
the optional extra is installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from flwr.common.logger import FLOWER_LOGGER
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gaisnet_flwr.apps import tracking
from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.recorder import RoundRecorder
from gaisnet_flwr.apps.tracking import check_mlflow, mlflow_key, scalars, tag
from tests.conftest import TINY_RUN

HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
TINY: dict[str, Any] = {**TINY_RUN, "num-rounds": 2}


def read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One 2-edge, 2-round run; with the mlflow extra installed it also tracks to file:."""
    tmp = tmp_path_factory.mktemp("tracked")
    config = {**TINY, "output-dir": str(tmp / "run")}
    if HAVE_MLFLOW:
        config["mlflow-tracking-uri"] = (tmp / "mlruns").as_uri()
    # what a person reads while it runs: Flower's log, kept for test_log_lines_are_short
    handler = logging.FileHandler(tmp / "flower.log")
    handler.setFormatter(logging.Formatter("%(levelname)s : %(message)s"))
    FLOWER_LOGGER.addHandler(handler)
    try:
        run_inprocess(config, num_clusters=2)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
        handler.close()
    return tmp / "run", tmp / "mlruns"


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_json(run_dir: tuple[Path, Path]) -> None:
    out, _ = run_dir
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    events = read_events(out)
    tags = set(events.Tags()["scalars"])
    expected = {t for row in rows for t in scalars(row)}
    assert tags == expected
    for required in (
        "central/accuracy",
        "central/edge0/accuracy",
        "central/edge1/loss",
        "train/train-acc",
        "train/d2d-bytes-fwd",
        "train/d2d-bytes-bwd",
        "train/upload-bytes",
        "train/round-latency-s",
        "train/energy-j",
        "run/failed-clusters",
    ):
        assert required in tags, required
    for row in rows:
        for name, value in scalars(row).items():
            logged = {e.step: e.value for e in events.Scalars(name)}
            assert logged[row["round"]] == pytest.approx(value, rel=1e-6), (name, row["round"])


@pytest.mark.slow
def test_log_lines_are_short_and_the_metrics_are_in_the_files(run_dir: tuple[Path, Path]) -> None:
    # A round is one line a person reads (Flower's whole-MetricRecord dumps, ~2,000
    # characters a line with 40-odd metrics per edge, are dropped: apps/recorder.py); every
    # metric is still in metrics.json.
    run, _ = run_dir
    # (a path is as long as the user makes it: counted as "<out>")
    text = (run.parent / "flower.log").read_text().replace(str(run.parent), "<out>")
    lines = text.splitlines()
    rounds = [line for line in lines if "[round " in line]
    assert len(rounds) == 3, rounds  # round 0 (the initial model) and 2 rounds
    assert all("acc " in line and " loss " in line for line in rounds)
    long = [line for line in lines if len(line) > 200]
    assert long == [], f"{len(long)} lines over 200 characters, e.g. {long[0][:300]!r}"
    assert not any("Aggregated MetricRecord" in line for line in lines)
    assert any("[ROUND 2/2]" in line for line in lines)  # Flower's own round markers stay
    rows = json.loads((run / "metrics.json").read_text())
    assert len([k for k in rows[-1] if k.startswith("train/")]) > 20
    assert any(k.startswith("evaluate/") for k in rows[-1])  # the clusters' validation too


@pytest.mark.slow
def test_run_config_is_the_hyper_parameters(run_dir: tuple[Path, Path]) -> None:
    out, _ = run_dir
    config = json.loads((out / "config.json").read_text())
    content = read_events(out).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert set(hparams) == set(config)
    assert hparams["lr"].number_value == pytest.approx(config["lr"])
    assert hparams["edge-domains"].string_value == "none,invert"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = [m.name.tag for m in experiment.experiment.metric_infos]
    assert metrics == list(tracking.CENTRAL_METRICS)


@pytest.mark.slow
def test_summary_png_is_a_picture(run_dir: tuple[Path, Path]) -> None:
    out, _ = run_dir
    with Image.open(out / "summary.png") as image:
        image.verify()
    with Image.open(out / "summary.png") as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 1000 <= width <= 2000 and 700 <= height <= 1500
        assert sum(n > 0 for n in image.convert("L").histogram()) > 50  # not a blank


@pytest.mark.slow
def test_a_runs_picture_is_drawn_again_from_its_metrics_json_or_csv(
    run_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    """`python -m gaisnet_flwr.apps.summary`: the rows read back from metrics.csv are the rows
    of metrics.json (numbers as numbers, a key a row lacked left out), and the run's picture is
    drawn from either, byte for byte as the run drew it."""
    from gaisnet_flwr.apps import summary

    out, _ = run_dir
    rows = json.loads((out / "metrics.json").read_text())
    flat = [{k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in rows]
    from_csv = summary.read_rows(out / "metrics.csv")
    assert [
        {k: v for k, v in r.items() if k in f} for r, f in zip(from_csv, flat, strict=True)
    ] == flat
    assert summary.read_rows(out / "metrics.json") == rows
    for source in ("metrics.json", "metrics.csv"):
        again = tmp_path / f"{source}.png"
        summary.main([str(out / source), "--out", str(again)])
        assert again.read_bytes() == (out / "summary.png").read_bytes(), source
    with pytest.raises(SystemExit):
        summary.main([str(out / "config.json.txt")])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MLFLOW, reason="the optional mlflow extra is not installed")
def test_mlflow_file_uri_run(run_dir: tuple[Path, Path]) -> None:
    out, mlruns = run_dir
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlruns.as_uri())
    experiment = client.get_experiment_by_name(tracking.MLFLOW_EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    assert run.data.params["edge-domains"] == "none,invert"
    rows = json.loads((out / "metrics.json").read_text())
    history = client.get_metric_history(run.info.run_id, "central/edge1.accuracy")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["edge1/accuracy"]) for r in rows]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.png", "metrics.json", "config.json"} <= artifacts


def test_tags_name_the_metrics_json_keys() -> None:
    row: dict[str, Any] = {
        "round": 3,
        "accuracy": 0.5,
        "edge1/loss": 2.0,
        "train/energy-j/peer1": 0.1,
    }
    row |= {"failed-clusters": 1, "failures": [{"node": 7}], "round-time-s": 1.5}
    assert scalars(row) == {
        "central/accuracy": 0.5,
        "central/edge1/loss": 2.0,
        "train/energy-j/peer1": 0.1,
        "run/failed-clusters": 1.0,
        "run/round-time-s": 1.5,
    }
    assert tag("train/d2d-bytes-fwd") == "train/d2d-bytes-fwd"
    assert mlflow_key("train/energy-j/peer1") == "train/energy-j.peer1"


class FakeMlflowClient:
    """Records what the tracker asks of `mlflow.MlflowClient`."""

    made: list[FakeMlflowClient] = []

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri
        self.params: dict[str, str] = {}
        self.metrics: list[tuple[str, float, int]] = []
        self.artifacts: list[str] = []
        self.status = "RUNNING"
        self.run_name = ""
        FakeMlflowClient.made.append(self)

    def get_experiment_by_name(self, name: str) -> None:
        return None

    def create_experiment(self, name: str) -> str:
        return "1"

    def create_run(self, experiment_id: str, run_name: str) -> Any:
        self.run_name = run_name
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = ()) -> None:
        self.params |= {p.key: p.value for p in params}
        self.metrics += [(m.key, m.value, m.step) for m in metrics]

    def log_artifact(self, run_id: str, path: str) -> None:
        self.artifacts.append(Path(path).name)

    def set_terminated(self, run_id: str, status: str) -> None:
        self.status = status


@pytest.fixture
def fake_mlflow(monkeypatch: pytest.MonkeyPatch) -> type[FakeMlflowClient]:
    module = types.ModuleType("mlflow")
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(  # type: ignore[attr-defined]
        key=key, value=value, step=step
    )
    entities.Param = lambda key, value: types.SimpleNamespace(key=key, value=value)  # type: ignore[attr-defined]
    module.MlflowClient = FakeMlflowClient  # type: ignore[attr-defined]
    module.entities = entities  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", module)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    FakeMlflowClient.made.clear()
    return FakeMlflowClient


def test_recorder_tracks_to_mlflow_when_given_a_uri(
    tmp_path: Path, fake_mlflow: type[FakeMlflowClient]
) -> None:
    recorder = RoundRecorder(
        tmp_path / "run-a", 1, {"lr": 0.05, "edge-domains": "none"}, "file:///tmp/mlruns"
    )
    recorder.record(0, {"accuracy": 0.25, "loss": 2.0})
    recorder.train_round(1, {"d2d-bytes-fwd": 1000, "round-latency-s": 2.5})
    recorder.record(1, {"accuracy": 0.75, "loss": 1.0})
    assert recorder.close() == tmp_path / "run-a" / "summary.png"
    (client,) = fake_mlflow.made
    assert client.uri == "file:///tmp/mlruns" and client.run_name == "run-a"
    assert client.params == {"lr": "0.05", "edge-domains": "none"}
    assert ("central/accuracy", 0.75, 1) in client.metrics
    assert ("train/d2d-bytes-fwd", 1000.0, 1) in client.metrics
    assert client.artifacts == ["summary.png", "metrics.json"]  # no config.json written here
    assert client.status == "FINISHED"


def test_no_uri_no_mlflow(tmp_path: Path, fake_mlflow: type[FakeMlflowClient]) -> None:
    recorder = RoundRecorder(tmp_path, 1, {"lr": 0.05})
    recorder.record(0, {"accuracy": 0.25, "loss": 2.0})
    recorder.close()
    assert fake_mlflow.made == []
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_a_uri_without_the_package_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'gaisnet-flwr\[mlflow\]'"):
        check_mlflow("file:///tmp/mlruns")
    check_mlflow("")  # no URI: nothing to check


def test_the_client_app_imports_no_tracking() -> None:
    """(matplotlib itself reaches the ClientApp through flwr_datasets.visualization.)"""
    code = (
        "import sys, gaisnet_flwr.apps.client_app\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')\n"
        "    or m in ('gaisnet_flwr.apps.tracking', 'gaisnet_flwr.apps.summary')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
