"""The deployed hierarchy's parts, fast and without processes (issue 25; the loopback run is
tests/test_hierarchy_lab.py):

* the foundation on the wire: a tampered or misnamed file is refused by name, nothing written;
  a start point's ClientApp installs what it is shipped in its own foundation-dir;
* the edge's folder (apps/bridge.py): a request answered; an edge server that died while
  serving, or nobody answering by the deadline, is reported at once / at the deadline;
* the cloud (`CloudServer`): the edges' modules averaged by their examples, as `Cloud.deliver`
  does in one ServerApp; an edge that failed costs only its contribution and is named; a cloud
  round no edge contributed to fails the run; a resumed cloud refuses another configuration.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps import client_app, edge_relay
from gaisnet_flwr.apps.bridge import BridgeReply, EdgeBridge, EdgeUnavailable
from gaisnet_flwr.apps.cloud_app import CloudRecorder, CloudState
from gaisnet_flwr.apps.edge_app import EdgeRun, earlier_rows, last_delivery
from gaisnet_flwr.apps.inprocess import assign_message_id, task_identity
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.contract import EdgeReport, EdgeRequest
from gaisnet_flwr.deploy.shipping import ShippedFile, ShippingError, held, sha256_of, sidecar
from strategies.cloud_edge import Cloud, CloudRound, CloudServer, RunFailedError, cloud_chunks

NAME = "foundation-vit-abc123.pt"


@pytest.fixture(autouse=True)
def a_serverapp_process() -> Iterator[None]:
    """Messages are made in a Flower process (its task identity), as the apps make them."""
    with task_identity(run_id=1, node_id=0):
        yield


def shipped(payload: bytes = b"weights" * 100) -> ShippedFile:
    return ShippedFile(NAME, sha256_of(payload), payload)


# -- the foundation on the wire -------------------------------------------------------------------
def test_a_shipped_foundation_is_installed_with_its_sidecar(tmp_path: Path) -> None:
    path = shipped().install(tmp_path)
    assert path == tmp_path / NAME and sidecar(path).read_text() == shipped().sha256
    assert held(tmp_path) == {NAME: shipped().sha256}
    assert ShippedFile.read(path) == shipped()  # and it can be passed on (edge -> start point)


def test_a_tampered_foundation_is_refused_by_name(tmp_path: Path) -> None:
    good = shipped()
    tampered = ShippedFile(good.name, good.sha256, good.payload[:-1] + b"X")
    with pytest.raises(ShippingError, match=rf"foundation {NAME}: .* refused \(corrupt or tamp"):
        tampered.install(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ShippingError, match="only a foundation checkpoint"):
        ShippedFile("../etc/passwd", good.sha256, good.payload).install(tmp_path)
    # A file on disk that no longer matches its sidecar is not held: it will be shipped anew.
    path = good.install(tmp_path)
    path.write_bytes(b"bit rot")
    assert held(tmp_path) == {}
    with pytest.raises(ShippingError, match="does not match its SHA-256 sidecar"):
        ShippedFile.read(path)


def test_the_foundation_is_read_for_shipping_only_when_a_node_lacks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every node holds it (a simulation's shared folder): not one byte of it is read again;
    a node that lacks it gets it; without a sidecar every node lacks it and the file is refused."""
    from gaisnet_flwr.apps.server_app import ship_foundation

    path = shipped().install(tmp_path / "cloud")
    reads: list[Path] = []
    real_read = ShippedFile.read

    def read(p: Path) -> ShippedFile:
        reads.append(p)
        return real_read(p)

    monkeypatch.setattr(ShippedFile, "read", read)

    class Grid:
        sent: list[int] = []

        def send_and_receive(self, messages: list, timeout: float) -> list:
            self.sent += [m.metadata.dst_node_id for m in messages]
            return []

    grid = cast(Any, Grid())
    ship_foundation(grid, path, {1: {NAME: shipped().sha256}, 2: {NAME: shipped().sha256}})
    assert reads == [] and grid.sent == []
    monkeypatch.setattr("gaisnet_flwr.apps.server_app.query_identities", lambda *a: None)
    ship_foundation(grid, path, {1: {NAME: shipped().sha256}, 2: {}})
    assert reads == [path] and grid.sent == [2]
    sidecar(path).unlink()
    with pytest.raises(ShippingError, match="sidecar"):
        ship_foundation(grid, path, {1: {NAME: shipped().sha256}})


