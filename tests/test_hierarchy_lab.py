"""The paper's hierarchy as processes of their own, on loopback (issue 25; docs/deploy.md).

`HierarchyLab` brings up a cloud SuperLink, 2 edge SuperLinks, each edge's cloud-facing
SuperNode, 2 cluster SuperNodes per edge and 2 `gaisnet-peer`s per cluster (start point, peer,
end point), every process with 1 torch thread; shared by the tests in this file and stopped by
PID at the end: no process may be left.

1. The deployed hierarchy (cloud run + 2 edge runs, 2 cloud rounds, K = 1), its cloud killed
   (SIGKILL) once cloud round 1 is saved and resumed (resume=true), ends with the very modules
   (np.array_equal) of the one-ServerApp logical hierarchy run in-process, uninterrupted, with
   the same seed: so the deployment equals the logical hierarchy and a resumed cloud loses
   nothing that was completed (one lab run for both: the run is the suite's largest cost).
   The foundation the cloud pre-trained reached every edge's and every start point's own
   folder over the wire (checked by SHA-256), nobody copied it; each tier keeps its metrics.
2. A cloud whose stopping rule is met (`target-accuracy`) ends after that cloud round and tells
   its edges, which end with its delivery: every tier's files stop at that round, with the
   modules and the reason of the one-ServerApp run that stops there.
3. An edge killed in the middle of cloud round 1 costs only its contribution: the cloud's row
   names it, the other edge's modules are the cloud's delivery; restarted, it rejoins in cloud
   round 2 with the modules the cloud held for it, keeping the rows its first process recorded.
4. With TLS, only edge servers whose SuperNode key is registered with the cloud's SuperLink
   join it (Flower's SuperNode authentication); another key is refused.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.deploy.pki import make_supernode_key
from gaisnet_flwr.deploy.shipping import held
from gaisnet_flwr.experiments import flwr_local
from gaisnet_flwr.experiments.lab import BIN, HierarchyLab

pytestmark = [pytest.mark.simulation, pytest.mark.slow]

EDGES, PER_EDGE = 2, 2
# Small and quick: a 2-block ViT, its foundation pre-trained for one epoch by the cloud.
CONFIG: dict[str, Any] = {
    "foundation": "cloud",
    "pretrain-epochs": 1,
    "depth": 2,
    "peers-per-cluster": 1,
    "num-rounds": 2,
    "cloud-every": 1,
    "edge-domains": "none,invert",
    "inference-requests": 0,
    "fraction-evaluate": 0.0,
    "batch-size": 64,
    "device": "cpu",
    "seed": 3,
    "cloud-timeout-s": 300,
}


def as_run_config(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HierarchyLab]:
    running = HierarchyLab(
        tmp_path_factory.mktemp("a hierarchy lab"), EDGES, PER_EDGE, 1, threads=1
    )
    started: set[int] = set()
    try:
        running.up()
        yield running
    finally:
        started = {p.pid for p in running.procs.values()}
        running.down()
    alive = [p for p in flwr_local.family(started) if p.alive]
    left = [p for p in flwr_local.processes().values()
            if p.alive and str(running.dir) in p.args]  # fmt: skip
    assert not alive and not left, f"left running: {alive + left}"


def modules(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def of_edge(mods: dict[str, np.ndarray], edge: int) -> dict[str, np.ndarray]:
    """`edge<e>/<module>` keys of one edge, without the prefix."""
    prefix = f"edge{edge}/"
    return {k[len(prefix) :]: v for k, v in mods.items() if k.startswith(prefix)}


def assert_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    unequal = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not unequal, unequal


def rows(results: Path) -> list[dict[str, Any]]:
    return json.loads((results / "metrics.json").read_text())


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:.0f} s")
        time.sleep(0.1)


def outcome_text(lab: HierarchyLab) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(lab.logs.glob("flwr-run-*.log")))


def logical_hierarchy(lab: HierarchyLab, config: dict[str, Any], output_dir: Path) -> Path:
    """The one-ServerApp logical hierarchy of the lab's shape, in-process, with the cloud's
    foundation file: its results folder."""
    node_configs = [
        {"edge-id": c // PER_EDGE, "partition-id": c % PER_EDGE, "num-partitions": PER_EDGE}
        for c in range(EDGES * PER_EDGE)
    ]
    settings = {"output-dir": str(output_dir), "foundation-dir": str(lab.dir / "cloud/foundation")}
    run_inprocess({**config, **settings}, EDGES * PER_EDGE, node_configs, client_threads=1)
    return output_dir


def test_deployed_hierarchy_resumed_equals_the_logical_one(
    lab: HierarchyLab, tmp_path: Path
) -> None:
    name = "resumed"
    started = time.monotonic()
    for e in range(EDGES):
        lab.start_edge(e, as_run_config(CONFIG), name=name)
    results = lab.results("cloud", name)

    def round_1_done() -> bool:
        # Saved (cloud-state.json) and recorded with the edges' accuracy after the delivery:
        # a kill between the two would lose only that in-flight evaluation, not the modules.
        try:
            saved = json.loads((results / "cloud-state.json").read_text())["completed"] >= 1
            return saved and "edge1/accuracy" in rows(results)[0]
        except (OSError, ValueError, KeyError, IndexError):
            return False

    killed = threading.Event()

    def kill() -> None:
        wait_for(round_1_done, 600, "the cloud completed cloud round 1")
        lab.restart("cloud")  # SIGKILL, then the SuperLink and the edges' SuperNodes again
        killed.set()

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    first = lab.run_cloud(as_run_config(CONFIG), name=name)
    killer.join(timeout=120)
    assert killed.is_set() and not first.ok
    resumed = lab.run_cloud(as_run_config(CONFIG), resume=True, name=name)
    edges = lab.finish_edges()
    took = time.monotonic() - started
    assert resumed.ok, f"{resumed.why}\n{outcome_text(lab)}"
    assert all(e.ok for e in edges), [e.why for e in edges]
    cloud = lab.results("cloud", name)

    # The foundation: made once by the cloud, in every edge's and start point's own folder.
    made = held(lab.dir / "cloud" / "foundation")
    assert len(made) == 1
    for e in range(EDGES):
        assert held(lab.edge_dir(e) / "foundation") == made
    for c in range(EDGES * PER_EDGE):
        assert held(lab.node_dir(c) / "foundation") == made

    reference = logical_hierarchy(lab, CONFIG, tmp_path / "logical")
    for r in (1, 2):
        assert_equal(modules(cloud / "rounds" / f"round-{r:03d}.npz"),
                     modules(reference / "rounds" / f"round-{r:03d}.npz"))  # fmt: skip
    final = modules(cloud / "final_tunable.npz")
    assert_equal(final, modules(reference / "final_tunable.npz"))
    for e in range(EDGES):  # each edge ends with what the cloud delivered
        assert_equal(modules(lab.results(f"edge{e}", name) / "final_tunable.npz"),
                     {f"edge{e}/{k}": v for k, v in of_edge(final, e).items()})  # fmt: skip

    # Each tier's metrics: a row per cloud round (both edges in), a row per edge round.
    cloud_rows = rows(cloud)
    assert [r["round"] for r in cloud_rows] == [1, 2]
    for row in cloud_rows:
        assert row["edges-contributed"] == EDGES and row["missing-edges"] == []
        assert row["edge0/edge-weight"] > 0 and "edge1/accuracy" in row
    ref_rows = rows(reference)
    # The cost model's totals: K = 1 and clusters of equal count make the slowest edge's time
    # the hierarchy round's; the energy sums the same clusters' in another order.
    for row, ref in zip(cloud_rows, ref_rows[1:], strict=True):
        assert row["total-latency-s"] == ref["total-latency-s"] > 0
        assert row["total-energy-j"] == pytest.approx(ref["total-energy-j"], rel=1e-12)
    for e in range(EDGES):
        edge_rows = rows(lab.results(f"edge{e}", name))
        assert [r["round"] for r in edge_rows] == [0, 1, 2]
        key = f"edge{e}/accuracy"
        assert [r[key] for r in edge_rows] == [r[key] for r in ref_rows]
        assert list(lab.results(f"edge{e}", name).glob("events.out.tfevents.*"))
    assert list(cloud.glob("events.out.tfevents.*"))
    print(f"[hierarchy lab] 2 cloud rounds and a resume in {took:.0f} s (start-up not included)")


def test_a_deployed_cloud_that_converges_ends_every_tier_as_the_logical_one_ends(
    lab: HierarchyLab, tmp_path: Path
) -> None:
    # Any first accuracy reaches 0.01: the cloud stops after cloud round 1 of 3, and tells the
    # edges, which end with its delivery; one ServerApp stops after the same round.
    config = {**CONFIG, "num-rounds": 3, "target-accuracy": 0.01}
    name = "converged"
    for e in range(EDGES):
        lab.start_edge(e, as_run_config(config), name=name)
    outcome = lab.run_cloud(as_run_config(config), name=name)
    edges = lab.finish_edges()
    assert outcome.ok, f"{outcome.why}\n{outcome_text(lab)}"
    assert all(e.ok for e in edges), [e.why for e in edges]
    cloud = lab.results("cloud", name)
    cloud_rows = rows(cloud)
    assert [r["round"] for r in cloud_rows] == [1]
    reached = f"central accuracy {cloud_rows[0]['accuracy']:.4f} reached target-accuracy 0.01"
    assert cloud_rows[0]["stopped"] == reached
    assert json.loads((cloud / "cloud-state.json").read_text())["rows"] == cloud_rows
    final = modules(cloud / "final_tunable.npz")
    assert_equal(final, modules(cloud / "rounds" / "round-001.npz"))
    for e in range(EDGES):
        edge = lab.results(f"edge{e}", name)
        assert_equal(modules(edge / "final_tunable.npz"),
                     {f"edge{e}/{k}": v for k, v in of_edge(final, e).items()})  # fmt: skip
        edge_rows = rows(edge)
        assert [r["round"] for r in edge_rows] == [0, 1]
        assert edge_rows[-1]["stopped"] == "the cloud stopped fine-tuning after cloud round 1"

    reference = logical_hierarchy(lab, config, tmp_path / "logical")
    ref_rows = rows(reference)
    assert [r["round"] for r in ref_rows] == [0, 1] and ref_rows[-1]["stopped"] == reached
    assert_equal(final, modules(reference / "final_tunable.npz"))


def test_an_edge_killed_mid_round_costs_only_its_contribution(lab: HierarchyLab) -> None:
    name = "edge-fault"
    since = time.time_ns()
    for e in range(EDGES):
        lab.start_edge(e, as_run_config(CONFIG), name=name)
    accepted = lab.edge_dir(1) / "accepted"

    def edge1_training_round_1() -> bool:
        return any(int(p.name.split("-")[0]) > since and "-c1-train" in p.name
                   for p in accepted.glob("*.json"))  # fmt: skip

    before: list[list[dict[str, Any]]] = []  # the rows edge 1's first process recorded

    def kill_and_restart() -> None:
        wait_for(edge1_training_round_1, 240, "edge 1 took cloud round 1")
        # Its SuperLink and ServerApp die (SIGKILL), and come back with its clusters' SuperNodes.
        lab.restart("edge1")
        recorded = lab.results("edge1", name) / "metrics.json"
        before.append(json.loads(recorded.read_text()) if recorded.exists() else [])
        lab.start_edge(1, as_run_config(CONFIG), name=name)

    killer = threading.Thread(target=kill_and_restart, daemon=True)
    killer.start()
    cloud_outcome = lab.run_cloud(as_run_config(CONFIG), name=name)
    killer.join(timeout=60)
    edges = lab.finish_edges()
    assert cloud_outcome.ok, f"{cloud_outcome.why}\n{outcome_text(lab)}"
    assert edges[0].ok, edges[0].why

    cloud = lab.results("cloud", name)
    first, second = rows(cloud)
    assert first["missing-edges"] == [1] and first["edges-contributed"] == 1
    assert [f["edge"] for f in first["failures"]] == [1]
    assert "edge 1" in first["failures"][0]["reason"], first["failures"]
    assert second["missing-edges"] == [] and second["edges-contributed"] == EDGES
    # The surviving edge holds the cloud's delivery; the restarted one trained cloud round 2
    # from the modules the cloud held for it after round 1.
    final = modules(cloud / "final_tunable.npz")
    assert_equal(of_edge(modules(lab.results("edge0", name) / "final_tunable.npz"), 0),
                 of_edge(final, 0))  # fmt: skip
    round1 = of_edge(modules(cloud / "rounds" / "round-001.npz"), 1)
    requests = lab.edge_dir(1) / "requests"
    sent = [p for p in sorted(requests.glob("*-c2-train.npz")) if int(p.name[:20]) > since]
    assert len(sent) == 1
    assert_equal(modules(sent[0]), round1)
    # Its rows: those its first process recorded (round 0, if it got that far), then round 1
    # (the cloud's delivery it rejoined with) and round 2.
    (earlier,) = before
    print(f"[hierarchy lab] edge 1's first process recorded rounds {[r['round'] for r in earlier]}")
    edge1_rows = rows(lab.results("edge1", name))
    assert edge1_rows[: len(earlier)] == earlier
    assert [r["round"] for r in edge1_rows] == [r["round"] for r in earlier] + [1, 2]


def test_only_registered_edge_servers_join_the_cloud(tmp_path: Path) -> None:
    # TLS everywhere, and Flower's SuperNode authentication on the cloud's SuperLink: each edge
    # server's SuperNode key is registered (flwr supernode register); another key is refused.
    lab = HierarchyLab(tmp_path / "tls", edges=1, clusters_per_edge=1, tls=True, threads=1)
    lab.warm = False  # no message runs here: no server to wait for
    started: set[int] = set()
    try:
        lab.up()
        wait_for(lambda: edges_online(lab) == 1, 60, "the edge's SuperNode came online")
        rogue = tmp_path / "rogue"
        make_supernode_key(rogue)
        port = flwr_local.free_ports(1)[0]
        lab.start_supernode("rogue", "cloud", port, 'edge-id=0 edge-dir="/nowhere"', key=rogue)
        assert lab.procs["rogue"].wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (lab.logs / "rogue.log").read_text()
    finally:
        started = {p.pid for p in lab.procs.values()}
        lab.down()
    assert not [p for p in flwr_local.family(started) if p.alive]


def edges_online(lab: HierarchyLab) -> int:
    """How many SuperNodes `flwr supernode list cloud` shows online."""
    listing = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "cloud", "--format", "json"],
        capture_output=True, text=True, env=lab.env(), timeout=120,
    )  # fmt: skip
    return listing.stdout.count('"status": "online"')
