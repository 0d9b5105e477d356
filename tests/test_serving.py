"""The inference-serving strategy: one request per round, round-robin, failures reported."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from gaisnet_flwr.contract import join_edges
from strategies.serving import ServeRequests
from tests.conftest import make_error_reply

pytestmark = pytest.mark.usefixtures("task_identity")

# nodes 101, 102 on edge 0 and node 103 on edge 1; each edge's modules are told apart by value
NODE_EDGES = {102: 0, 101: 0, 103: 1}
ARRAYS = join_edges({e: ArrayRecord({"head.weight": Array(np.full(2, float(e)))}) for e in (0, 1)})


class Serving:
    """What the ServerApp serves requests with (strategies.serving.Serving), made up."""

    def request(self, modules: ArrayRecord, node: int) -> Message:
        return Message(RecordDict({"model": modules}), dst_node_id=node, message_type="query.infer")

    def report(self, reply: Message | None, node: int, edge: int, index: int) -> dict[str, Any]:
        row: dict[str, Any] = {"request": index, "node": node, "edge": edge}
        if reply is None or reply.has_error():
            row["error"] = "no reply" if reply is None else reply.error.reason
        else:
            row["accuracy"] = 1.0
        return row


def test_requests_go_round_robin_with_the_modules_of_the_nodes_edge() -> None:
    strategy = ServeRequests(NODE_EDGES, Serving())
    sent = []
    for server_round in range(1, 5):
        (message,) = strategy.configure_train(server_round, ARRAYS, None, None)  # type: ignore[arg-type]
        head = message.content.array_records["model"]["head.weight"].numpy()
        sent.append((message.metadata.dst_node_id, float(head[0])))
    assert sent == [(101, 0.0), (102, 0.0), (103, 1.0), (101, 0.0)]


def test_a_failed_request_is_reported_and_the_modules_stay_as_delivered() -> None:
    rows: list[dict[str, Any]] = []
    strategy = ServeRequests(NODE_EDGES, Serving(), rows.append)
    strategy.configure_train(1, ARRAYS, None, None)  # type: ignore[arg-type]
    arrays, metrics = strategy.aggregate_train(1, [make_error_reply(1)])
    assert arrays is None  # Strategy.start keeps the arrays it had
    assert rows == [{"request": 0, "node": 101, "edge": 0, "error": "cluster chain broke"}]
    assert metrics is not None and "error" not in metrics and metrics["node"] == 101
    strategy.configure_train(2, ARRAYS, None, None)  # type: ignore[arg-type]
    strategy.aggregate_train(2, [])  # no reply within the timeout
    assert rows[1] == {"request": 1, "node": 102, "edge": 0, "error": "no reply"}