def test_a_start_point_takes_its_foundation_into_its_own_folder(tmp_path: Path) -> None:
    own = tmp_path / "device"
    context = Context(
        1, 7, {"partition-id": 0, "num-partitions": 1, "foundation-dir": str(own)}, RecordDict(), {}
    )
    run_config = client_app.node_run_config(context, {})  # the run's, with the node's folder
    good = shipped()
    reply = client_app.foundation(c.ship_message(good, 7), context, run_config)
    assert not reply.has_error() and c.held_of(reply.content) == {NAME: good.sha256}
    assert held(own) == {NAME: good.sha256}
    tampered = c.ship_message(ShippedFile(NAME, "0" * 64, good.payload), 7)
    refused = client_app.foundation(tampered, context, run_config)
    assert refused.has_error() and refused.error.code == c.FOUNDATION_REFUSED
    assert NAME in str(refused.error.reason)
    # Its identity reply lists what it holds, so it is shipped nothing more.
    ident = client_app.identity(Message(RecordDict(), 7, "query.identity"), context, run_config)
    assert c.held_of(ident.content) == {NAME: good.sha256}


def test_an_edge_relay_installs_the_foundation_in_the_edge_folder(tmp_path: Path) -> None:
    context = Context(1, 7, {"edge-id": 1, "edge-dir": str(tmp_path)}, RecordDict(), {})
    reply = edge_relay.foundation(c.ship_message(shipped(), 7), context)
    assert not reply.has_error()
    assert held(EdgeBridge(tmp_path).foundation_dir) == {NAME: shipped().sha256}
    ident = edge_relay.identity(Message(RecordDict(), 7, "query.identity"), context)
    assert c.EdgeIdentity.from_record(ident.content).edge == 1
    assert c.held_of(ident.content) == {NAME: shipped().sha256}


# -- the edge's folder ----------------------------------------------------------------------------
def test_a_request_travels_through_the_edge_folder(tmp_path: Path) -> None:
    bridge = EdgeBridge(tmp_path)
    bridge.open()
    sent = {"prompt.0": np.arange(4, dtype=np.float32)}
    rid = bridge.submit("train", 2, 3, 4, True, sent, time.time() + 30)
    request = bridge.next_request(timeout_s=1)
    assert request is not None and (request.kind, request.first, request.last) == ("train", 3, 4)
    assert request.final and np.array_equal(request.modules["prompt.0"], sent["prompt.0"])
    assert bridge.next_request(timeout_s=0) is None  # taken: nobody takes it twice
    back = {"prompt.0": np.ones(4, dtype=np.float32)}
    bridge.reply(request, BridgeReply(back, 12.0, {"edge0/train-loss": 0.5}, []))
    answer = bridge.wait(rid, time.time() + 5, "edge 0")
    assert answer.weight == 12.0 and np.array_equal(answer.modules["prompt.0"], back["prompt.0"])
    with pytest.raises(ValueError, match="valid: train, evaluate"):
        bridge.submit("infer", 1, 1, 1, False, {}, time.time() + 1)


