"""The in-process grid delivers Messages to a ClientApp the way Flower's engines do.

Tiny apps, no model: reply metadata, node contexts (node-config, run-config, persistent state)
and a ClientApp exception turned into an error reply while the other nodes carry on.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp

from gaisnet_flwr.apps.inprocess import run_apps, simulation_node_configs


def counting_client() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if msg.content.config_records["config"].get("fail"):
            raise RuntimeError("sensor unplugged")
        calls = int(context.state.metric_records.get("calls", MetricRecord({"n": 0}))["n"]) + 1
        context.state["calls"] = MetricRecord({"n": calls})
        metrics = {
            "calls": calls,
            "partition-id": int(context.node_config["partition-id"]),
            "num-partitions": int(context.node_config["num-partitions"]),
            "lr": float(context.run_config["lr"]),
        }
        return Message(RecordDict({"m": MetricRecord(metrics)}), reply_to=msg)  # type: ignore[arg-type]

    return app


def two_rounds_server(seen: list[list[tuple[Message, Message]]]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = sorted(grid.get_node_ids())
        for fail_first in (True, False):
            sent = [
                Message(
                    RecordDict({"config": ConfigRecord({"fail": fail_first and i == 0})}),
                    dst_node_id=node,
                    message_type="query",
                )
                for i, node in enumerate(nodes)
            ]
            replies = list(grid.send_and_receive(sent, timeout=60))
            by_id = {r.metadata.reply_to_message_id: r for r in replies}
            seen.append([(m, by_id[m.metadata.message_id]) for m in sent])

    return app


def test_replies_contexts_and_an_app_error_as_flower_builds_them() -> None:
    seen: list[list[tuple[Message, Message]]] = []
    run_apps(two_rounds_server(seen), counting_client(), {"lr": 0.5}, simulation_node_configs(3))

    first, second = seen
    ids = set()
    for sent, reply in first + second:
        assert reply.metadata.reply_to_message_id == sent.metadata.message_id
        assert reply.metadata.src_node_id == sent.metadata.dst_node_id
        assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID
        assert reply.metadata.run_id == sent.metadata.run_id
        assert reply.metadata.message_type == "query"
        ids |= {sent.metadata.message_id, reply.metadata.message_id}
    assert len(ids) == 12  # every message has its own id

    # The failing ClientApp's exception is an error reply; the other nodes answered.
    failed = first[0][1]
    assert failed.has_error()
    assert failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "sensor unplugged" in failed.error.reason
    answers = [r.content.metric_records["m"] for _, r in first[1:] + second]
    # node-config as the simulation engine sets it, the run-config, and per-node state that
    # survives across messages (node 0 failed once, so it counts 1 call, the others 2).
    assert sorted(int(m["partition-id"]) for m in answers[2:]) == [0, 1, 2]
    assert all(m["num-partitions"] == 3 and m["lr"] == 0.5 for m in answers)
    assert [m["calls"] for m in answers[2:]] == [1, 2, 2]
