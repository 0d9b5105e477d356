"""SL inference requests from the edge (paper Sec. III-D): deliver the model, ask a cluster's
start point to run its chain, log and keep what came back. A failed request is reported in its
row, never raised, so one bad node costs only its own request."""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.vit.model import PromptedViT


def inference_message(
    cfg: RunConfig, model: PromptedViT, delivered: ArrayRecord, node: int
) -> Message:
    """A `query.infer` request to `node` carrying its edge's model (`delivered`: the tunable
    modules; with distribution "full", every weight: the foundation plus those modules)."""
    if cfg.inference.distribution == "full":
        model.load_tunable_state(delivered.to_torch_state_dict())
        delivered = ArrayRecord(model.state_dict())
    return Message(
        RecordDict(
            {
                "model": delivered,
                "config": ConfigRecord({"distribution": cfg.inference.distribution}),
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


def serve_request(
    grid: Grid,
    cfg: RunConfig,
    model: PromptedViT,
    delivered: ArrayRecord,
    node: int,
    edge: int,
    index: int,
) -> dict[str, Any]:
    """One SL inference request (paper Sec. III-D) on `node` with its edge's model; a failed
    request is reported in the returned row, never raised."""
    request = inference_message(cfg, model, delivered, node)
    reply = next(iter(grid.send_and_receive([request], timeout=300)))
    return inference_row(reply, cfg.inference.distribution, node, edge, index)


def serve_inference(
    grid: Grid,
    cfg: RunConfig,
    model: PromptedViT,
    edge_modules: dict[int, ArrayRecord],
    node_edges: dict[int, int],
    output_dir: Path,
) -> list[dict[str, Any]]:
    """Serve `inference-requests` requests round-robin over the clusters after fine-tuning."""
    nodes = sorted(node_edges)
    served: list[dict[str, Any]] = []
    for i in range(cfg.inference.inference_requests):
        node = nodes[i % len(nodes)]
        edge = node_edges[node]
        served.append(serve_request(grid, cfg, model, edge_modules[edge], node, edge, i))
        (output_dir / "inference.json").write_text(json.dumps(served, indent=2))
    return served