def test_an_edge_that_dies_while_serving_is_reported_at_once(tmp_path: Path) -> None:
    bridge = EdgeBridge(tmp_path)
    rid = bridge.submit("train", 1, 1, 1, False, {}, time.time() + 600)
    # Another process takes the request (as an edge ServerApp does), then dies.
    taker = (
        "import sys; from gaisnet_flwr.apps.bridge import EdgeBridge; "
        "b = EdgeBridge(sys.argv[1]); b.open(); assert b.next_request(timeout_s=5)"
    )
    subprocess.run([sys.executable, "-c", taker, str(tmp_path)], check=True)
    started = time.monotonic()
    with pytest.raises(EdgeUnavailable, match=r"edge 1's server \(pid \d+\) stopped while serving"):
        bridge.wait(rid, time.time() + 600, "edge 1")
    assert time.monotonic() - started < 5  # not at the deadline
    assert not bridge.server_running()


def test_a_request_nobody_takes_is_missed_at_its_deadline(tmp_path: Path) -> None:
    bridge = EdgeBridge(tmp_path)
    rid = bridge.submit("train", 1, 1, 1, False, {}, time.time() + 0.5)
    with pytest.raises(EdgeUnavailable, match="no edge server is running: start the edge's run"):
        bridge.wait(rid, time.time() + 0.5, "edge 0")
    assert not list((tmp_path / "requests").glob("*.json"))  # withdrawn: a late edge skips it


# -- the cloud ------------------------------------------------------------------------------
def edge_modules(prompt: float, head: float) -> ArrayRecord:
    return ArrayRecord({
        "prompt.0": Array(np.full(3, prompt, dtype=np.float32)),
        "head.weight": Array(np.full(2, head, dtype=np.float32)),
    })  # fmt: skip


def answer(message: Message, modules: ArrayRecord | None, weight: float) -> Message:
    report = EdgeReport(modules, weight, {"edge-x": 1.0})
    return Message(report.content(), reply_to=message)


def sent_messages(cloud: CloudServer, arrays: ArrayRecord) -> dict[int, Message]:
    messages = list(cloud.configure_train(1, arrays, ConfigRecord(), None))  # type: ignore[arg-type]
    by_edge = {}
    for i, m in enumerate(messages):
        assign_message_id(m, f"m{i}")
        by_edge[EdgeRequest.from_message(m).modules["prompt.0"].numpy()[0]] = m
    return {int(k): m for k, m in by_edge.items()}


def test_the_cloud_averages_the_edges_by_their_examples() -> None:
    records: list[CloudRound] = []
    cloud = CloudServer(Cloud(1, 1.0), cloud_chunks(2, 1), lambda grid: {0: 10, 1: 11, 2: 12}, 3,
                        60, on_round=records.append)  # fmt: skip
    held_now = c.join_edges({e: edge_modules(e, e) for e in range(3)})
    sent = sent_messages(cloud, held_now)
    request = EdgeRequest.from_message(sent[0])
    assert (request.cloud_round, request.first, request.last, request.final) == (1, 1, 1, False)
    replies = [
        answer(sent[0], edge_modules(2.0, 5.0), 10),
        answer(sent[1], edge_modules(8.0, 6.0), 30),
        Message(Error(c.EDGE_FAILED, "edge 2's server (pid 9) stopped"), reply_to=sent[2]),
    ]
    arrays, metrics = cloud.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    delivered = c.split_edges(arrays)
    # prompts: (10 * 2 + 30 * 8) / 40 = 6.5 for every edge, the failed one included (weight 0);
    # heads stay each edge's own (cloud-modules = prompts), edge 2's is what it was sent.
    for e in range(3):
        assert np.array_equal(delivered[e]["prompt.0"].numpy(), np.full(3, 6.5, np.float32))
    assert [delivered[e]["head.weight"].numpy()[0] for e in range(3)] == [5.0, 6.0, 2.0]
    (record,) = records
    assert record.contributed == [0, 1] and record.missing == [2]
    assert record.failures[0]["reason"] == "edge 2's server (pid 9) stopped"
    assert metrics["edges-contributed"] == 2 and metrics["edges-failed"] == 1
    assert metrics["edge1/edge-weight"] == 30 and metrics["cloud-round"] == 1


