"""ServerApp: the cloud and its edge servers running HFSL fine-tuning (paper Sec. III-B, III-C).

At start-up the cloud makes sure the foundation model is pre-trained, every node says which edge
it belongs to (a `query.identity` message), and each edge gets its own instance of the configured
strategy. Then `CloudEdgeStrategy` runs the rounds through Flower's `Strategy.start`: clusters
fine-tune their edge's tunable modules over their split chains, each edge aggregates its
clusters, and every `cloud-every` rounds the cloud aggregates across edges. Each edge model is
evaluated on its own domain's held-out test set every round; results go to `output-dir`.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from gaisnet_flwr.apps.recorder import RoundRecorder, aggregate_train_metrics
from gaisnet_flwr.apps.serving import serve_inference
from gaisnet_flwr.cloud.foundation import ensure_foundation, load_foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.costs.pricing import hierarchy_round_latency
from gaisnet_flwr.data.images import edge_image_data, load_image_data
from gaisnet_flwr.service.integrated import run_integrated
from gaisnet_flwr.training.loops import cluster_plan, evaluate
from strategies.cloud_edge import CloudEdgeStrategy, edge_key, join_edges, split_edges
from strategies.registry import build_strategy, resolve_strategy


def wait_for_clusters(grid: Grid, minimum: int = 1, timeout_s: float = 120.0) -> list[int]:
    """Nodes connected now (all of them in simulation). Deployment SuperNodes connect in their
    own time: wait until `minimum` of them are there (run-config min-clusters)."""
    minimum = max(minimum, 1)
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < minimum:
        raise RuntimeError(
            f"{len(nodes)} client cluster(s) connected within {timeout_s:.0f} s; "
            f"min-clusters={minimum} needed (are the SuperNodes running and reaching the "
            f"SuperLink's Fleet API?)"
        )
    return nodes


def identify_clusters(grid: Grid, nodes: list[int], num_edges: int) -> dict[int, int]:
    """Ask every node which edge server it belongs to: node id -> edge id."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.identity") for n in nodes]
    node_edges: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=120):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} could not identify itself: {reply.error.reason}")
        edge = int(reply.content.metric_records["metrics"]["edge-id"])  # type: ignore[arg-type]
        if not 0 <= edge < num_edges:
            raise RuntimeError(f"node {node} says edge-id={edge}; edges are 0..{num_edges - 1}")
        node_edges[node] = edge
    missing = sorted(set(nodes) - set(node_edges))
    if missing:
        raise RuntimeError(f"node(s) {missing} did not answer the identity query")
    return node_edges


def build_edge_strategy(cfg: RunConfig, num_clusters: int) -> Strategy:
    options: dict[str, Any] = dict(cfg.strategy_kwargs())
    if "train_metrics_aggr_fn" in inspect.signature(resolve_strategy(cfg.strategy)).parameters:
        options["train_metrics_aggr_fn"] = aggregate_train_metrics
    return build_strategy(
        cfg.strategy,
        num_clusters=num_clusters,
        fraction_evaluate=cfg.fraction_evaluate,
        options=options,
    )


def run_hfsl(grid: Grid, cfg: RunConfig) -> Result:
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    recorder = RoundRecorder(output_dir, cfg.num_rounds)
    (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    data = load_image_data(cfg.data_spec())
    device = cfg.torch_device()
    ensure_foundation(cfg, data)
    model = load_foundation(cfg, data.num_classes)
    edges = [
        edge_image_data(data, e, cfg.shares(), d, seed=cfg.seed)
        for e, d in enumerate(cfg.domains())
    ]

    node_edges = identify_clusters(grid, wait_for_clusters(grid, cfg.min_clusters), len(edges))
    clusters_per_edge = {
        e: sum(1 for v in node_edges.values() if v == e) for e in range(len(edges))
    }
    strategy = CloudEdgeStrategy(
        {e: build_edge_strategy(cfg, clusters_per_edge[e]) for e in range(len(edges))},
        node_edges,
        cloud_every=cfg.cloud_every,
        cloud_mix=cfg.cloud_mix,
        cloud_keys=(lambda k: k.startswith("prompt."))
        if cfg.cloud_modules == "prompts"
        else (lambda k: True),
        train_metrics_fn=aggregate_train_metrics,
    )
    plan = cluster_plan(cfg)
    edge_device, backhaul = cfg.hierarchy_profiles()
    log(
        INFO,
        "GaisNet HFSL: %s %s, %d prompts; %d tunable of %d parameters (%.3f %%)",
        cfg.model_name,
        cfg.mode,
        cfg.num_prompts,
        model.num_tunable(),
        model.num_total(),
        100 * model.num_tunable() / model.num_total(),
    )
    for e, domain in enumerate(cfg.domains()):
        log(
            INFO,
            "edge %d: domain %r, %d clusters, %d training images",
            e,
            domain,
            clusters_per_edge[e],
            len(edges[e].train_labels),
        )
    log(INFO, "each cluster: start point -> %d peers %s -> end point", plan.num_peers, plan.sizes())

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        row: dict[str, float] = {}
        for e, modules in split_edges(arrays).items():
            model.load_tunable_state(modules.to_torch_state_dict())
            result = evaluate(model, edges[e].test, device=device)
            row[edge_key(e, "accuracy")], row[edge_key(e, "loss")] = result.accuracy, result.loss
        num_edges = len(clusters_per_edge)
        row["accuracy"] = sum(row[edge_key(e, "accuracy")] for e in clusters_per_edge) / num_edges
        row["loss"] = sum(row[edge_key(e, "loss")] for e in clusters_per_edge) / num_edges
        train = dict(strategy.last_train_metrics) if server_round > 0 else {}
        failures = list(strategy.last_failures) if server_round > 0 else []
        if "latency-s" in train:
            train["round-latency-s"] = hierarchy_round_latency(
                float(train["latency-s"]),
                model.num_tunable(),
                max(clusters_per_edge.values()),  # the edges aggregate in parallel
                len(clusters_per_edge),
                strategy.is_cloud_round(server_round),
                edge_device,
                backhaul,
            )
        recorder.record(server_round, row, train, failures)
        recorder.save_round_modules(server_round, {k: v.numpy() for k, v in arrays.items()})
        return MetricRecord(row)  # type: ignore[arg-type]

    if cfg.service == "integrated":
        run_integrated(grid, cfg, strategy, model, edges, output_dir)
        return Result()

    initial = ArrayRecord(model.tunable_state())
    result = strategy.start(
        grid=grid,
        initial_arrays=join_edges({e: initial for e in clusters_per_edge}),
        num_rounds=cfg.num_rounds,
        train_config=ConfigRecord({}),
        evaluate_fn=central_evaluate,
    )
    final = result.arrays
    path = recorder.save_modules({k: v.numpy() for k, v in final.items()})
    serve_inference(grid, cfg, model, split_edges(final), node_edges, output_dir)
    last = recorder.rows[-1]
    log(
        INFO,
        "FINAL: central test accuracy %.4f after %d rounds (%d edge(s), %d clusters); "
        "results in %s (modules: %s)",
        last["accuracy"],
        cfg.num_rounds,
        len(clusters_per_edge),
        len(node_edges),
        output_dir,
        path.name,
    )
    return result


def create_server_app(fallback_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; `fallback_config` serves `run_simulation`, which passes no run-config."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_run_config(context.run_config or fallback_config or {})
        run_hfsl(grid, cfg)

    return server


app = create_server_app()
