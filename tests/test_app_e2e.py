"""The real ServerApp and ClientApp, end to end: in process (`gaisnet_flwr.apps.inprocess`), and
once on Flower's simulation engine (Ray, `run_simulation`), which must give the same modules.

A tiny edge model (2 blocks, width 32) over 2 client clusters of 2 D2D peers each, 2 rounds, on
the embedded digits, with a 1-epoch cloud foundation kept in tmp: the test reads back what the
ServerApp wrote and checks it against quantities computed here independently.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import load_image_data
from gaisnet_flwr.training.loops import evaluate
from tests.conftest import run_simulated

pytestmark = [pytest.mark.simulation, pytest.mark.slow]

NUM_CLUSTERS = 2
TINY: dict[str, Any] = {
    "depth": 2,
    "embed-dim": 32,
    "num-heads": 2,
    "peers-per-cluster": 2,
    "num-rounds": 2,
    "batch-size": 64,
    "pretrain-epochs": 1,
    "device": "cpu",  # bit-for-bit reproducibility is only promised on one device type
}
RAY_NAMES = ("/ray/", "ray::")  # gcs_server, raylet, dashboard, workers live under .../ray/


def run_config(output_dir: Path, foundation_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {
        **TINY,
        **overrides,
        "output-dir": str(output_dir),
        "foundation-dir": str(foundation_dir),
    }


def simulate(output_dir: Path, foundation_dir: Path, **overrides: Any) -> dict[str, Any]:
    """One full run of the real apps in process; returns the run-config it used."""
    config = run_config(output_dir, foundation_dir, **overrides)
    run_inprocess(config, NUM_CLUSTERS)
    return config


def ray_processes_of_this_test() -> list[str]:
    """Ray processes started from this pytest process (Ray keeps them in our process group)."""
    out = os.popen("ps -A -o pid=,ppid=,pgid=,stat=,args=").read()
    mine = []
    for line in out.splitlines():
        pid, ppid, pgid, stat, args = (line.split(None, 4) + [""])[:5]
        ours = int(ppid) == os.getpid() or int(pgid) == os.getpgrp()
        if ours and not stat.startswith("Z") and any(name in args for name in RAY_NAMES):
            mine.append(f"{pid} {args[:80]}")
    return mine


# Ray's workers and daemons exit on their own after `ray.shutdown()`, slower the more the machine
# is loaded (a 30 s wait failed at load average 8 with `ray::ClientAppActor` still exiting). A
# process that was left behind stays forever, so a generous bound loses nothing: a clean run
# returns as soon as its processes are gone, and only a real leftover waits the whole bound.
RAY_EXIT_BOUND_S = 180


def assert_ray_is_gone() -> None:
    import ray

    # What decides it, immediately and at any load: Flower shut down the Ray it started.
    assert not ray.is_initialized(), "run_simulation returned with Ray still initialised"
    started = time.monotonic()
    while (left := ray_processes_of_this_test()) and time.monotonic() - started < RAY_EXIT_BOUND_S:
        time.sleep(0.5)
    assert not left, (
        f"Ray processes still running {time.monotonic() - started:.0f} s after run_simulation "
        f"(load average {os.getloadavg()[0]:.1f}): {left}"
    )


def npy_bytes(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


@pytest.fixture(scope="module")
def foundation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("foundation")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, foundation_dir: Path) -> dict[str, Any]:
    return simulate(tmp_path_factory.mktemp("run-a"), foundation_dir)


def test_results_record_every_round_and_the_true_traffic(first_run: dict[str, Any]) -> None:
    cfg = RunConfig.from_run_config(first_run)
    rows = json.loads((Path(cfg.run.output_dir) / "metrics.json").read_text())
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)

    # Upload = the tunable modules as Flower serialises them (.npy bytes + key), per cluster.
    model = Foundation.of(cfg).load(load_image_data(cfg.data_spec()).num_classes)
    tunable = {k: v.numpy() for k, v in model.tunable_state().items()}
    per_cluster = sum(npy_bytes(v) + len(k) for k, v in tunable.items())
    assert per_cluster > sum(v.nbytes for v in tunable.values())
    for row in rows[1:]:
        assert row["train/num-clusters"] == NUM_CLUSTERS
        assert row["train/upload-bytes"] == NUM_CLUSTERS * per_cluster
        assert row["train/d2d-bytes-fwd"] > 0 and row["train/d2d-bytes-bwd"] > 0
        assert row["train/num-examples"] > 0


def test_inference_requests_are_served_after_fine_tuning(first_run: dict[str, Any]) -> None:
    cfg = RunConfig.from_run_config(first_run)
    served = json.loads((Path(cfg.run.output_dir) / "inference.json").read_text())
    assert [row["request"] for row in served] == list(range(cfg.inference.inference_requests))
    assert len({row["node"] for row in served}) == min(
        cfg.inference.inference_requests, NUM_CLUSTERS
    )
    for row in served:
        assert "error" not in row, row.get("error")
        assert len(row["predictions"]) == row["num-samples"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0 and row["latency-s"] > 0 and row["d2d-bytes"] > 0
        assert row["distribution"] == "efficient"


def test_final_modules_are_the_tunable_ones_and_give_the_last_accuracy(
    first_run: dict[str, Any],
) -> None:
    cfg = RunConfig.from_run_config(first_run)
    output_dir = Path(cfg.run.output_dir)
    with np.load(output_dir / "final_tunable.npz") as npz:
        saved = {k: npz[k] for k in npz.files}
    # One edge (edge-domains = "none"): its modules under `edge0/`, and nothing else.
    tunable = {"prompt.0", "prompt.1", "head.weight", "head.bias"}
    assert set(saved) == {f"edge0/{k}" for k in tunable}
    final = {k.removeprefix("edge0/"): v for k, v in saved.items()}

    data = load_image_data(cfg.data_spec())
    model = Foundation.of(cfg).load(data.num_classes)
    initial = model.tunable_state()
    assert {k: tuple(v.shape) for k, v in initial.items()} == {k: v.shape for k, v in final.items()}
    assert not all(np.array_equal(final[k], initial[k].numpy()) for k in final), "nothing trained"

    # The edge's last central evaluation is exactly the saved modules on the test split.
    model.load_tunable_state({k: torch.from_numpy(v) for k, v in final.items()})
    last = json.loads((output_dir / "metrics.json").read_text())[-1]
    assert evaluate(model, data.test).accuracy == pytest.approx(last["accuracy"], abs=1e-9)


def test_ray_simulation_gives_the_same_final_modules_and_stops_ray(
    first_run: dict[str, Any], foundation_dir: Path, tmp_path: Path
) -> None:
    # The same seed on Flower's simulation engine (Ray actors): the same modules and metrics
    # as in process, and no Ray process left behind.
    first = Path(first_run["output-dir"])
    run_simulated(run_config(tmp_path, foundation_dir), NUM_CLUSTERS)  # reuses the checkpoint
    assert_ray_is_gone()
    with np.load(first / "final_tunable.npz") as a, np.load(tmp_path / "final_tunable.npz") as b:
        assert a.files == b.files
        for key in a.files:
            assert np.array_equal(a[key], b[key]), f"{key} differs between identical runs"
    rows_a = json.loads((first / "metrics.json").read_text())
    rows_b = json.loads((tmp_path / "metrics.json").read_text())
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("accuracy", "loss", "train/train-loss", "train/d2d-bytes-fwd"):
            assert ra.get(key) == rb.get(key), f"round {ra['round']}: {key} differs"


def test_integrated_mode_fine_tunes_or_serves_each_round(
    tmp_path: Path, foundation_dir: Path
) -> None:
    simulate(
        tmp_path,
        foundation_dir,
        **{
            "service": "integrated",
            "policy": "mlcp",
            "edge-domains": "none,invert",
            "demand": "1,1,0",
        },
    )
    rows = json.loads((tmp_path / "integrated.json").read_text())
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert [row["demand"] for row in rows] == [1, 1, 0]
    total = 0.0
    for row in rows:
        assert row["action"] in ("serve", "finetune:0", "finetune:1")
        if row["action"] == "serve":
            assert row["error"] is None and 0.0 <= row["served-accuracy"] <= 1.0
        assert row["energy-j"] > 0
        total += row["profit"]
        assert row["cumulative-profit"] == pytest.approx(total)