def test_a_cloud_that_stops_sends_every_edge_its_delivery_marked_final() -> None:
    # Cloud round 1 of 3 met a stopping rule: each edge connected now, the one that failed the
    # round included, gets the delivery as the final one, and ends its run with it.
    cloud = CloudServer(Cloud(1, 1.0), cloud_chunks(3, 1), lambda grid: {0: 10, 1: 11}, 2, 60)
    sent = sent_messages(cloud, c.join_edges({e: edge_modules(e, e) for e in range(2)}))
    delivered, _ = cloud.aggregate_train(1, [answer(sent[0], edge_modules(4, 4), 10)])
    assert delivered is not None

    class Grid:
        requests: list[EdgeRequest] = []

        def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
            for i, m in enumerate(messages):
                assign_message_id(m, f"stop{i}")
                self.requests.append(EdgeRequest.from_message(m))
            return [Message(RecordDict(), reply_to=m) for m in messages]

    grid = Grid()
    cloud.stop(grid, delivered)  # type: ignore[arg-type]
    assert [(r.kind, r.cloud_round, r.last, r.final) for r in grid.requests] == [
        ("evaluate", 1, 1, True)
    ] * 2
    for e, request in enumerate(grid.requests):
        want = c.split_edges(delivered)[e]
        assert all(np.array_equal(request.modules[k].numpy(), want[k].numpy()) for k in want)


def test_a_cloud_round_no_edge_contributed_to_fails_the_run() -> None:
    cloud = CloudServer(Cloud(1, 1.0), cloud_chunks(2, 1), lambda grid: {0: 10, 1: 11}, 2, 60)
    sent = sent_messages(cloud, c.join_edges({e: edge_modules(e, e) for e in range(2)}))
    replies = [answer(sent[0], edge_modules(1, 1), 0.0)]  # edge 0 trained nothing; 1 silent
    with pytest.raises(RunFailedError, match=r"cloud round 1: no edge contributed \(edge 1: no re"):
        cloud.aggregate_train(1, replies)


def test_cloud_rounds_cover_the_hierarchy_rounds() -> None:
    assert cloud_chunks(5, 2) == [(1, 2), (3, 4), (5, 5)]
    assert cloud_chunks(3, 0) == [(1, 3)]  # isolated edges: one request for all rounds


def test_a_cloud_resumes_only_its_own_configuration(tmp_path: Path) -> None:
    config = {"num-rounds": 2, "seed": 3, "resume": False}
    recorder = CloudRecorder(tmp_path, config)
    modules = {"edge0/prompt.0": np.ones(2, dtype=np.float32)}
    recorder.save_state(1, modules)
    state = CloudState.load(tmp_path, {**config, "resume": True})
    assert state is not None and state.completed == 1
    assert np.array_equal(state.modules["edge0/prompt.0"].numpy(), modules["edge0/prompt.0"])
    with pytest.raises(RuntimeError, match=r"differs in \['seed'\]"):
        CloudState.load(tmp_path, {**config, "seed": 4})
    assert CloudState.load(tmp_path / "fresh", config) is None


def test_the_cloud_s_totals_take_the_slowest_edge_s_time_and_every_edge_s_energy(
    tmp_path: Path,
) -> None:
    recorder = CloudRecorder(tmp_path, {"seed": 3})
    modules = edge_modules(1, 1)
    for number, prices in ((1, {0: (3.0, 10.0), 1: (5.0, 20.0)}), (2, {0: (4.0, 1.0)})):
        metrics = {
            **{c.edge_key(e, c.EDGE_ROUNDS_LATENCY): s for e, (s, _) in prices.items()},
            **{c.edge_key(e, c.EDGE_ROUNDS_ENERGY): j for e, (_, j) in prices.items()},
        }
        reports = {e: EdgeReport(modules, 1.0, {}) for e in prices}  # edge 1 out of round 2
        delivered = {e: modules for e in (0, 1)}
        recorder.round(CloudRound(number, number, number, reports=reports, delivered=delivered,
                                  metrics=metrics))  # fmt: skip
    first, second = recorder.rows
    assert (first[c.TOTAL_LATENCY], first[c.TOTAL_ENERGY]) == (5.0, 30.0)
    assert (second[c.TOTAL_LATENCY], second[c.TOTAL_ENERGY]) == (9.0, 31.0)


