"""The message contract (gaisnet_flwr/contract.py): one definition of what travels between the
ServerApp and the client clusters, every metric with how it aggregates."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from gaisnet_flwr import contract as c
from gaisnet_flwr.contract import ClusterTask, TrainRequest
from tests.conftest import cluster_client, make_reply, make_task

pytestmark = pytest.mark.usefixtures("task_identity")
REPO = Path(__file__).resolve().parents[1]


def contract_strings() -> set[str]:
    """The keys and action names the contract writes out: metric keys (hyphenated), message
    types, and the scheduler's actions."""
    declared = {v for k, v in vars(c).items() if k.isupper() and isinstance(v, str)}
    keys = {v for v in declared if "-" in v or v.startswith("query.")}
    return keys | {"serve", "finetune"}


def test_no_metric_key_or_action_is_written_in_two_modules_outside_the_contract() -> None:
    where: dict[str, set[str]] = defaultdict(set)
    keys = contract_strings()
    assert {c.LATENCY, c.NUM_EXAMPLES, c.FAILED_CLUSTERS, c.QUERY_INFER} <= keys
    for root in ("gaisnet_flwr", "strategies", "clients"):
        for path in (REPO / root).rglob("*.py"):
            if path.name == "contract.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                    continue
                text = node.value.removeprefix(f"{c.TRAIN_ROW}/")
                for key in keys:
                    if text == key or text.startswith((f"{key}/", f"{key}:")):
                        where[key].add(str(path.relative_to(REPO)))
    twice = {k: sorted(m) for k, m in where.items() if len(m) > 1}
    assert not twice, f"write these through gaisnet_flwr/contract.py: {twice}"


def test_every_metric_a_train_reply_carries_is_declared() -> None:
    tiny = {"depth": 2, "embed-dim": 32, "num-heads": 2, "img-size": 16, "peers-per-cluster": 2}
    client = cluster_client({**tiny, "foundation": "none", "cluster-samples": 8})
    arrays = ArrayRecord(client.model.tunable_state())
    content = client.train(TrainRequest(arrays, 1, 0.0, client.task))
    metrics = content.metric_records[c.METRICS_RECORD]
    undeclared = [k for k in metrics if k.partition("/")[0] not in c.METRICS]
    assert not undeclared
    # ... and the aggregation knows each one: a round of two such replies aggregates.
    aggregated = c.aggregate_metrics([content, content], c.NUM_EXAMPLES)
    assert aggregated[c.NUM_EXAMPLES] == 2 * metrics[c.NUM_EXAMPLES]
    assert aggregated[c.LATENCY] == metrics[c.LATENCY]
    assert aggregated[c.TRAIN_LOSS] == pytest.approx(metrics[c.TRAIN_LOSS])
    assert c.PARTITION_ID not in aggregated  # who a cluster is does not aggregate


def test_an_undeclared_reply_metric_is_refused_by_name() -> None:
    reply = make_reply({"prompt.0": np.zeros(2, np.float32)}, 5, 0, metrics={"new-counter": 3})
    with pytest.raises(c.UndeclaredMetricError, match="'new-counter' is not declared"):
        c.aggregate_metrics([reply.content], c.NUM_EXAMPLES)


def test_metrics_aggregate_as_declared() -> None:
    def record(n: int, loss: float, latency: float, energy: float) -> RecordDict:
        values = {c.NUM_EXAMPLES: n, c.TRAIN_LOSS: loss, c.LATENCY: latency,
                  c.ENERGY: energy, f"{c.ENERGY}/peer1": energy / 2}  # fmt: skip
        return RecordDict({c.METRICS_RECORD: MetricRecord(values)})  # type: ignore[arg-type]

    out = c.aggregate_metrics(
        [record(10, 1.0, 3.0, 2.0), record(30, 2.0, 5.0, 4.0)], "num-examples"
    )
    assert out[c.NUM_EXAMPLES] == 40 and out[c.NUM_CLUSTERS] == 2
    assert out[c.TRAIN_LOSS] == pytest.approx(np.average([1.0, 2.0], weights=[10, 30]))
    assert out[c.LATENCY] == 5.0  # the slowest cluster
    assert out[c.ENERGY] == 6.0 and out[f"{c.ENERGY}/peer1"] == 3.0  # summed, per node too


def test_a_cluster_task_travels_as_a_config_record_and_back() -> None:
    task = make_task(edge=1, partition=2, num_partitions=3)
    again = ClusterTask.from_record(ConfigRecord(dict(task.to_record())))
    assert again == task
    broken = ConfigRecord({**task.to_record(), "memory": [1]})
    with pytest.raises(ValueError, match="malformed cluster task: a plan of 1 peers needs 3"):
        ClusterTask.from_record(broken)


def test_every_message_of_a_round_gets_its_own_task() -> None:
    """Flower's strategies give a round's messages one RecordDict: attaching a task must not
    hand every node the last node's."""
    arrays = ArrayRecord({"prompt.0": Array(np.zeros(2, np.float32))})
    content = RecordDict({c.ARRAYS: arrays, c.CONFIG: ConfigRecord({c.SERVER_ROUND: 1})})
    messages = [Message(content, dst_node_id=n, message_type=c.TRAIN) for n in (1, 2)]
    for n, msg in enumerate(messages):
        c.attach_task(msg, make_task(partition=n, num_partitions=2))
    assert [TrainRequest.from_message(m).task.partition for m in messages] == [0, 1]
    assert messages[0].content[c.ARRAYS] is messages[1].content[c.ARRAYS]  # not copied


def test_a_message_without_a_task_is_refused_with_the_reason() -> None:
    message = Message(RecordDict(), dst_node_id=1, message_type=c.TRAIN)
    with pytest.raises(ValueError, match="carries no cluster task"):
        TrainRequest.from_message(message)


def test_module_fedavg_is_fedavg_with_the_replies_in_order() -> None:
    from strategies.registry import ModuleFedAvg

    replies = [
        make_reply({"prompt.0": np.full(2, float(p), np.float32)}, p + 1, p) for p in (2, 0, 1)
    ]
    ordered = sorted(replies, key=lambda r: r.content.metric_records["metrics"]["partition-id"])
    ours, _ = ModuleFedAvg().aggregate_train(1, replies)
    theirs, _ = FedAvg().aggregate_train(1, ordered)
    assert ours is not None and theirs is not None
    assert np.array_equal(ours["prompt.0"].numpy(), theirs["prompt.0"].numpy())


def test_the_modules_layout_is_every_edge_side_by_side() -> None:
    joined = c.join_edges({1: ArrayRecord({"head.bias": Array(np.ones(2))})})
    assert list(joined) == ["edge1/head.bias"]
    assert re.fullmatch(r"edge\d+/accuracy", c.edge_key(3, c.ACCURACY))
