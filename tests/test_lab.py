"""A real lab on loopback: `flower-superlink`, 2 `flower-supernode`s and 4 `gaisnet-peer`s.

Each SuperNode is a cluster's start point; its node-config names its peer and its end point,
which are separate processes reached over gRPC. Brought up by `scripts/lab.py` (what a user
runs), shared by the tests in this file, and stopped by PID at the end; no process may be left.

1. Two rounds of HFSL and one inference request through the deployment give the same tunable
   modules as Flower's in-process simulation with the same seed, and the served predictions
   are the ones the chain computes here.
2. A peer killed (SIGKILL) in the middle of round 1 costs only its cluster: the round
   completes with the other cluster and is marked; the peer comes back and later rounds use it.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import cluster_datasets, edge_image_data, load_image_data
from gaisnet_flwr.derived import data_spec, derive, edge_shares
from gaisnet_flwr.split.chain import SplitChain
from gaisnet_flwr.training.loops import build_model
from tests.conftest import run_simulated

pytestmark = [pytest.mark.simulation, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = 2
# Small and quick: a random foundation (no pre-training), no client-side evaluation round.
CONFIG: dict[str, Any] = {
    "foundation": "none",
    "peers-per-cluster": 1,
    "num-rounds": 2,
    "inference-requests": 1,
    "fraction-evaluate": 0.0,
    "batch-size": 64,
    "device": "cpu",
}


def _load_lab() -> ModuleType:
    return importlib.import_module("gaisnet_flwr.experiments.lab")


lab_script = _load_lab()


def as_run_config(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    running = lab_script.Lab(tmp_path_factory.mktemp("a lab"), CLUSTERS, peers_per_cluster=1)
    started = dict[str, int]()
    try:
        running.up()
        yield running
    finally:
        started = {name: p.pid for name, p in running.procs.items()}
        running.down()
    # Every process the lab started (and all they started) is gone.
    alive = [p for p in lab_script.flwr_local.family(set(started.values())) if p.alive]
    left = [p for p in lab_script.flwr_local.processes().values()
            if p.alive and str(running.dir) in p.args]  # fmt: skip
    assert not alive and not left, f"left running: {alive + left}"


def read_rows(results: Path) -> list[dict[str, Any]]:
    return json.loads((results / "metrics.json").read_text())


def test_lab_run_matches_the_in_process_simulation(lab: Any, tmp_path: Path) -> None:
    outcome = lab.run(as_run_config({**CONFIG, "seed": 3}))
    assert outcome.ok, f"{outcome.problems}\n{outcome.log.read_text()[-3000:]}"
    deployed = outcome.results

    simulated = tmp_path / "sim"
    run_simulated({**CONFIG, "seed": 3, "output-dir": str(simulated)}, CLUSTERS)

    # The same tunable modules after round 1 (and 2), to float tolerance: the peers on the
    # network ran the segments the simulation ran in-process.
    for r in (1, 2):
        got = np.load(deployed / "rounds" / f"round-{r:03d}.npz")
        want = np.load(simulated / "rounds" / f"round-{r:03d}.npz")
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # The D2D traffic the peers reported is the traffic the in-process links counted.
    dep_rows, sim_rows = read_rows(deployed), read_rows(simulated)
    for key in ("train/d2d-bytes-fwd", "train/d2d-bytes-bwd", "train/num-examples"):
        assert dep_rows[1][key] == sim_rows[1][key] > 0
    assert dep_rows[1]["failed-clusters"] == 0

    # The inference request went through the network chain: recompute it here.
    served = json.loads((deployed / "inference.json").read_text())[0]
    assert "error" not in served, served
    cfg = RunConfig.from_run_config({**CONFIG, "seed": 3})
    data = load_image_data(data_spec(cfg))
    edge = edge_image_data(
        data, 0, list(edge_shares(cfg.hierarchy)), cfg.hierarchy.edge_domains[0], seed=cfg.run.seed
    )
    _, val = cluster_datasets(edge, int(served["partition-id"]), CLUSTERS, data_spec(cfg))
    model = build_model(cfg.model, cfg.cloud, data.num_classes, cfg.run.seed)
    final = np.load(deployed / "final_tunable.npz")
    model.load_tunable_state({k.split("/", 1)[1]: torch.from_numpy(final[k]) for k in final.files})
    images = torch.stack([val[i][0] for i in range(len(val))])
    expected = SplitChain(model, derive(cfg).plan).infer(images).argmax(dim=1)
    assert served["predictions"] == expected.tolist()

    # Every peer process served sessions (2 training rounds at least).
    for c in range(CLUSTERS):
        for m in (1, 2):
            log = (lab.logs / f"{lab.peer_name(c, m)}.log").read_text()
            assert log.count("opened") >= 2, log


def kill_at_first_step(lab: Any, name: str, done: threading.Event) -> None:
    """Watch the peer's log; at its next first training step, SIGKILL it and start it again."""
    log = lab.logs / f"{name}.log"
    offset = log.stat().st_size
    while not done.is_set():
        text = log.read_text()[offset:]
        if "first training step" in text:
            lab.kill(name)
            time.sleep(1.0)
            lab.start_peer(0, 1)  # same address: the next round tries again
            return
        time.sleep(0.02)


def test_a_peer_killed_mid_round_costs_only_its_cluster(lab: Any) -> None:
    name = lab.peer_name(0, 1)
    done = threading.Event()
    watcher = threading.Thread(target=kill_at_first_step, args=(lab, name, done), daemon=True)
    watcher.start()
    try:
        outcome = lab.run(as_run_config({**CONFIG, "num-rounds": 3, "inference-requests": 0}))
    finally:
        done.set()
        watcher.join(timeout=30)
    assert outcome.ok, f"{outcome.problems}\n{outcome.log.read_text()[-3000:]}"
    rows = read_rows(outcome.results)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # every round completed
    first = rows[1]
    assert first["failed-clusters"] == 1
    reason = first["failures"][0]["reason"]
    assert f"peer1 at 127.0.0.1:{lab.peer_ports[(0, 1)]}" in reason, reason
    assert first["train/num-clusters"] == 1  # aggregated from the cluster that succeeded
    assert rows[-1]["failed-clusters"] == 0, rows[-1]["failures"]  # the peer is back
    # Nothing already saved is lost: every round's modules and the final ones are on disk.
    saved = sorted(p.name for p in (outcome.results / "rounds").iterdir())
    assert saved == [f"round-{r:03d}.npz" for r in range(4)]
    assert (outcome.results / "final_tunable.npz").is_file()