def test_tier_settings_are_checked_before_any_work() -> None:
    with pytest.raises(ConfigError, match="tier='edge' needs edge-dir"):
        RunConfig.from_run_config({"tier": "edge"})
    with pytest.raises(ConfigError, match=r"edge-id=2 is out of range: edge-domains lists 2"):
        RunConfig.from_run_config({"tier": "edge", "edge-dir": "/x", "edge-id": 2,
                                   "edge-domains": "none,invert"})  # fmt: skip
    with pytest.raises(ConfigError, match="hierarchy, cloud, edge"):
        RunConfig.from_run_config({"tier": "fog"})


def test_edge_request_and_report_round_trip() -> None:
    request = EdgeRequest("evaluate", 2, 3, 4, True, 30.0, edge_modules(1, 2))
    back = EdgeRequest.from_message(request.to_message(5))
    assert back.kind == "evaluate" and back.final and back.timeout_s == 30.0
    report = EdgeReport(None, 0.0, {"edge0/accuracy": 0.5}, ({"edge": 0, "reason": "x"},))
    again = EdgeReport.from_content(report.content())
    assert again.modules is None and again.metrics == {"edge0/accuracy": 0.5}
    assert again.failures == ({"edge": 0, "reason": "x"},)
    assert json.loads(json.dumps(list(again.failures)))  # JSON all the way (metrics.json)


def test_gaisnet_lab_edges_refuses_domains_that_do_not_match(tmp_path: Path) -> None:
    from gaisnet_flwr.experiments.lab import main

    with pytest.raises(SystemExit, match=r"--edges 2 but edge-domains='none' names 1"):
        main(["run", "--edges", "2", "--dir", str(tmp_path), "--", "--run-config",
              "edge-domains='none'"])  # fmt: skip
    assert not list(tmp_path.iterdir())  # refused before anything started


def test_an_edge_given_another_run_config_than_the_cloud_refuses_naming_the_keys() -> None:
    from gaisnet_flwr.apps.edge_app import check_shared
    from gaisnet_flwr.contract import shared_keys

    cloud = RunConfig.from_run_config({"tier": "cloud", "seed": 3}).to_dict()
    edge = RunConfig.from_run_config(
        {
            "tier": "edge",
            "edge-dir": "/srv/e0",
            "output-dir": "/x",
            "peers-per-cluster": 2,
            "seed": 3,
        }  # fmt: skip
    ).to_dict()
    check_shared(0, edge, shared_keys(cloud))  # only the tier's own keys differ
    with pytest.raises(ConfigError, match=r"edge 1: its run-config differs from the cloud's in "
                       r"\['num-rounds', 'seed'\]"):  # fmt: skip
        check_shared(1, {**edge, "seed": 4, "num-rounds": 9}, shared_keys(cloud))
    # and the shared keys travel with every request
    request = EdgeRequest("train", 1, 1, 1, False, 30.0, edge_modules(1, 1), shared_keys(cloud))
    assert EdgeRequest.from_message(request.to_message(5)).shared == shared_keys(cloud)


