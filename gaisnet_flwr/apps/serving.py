"""SL inference requests from the edge (paper Sec. III-D): the message that delivers the model
to a cluster's start point, and the row that reports what came back (logged). A failed request
is reported in its row, never raised, so one bad node costs only its own request. The requests
are sent by strategies (`strategies/serving.py`, `strategies/integrated.py`)."""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.vit.model import PromptedViT


def inference_message(
    cfg: RunConfig, model: PromptedViT, delivered: ArrayRecord, node: int, requester: str = ""
) -> Message:
    """A `query.infer` request to `node` carrying its edge's model (`delivered`: the tunable
    modules; with distribution "full", every weight: the foundation plus those modules). With a
    population, `requester` names the device that asks: the node runs that device's inference
    cluster (formed around it: its start point, which gets the result back)."""
    if cfg.inference.distribution == "full":
        model.load_tunable_state(delivered.to_torch_state_dict())
        delivered = ArrayRecord(model.state_dict())
    config: dict[str, Any] = {"distribution": cfg.inference.distribution}
    if requester:
        config["requester"] = requester
    return Message(
        RecordDict(
            {
                "model": delivered,
                "config": ConfigRecord(config),
            }
        ),
        dst_node_id=node,
        message_type="query.infer",
    )


def inference_row(
    reply: Message, distribution: str, node: int, edge: int, index: int
) -> dict[str, Any]:
    """What a served request reports (logged); a failed request is reported in its row."""
    row: dict[str, Any] = {
        "request": index,
        "node": node,
        "edge": edge,
        "distribution": distribution,
    }
    if reply.has_error():
        row["error"] = reply.error.reason
        log(INFO, "[inference %d] node %d failed: %s", index, node, reply.error.reason)
        return row
    metrics: dict[str, Any] = dict(reply.content.metric_records["metrics"])
    row.update(metrics)
    row["predictions"] = reply.content.array_records["predictions"]["predictions"].numpy().tolist()
    log(
        INFO,
        "[inference %d] edge %d, node %d: %d samples, accuracy %.4f | %s distribution "
        "%.1f kB | sim latency %.2f s, energy %.2f J | D2D %.2f MB",
        index,
        edge,
        node,
        metrics["num-samples"],
        metrics.get("accuracy", float("nan")),
        distribution,
        metrics["download-bytes"] / 1e3,
        metrics["latency-s"],
        metrics["energy-j"],
        metrics["d2d-bytes"] / 1e6,
    )
    return row
