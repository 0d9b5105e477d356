"""The cloud-edge hierarchy: aggregation math against hand-computed values, node -> edge mapping."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from gaisnet_flwr.contract import NodeIdentity, join_edges, split_edges
from strategies.cloud_edge import Cloud, CloudEdgeStrategy, cloud_aggregate
from strategies.edge import EdgeServer
from strategies.registry import ModuleFedAvg
from tests.conftest import edge_servers, make_error_reply, make_reply

pytestmark = pytest.mark.usefixtures("task_identity")


def arrays(prompt: float, head: float) -> dict[str, np.ndarray]:
    return {
        "prompt.0": np.full((2, 2), prompt, np.float32),
        "head.weight": np.full(3, head, np.float32),
    }


def test_cloud_aggregate_by_hand() -> None:
    # Prepare: edge 0 trained on 30 examples, edge 1 on 10.
    modules = {0: arrays(1.0, 5.0), 1: arrays(5.0, -5.0)}
    # Execute: the cloud averages the prompts only, delivering half cloud, half own.
    out = cloud_aggregate(modules, {0: 30.0, 1: 10.0}, ["prompt.0"], mix=0.5)
    # Assert: cloud prompt = (30*1 + 10*5) / 40 = 2.0; edge 0 gets 0.5*2 + 0.5*1 = 1.5, edge 1
    # gets 0.5*2 + 0.5*5 = 3.5; heads stay the edges' own.
    np.testing.assert_allclose(out[0]["prompt.0"], 1.5)
    np.testing.assert_allclose(out[1]["prompt.0"], 3.5)
    np.testing.assert_array_equal(out[0]["head.weight"], 5.0)
    np.testing.assert_array_equal(out[1]["head.weight"], -5.0)
    full = cloud_aggregate(modules, {0: 30.0, 1: 10.0}, ["prompt.0", "head.weight"], mix=1.0)
    np.testing.assert_allclose(full[1]["head.weight"], (30 * 5 - 10 * 5) / 40)
    none = cloud_aggregate(modules, {0: 30.0, 1: 10.0}, ["prompt.0"], mix=0.0)
    np.testing.assert_array_equal(none[1]["prompt.0"], 5.0)


def test_edge_keys_round_trip() -> None:
    per_edge = {e: ArrayRecord({k: Array(v) for k, v in arrays(e, -e).items()}) for e in (0, 1)}
    joined = join_edges(per_edge)
    assert sorted(joined) == [
        "edge0/head.weight",
        "edge0/prompt.0",
        "edge1/head.weight",
        "edge1/prompt.0",
    ]
    back = split_edges(joined)
    np.testing.assert_array_equal(back[1]["prompt.0"].numpy(), 1.0)
    with pytest.raises(ValueError, match="not of the form 'edge<e>/<module>'"):
        split_edges(ArrayRecord({"prompt.0": Array(np.zeros(1))}))


def test_two_edges_with_uneven_clusters_by_hand() -> None:
    # Prepare: edge 0 has clusters on nodes 100 and 101, edge 1 one cluster on node 102.
    strategy = CloudEdgeStrategy(
        edge_servers(
            {100: 0, 101: 0, 102: 1},
            lambda n: ModuleFedAvg(min_train_nodes=n, min_available_nodes=n),
        ),
        Cloud(every=2, mix=1.0, modules="prompts"),
    )
    start = join_edges(
        {e: ArrayRecord({k: Array(v) for k, v in arrays(0, 0).items()}) for e in (0, 1)}
    )
    messages = list(strategy.configure_train(1, start, ConfigRecord(), Mock(spec=Grid)))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102]
    replies = [
        make_reply(arrays(1.0, 1.0), 10, 0, node_id=100),
        make_reply(arrays(3.0, 3.0), 30, 1, node_id=101),
        make_reply(arrays(8.0, 8.0), 20, 0, node_id=102),
    ]

    # Execute round 1 (no cloud round): each edge averages only its own clusters.
    out, _ = strategy.aggregate_train(1, replies)
    edges = split_edges(out)
    # Assert: edge 0 = (10*1 + 30*3) / 40 = 2.5; edge 1 = its single cluster, 8.
    np.testing.assert_allclose(edges[0]["prompt.0"].numpy(), 2.5)
    np.testing.assert_allclose(edges[1]["prompt.0"].numpy(), 8.0)

    # Execute round 2 (cloud round, mix 1): prompts averaged across edges by examples 40 : 20.
    list(strategy.configure_train(2, start, ConfigRecord(), Mock(spec=Grid)))
    out, metrics = strategy.aggregate_train(2, replies)
    edges = split_edges(out)
    cloud = (40 * 2.5 + 20 * 8.0) / 60
    np.testing.assert_allclose(edges[0]["prompt.0"].numpy(), cloud, rtol=1e-6)
    np.testing.assert_allclose(edges[1]["prompt.0"].numpy(), cloud, rtol=1e-6)
    # Heads are not cloud modules here: each edge keeps its own.
    np.testing.assert_allclose(edges[0]["head.weight"].numpy(), 2.5)
    np.testing.assert_allclose(edges[1]["head.weight"].numpy(), 8.0)
    assert metrics is not None and metrics["cloud-round"] == 1
    assert metrics["edge0/clusters"] == 2 and metrics["edge1/clusters"] == 1


def test_an_edge_without_clusters_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"edge 1 has no client cluster"):
        EdgeServer(1, ModuleFedAvg(), {})


@pytest.mark.parametrize(
    ("num_nodes", "num_edges", "expected"),
    [
        (4, 1, [(0, 0, 4), (0, 1, 4), (0, 2, 4), (0, 3, 4)]),
        (4, 2, [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]),
        (5, 2, [(0, 0, 3), (0, 1, 3), (0, 2, 3), (1, 0, 2), (1, 1, 2)]),
        (3, 3, [(0, 0, 1), (1, 0, 1), (2, 0, 1)]),
    ],
)
def test_simulation_nodes_map_to_edges_in_contiguous_blocks(num_nodes, num_edges, expected):
    got = [
        NodeIdentity.from_node_config({"partition-id": p, "num-partitions": num_nodes}).place(
            num_edges
        )
        for p in range(num_nodes)
    ]
    assert got == expected


def test_deployment_nodes_name_their_edge() -> None:
    ident = NodeIdentity.from_node_config({"edge-id": 1, "partition-id": 2, "num-partitions": 3})
    assert ident.place(num_edges=2) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"edge-id=2 must be in \[0, 2\)"):
        NodeIdentity.from_node_config({"edge-id": 2, "partition-id": 0, "num-partitions": 1}).place(
            num_edges=2
        )
    with pytest.raises(ValueError, match="2 client clusters for 3 edge servers"):
        NodeIdentity.from_node_config({"partition-id": 0, "num-partitions": 2}).place(3)
    with pytest.raises(ValueError, match="node-config lacks 'partition-id'"):
        NodeIdentity.from_node_config({})


def test_a_failed_cluster_is_left_out_and_the_round_is_marked() -> None:
    # Prepare: edge 0 has nodes 100 and 101; node 101's D2D peer died (an error reply), and
    # node 102 of edge 1 never answered.
    rounds: list[tuple[int, dict, list]] = []
    strategy = CloudEdgeStrategy(
        edge_servers(
            {100: 0, 101: 0, 102: 1},
            lambda n: ModuleFedAvg(min_train_nodes=1, min_available_nodes=1),
        ),
        Cloud(every=0, mix=0.0, modules="all"),
        on_round=lambda r, metrics, failures: rounds.append((r, dict(metrics), failures)),
    )
    start = join_edges(
        {e: ArrayRecord({k: Array(v) for k, v in arrays(0, 0).items()}) for e in (0, 1)}
    )
    list(strategy.configure_train(1, start, ConfigRecord(), Mock(spec=Grid)))
    failed = make_error_reply(1)  # from node 101
    assert failed.metadata.src_node_id == 101
    replies = [make_reply(arrays(4.0, 4.0), 10, 0, node_id=100), failed]

    out, metrics = strategy.aggregate_train(1, replies)

    # Assert: edge 0 is node 100's modules alone; edge 1 keeps what it had.
    edges = split_edges(out)
    np.testing.assert_array_equal(edges[0]["prompt.0"].numpy(), 4.0)
    np.testing.assert_array_equal(edges[1]["prompt.0"].numpy(), 0.0)
    assert metrics is not None and metrics["failed-clusters"] == 2
    assert metrics["edge0/clusters"] == 1 and metrics["edge1/clusters"] == 0
    # The failures' details come from the replies (what the recorder is handed each round).
    ((_, _, failures),) = rounds
    by_node = {f["node"]: f for f in failures}
    assert by_node[101]["edge"] == 0 and by_node[101]["reason"] == failed.error.reason
    assert by_node[102]["reason"] == "no reply within the round's timeout"


def test_every_strategy_gets_the_replies_in_one_order_whichever_answered_first() -> None:
    # Prepare: a strategy that records the order it is handed the replies in.
    seen: list[list[int]] = []

    class Recording(ModuleFedAvg):
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            replies = list(replies)
            seen.append([r.metadata.src_node_id for r in replies])
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
            seen.append([r.metadata.src_node_id for r in replies])
            return None

    (edge,) = edge_servers(
        {100: 0, 101: 0, 102: 0},
        lambda n: Recording(min_train_nodes=1, min_available_nodes=1),
    ).values()
    start = ArrayRecord({k: Array(v) for k, v in arrays(0, 0).items()})
    list(edge.configure_train(1, start, ConfigRecord(), Mock(spec=Grid)))
    replies = [make_reply(arrays(p, p), 10, p, node_id=100 + p) for p in (0, 1, 2)]
    # Execute: the replies arrive in two different orders.
    for arrived in (replies, replies[::-1], [replies[1], replies[2], replies[0]]):
        edge.aggregate_train(1, arrived)
        edge.aggregate_evaluate(1, arrived)
    # Assert: the strategy saw them in (partition-id, node) order every time.
    assert seen == [[100, 101, 102]] * 6