def test_a_lab_run_whose_cloud_failed_ends_without_waiting_for_the_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cloud refused at its first check (say peers-per-cluster > depth) sends no request: the
    # edges would wait for one until finish_edges' timeout (a lab that hung for 10 minutes).
    from gaisnet_flwr.experiments import flwr_local
    from gaisnet_flwr.experiments.lab import HierarchyLab

    lab = HierarchyLab(tmp_path / "lab", edges=2, clusters_per_edge=1, threads=1)
    started: list[int] = []
    failed = flwr_local.RunOutcome(
        rc=1, run_id="1", status="finished:failed", final=None, results=tmp_path / "cloud",
        log=tmp_path / "cloud.log", problems=["the ServerApp failed: ConfigError: ..."],
    )  # fmt: skip
    monkeypatch.setattr(lab, "start_edge", lambda e, *a, **k: started.append(e))
    monkeypatch.setattr(lab, "run_cloud", lambda *a, **k: failed)

    def finish_edges(*_: object, **__: object) -> None:
        raise AssertionError("waited for edges whose cloud had failed")

    monkeypatch.setattr(lab, "finish_edges", finish_edges)
    outcome = lab.run("")
    assert started == [0, 1] and not outcome.ok
    assert outcome.why == "cloud: the ServerApp failed: ConfigError: ..."


# -- an edge server that restarts ----------------------------------------------------------------
def test_a_restarted_edge_finds_its_rows_for_the_same_run_config_only(tmp_path: Path) -> None:
    config = RunConfig.from_run_config({"tier": "edge", "edge-dir": "/x", "seed": 3}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.json").write_text(json.dumps([{"round": 0}, {"round": 1}]))
    assert earlier_rows(tmp_path, config) == [{"round": 0}, {"round": 1}]
    assert earlier_rows(tmp_path, {**config, "seed": 4}) == []
    assert earlier_rows(tmp_path / "none", config) == []


def test_the_cloud_delivers_after_the_last_round_of_each_cloud_round() -> None:
    assert last_delivery({0, 1, 2, 3}, num_rounds=5, cloud_every=2) == 2
    assert last_delivery({0, 1}, num_rounds=5, cloud_every=2) == 0
    assert last_delivery({0, 1, 2}, num_rounds=3, cloud_every=1) == 2


def test_a_restarted_edge_keeps_its_rows_and_its_strategy_s_state(tmp_path: Path) -> None:
    # The earlier process recorded rounds 0-2 (cloud-every 1) and died training round 3; the
    # cloud counted it out of cloud round 3 and sends it round 4 with the modules of its last
    # delivery, after round 2: its FedAdam state after round 2 comes back.
    from flwr.serverapp.strategy import FedAdam

    from gaisnet_flwr.apps.recorder import round_file, save_npz
    from gaisnet_flwr.apps.resume import STATE, server_state

    saved = FedAdam()
    saved.m_t = {"prompt.0": np.full(3, 0.25, np.float32)}
    saved.v_t = {"prompt.0": np.full(3, 0.5, np.float32)}
    save_npz(round_file(tmp_path, 2, STATE), server_state({1: saved}))
    save_npz(round_file(tmp_path, 1, STATE), server_state({1: FedAdam()}))
    fresh = FedAdam()
    edge = EdgeRun.__new__(EdgeRun)
    hierarchy = SimpleNamespace(num_rounds=5, cloud_every=1)
    edge.run = SimpleNamespace(stateful=True, cfg=SimpleNamespace(hierarchy=hierarchy),
                               output_dir=tmp_path, strategies={1: fresh})  # fmt: skip
    edge.edge, edge.recorder, edge.recorded = 1, SimpleNamespace(rows=[]), set()
    edge.earlier = [{"round": r} for r in range(3)]
    edge.pick_up(4)
    assert edge.recorder.rows == [{"round": 0}, {"round": 1}, {"round": 2}]
    assert edge.recorded == {0, 1, 2} and edge.earlier == []
    assert np.array_equal(fresh.m_t["prompt.0"], saved.m_t["prompt.0"])
    assert np.array_equal(fresh.v_t["prompt.0"], saved.v_t["prompt.0"])

    # A request for round 1 starts a run: a finished run's rows in the folder are not its own.
    edge.earlier, edge.recorder.rows, edge.recorded = [{"round": 0}], [], set()
    edge.pick_up(1)
    assert edge.recorder.rows == [] and edge.recorded == set()
