"""The ServerApp's wiring: what one HFSL run is made of, built once at start-up.

The cloud makes sure the foundation model is pre-trained, every node says which edge it belongs
to (a `query.identity` message), each edge gets its own instance of the configured strategy,
and `CloudEdgeStrategy` puts them under the cloud. The pieces the rounds need are small
callables: the central evaluation of every edge model, the round's latency through the
hierarchy, the integrated strategy's edge evaluation and its inference requests. With a device
population (run-config `population`), each node runs the formed cluster of its cluster-id, and
clusters.json reports the clusters (apps/clusters.py).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gaisnet_flwr.apps.clusters import PopulationRun, assign_nodes, cluster_report, log_report
from gaisnet_flwr.apps.recorder import RoundRecorder, aggregate_train_metrics
from gaisnet_flwr.apps.rounds import RecordedRounds
from gaisnet_flwr.apps.serving import inference_message, inference_row
from gaisnet_flwr.apps.tracking import Tracking
from gaisnet_flwr.cloud.foundation import Foundation, check_timm_weights
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.costs.pricing import hierarchy_round_latency
from gaisnet_flwr.data.images import ImageData, edge_image_data, load_image_data
from gaisnet_flwr.service.scheduler import QualityModel
from gaisnet_flwr.training.loops import evaluate
from gaisnet_flwr.vit.model import PromptedViT
from strategies.cloud_edge import CloudEdgeStrategy, edge_key, split_edges
from strategies.integrated import IntegratedStrategy
from strategies.registry import build_strategy, resolve_strategy
from strategies.serving import ServeRequests


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


def query_identities(grid: Grid, nodes: list[int], num_edges: int) -> dict[int, dict[str, int]]:
    """Ask every node who it is: node id -> its identity (edge-id, partition-id,
    num-partitions, cluster-id, and with a population the layout's digest)."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.identity") for n in nodes]
    identities: dict[int, dict[str, int]] = {}
    for reply in grid.send_and_receive(messages, timeout=120):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} could not identify itself: {reply.error.reason}")
        ident = {k: int(v) for k, v in reply.content.metric_records["metrics"].items()}  # type: ignore[arg-type]
        edge = ident["edge-id"]
        if not 0 <= edge < num_edges:
            raise RuntimeError(f"node {node} says edge-id={edge}; edges are 0..{num_edges - 1}")
        identities[node] = ident
    missing = sorted(set(nodes) - set(identities))
    if missing:
        raise RuntimeError(f"node(s) {missing} did not answer the identity query")
    return identities


# Clusters per edge assumed when the strategy is checked before any node is known (every
# option is checked; a strategy that needs more clusters is refused once they are known).
ASSUMED_CLUSTERS = 1000


def build_edge_strategy(cfg: RunConfig, num_clusters: int) -> Strategy:
    """One edge's strategy; a strategy or options it cannot build -> ConfigError naming the
    key (strategy, or strategy-options), the value and the reason."""
    h = cfg.hierarchy
    try:
        strategy_cls = resolve_strategy(h.strategy)
    except ValueError as err:
        raise ConfigError(f"strategy={h.strategy!r}: {err}") from err
    options: dict[str, Any] = dict(h.strategy_kwargs())
    if "train_metrics_aggr_fn" in inspect.signature(strategy_cls).parameters:
        options["train_metrics_aggr_fn"] = aggregate_train_metrics
    try:
        return build_strategy(
            h.strategy,
            num_clusters=num_clusters,
            fraction_evaluate=h.fraction_evaluate,
            options=options,
        )
    except ValueError as err:
        raise ConfigError(
            f"strategy-options={h.strategy_options!r} (strategy={h.strategy!r}, "
            f"{num_clusters} cluster(s) per edge): {err}"
        ) from err


def check_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The ServerApp's boundary: `RunConfig.from_run_config` (every key and the environment)
    and what needs the strategies, which the config may not import: the strategy name resolved
    and the strategy built once with its options. Before any data is read or model trained."""
    cfg = RunConfig.from_run_config(run_config)
    build_edge_strategy(cfg, max(cfg.hierarchy.min_clusters, ASSUMED_CLUSTERS))
    if cfg.cloud.foundation == "timm":  # offline: seconds, not a minute of download retries
        check_timm_weights(cfg.model.model_name)
    return cfg


@dataclass
class HfslRun:
    """Everything one run's rounds need, built once by `prepare`."""

    cfg: RunConfig
    output_dir: Path
    model: PromptedViT  # the edge model on the frozen foundation (modules loaded as needed)
    edges: list[ImageData]  # per edge server: its domain's data (the test split evaluates it)
    node_edges: dict[int, int]  # node id -> edge id (the nodes that run a cluster)
    strategy: CloudEdgeStrategy
    population: PopulationRun | None = None  # with run-config population: who runs what
    _requester: str = ""  # the device the latest inference request came from

    @property
    def clusters_per_edge(self) -> dict[int, int]:
        return {e: list(self.node_edges.values()).count(e) for e in range(len(self.edges))}

    def initial_modules(self) -> ArrayRecord:
        return ArrayRecord(self.model.tunable_state())

    def evaluate_edge(self, edge: int, modules: ArrayRecord) -> tuple[float, float]:
        """Accuracy and loss of edge `edge`'s model on its domain's test set."""
        self.model.load_tunable_state(modules.to_torch_state_dict())
        # Server-side evaluation on the server's GPU when there is one (device='auto').
        run = self.cfg.run
        result = evaluate(
            self.model,
            self.edges[edge].test,
            device=run.torch_device(),
            precision=run.torch_precision(),
        )
        return result.accuracy, result.loss

    def central_evaluation(self, arrays: ArrayRecord) -> dict[str, float]:
        """Every edge model on its own test set, and the mean over the edges."""
        row: dict[str, float] = {}
        for e, modules in split_edges(arrays).items():
            row[edge_key(e, "accuracy")], row[edge_key(e, "loss")] = self.evaluate_edge(e, modules)
        edges = range(len(self.edges))
        row["accuracy"] = sum(row[edge_key(e, "accuracy")] for e in edges) / len(self.edges)
        row["loss"] = sum(row[edge_key(e, "loss")] for e in edges) / len(self.edges)
        return row

    def round_latency(self, server_round: int, train: Mapping[str, float | int]) -> float:
        """The round's simulated latency: the slowest cluster, then the busiest edge's FedAvg
        (the edges aggregate in parallel), then on cloud rounds the cloud's."""
        edge_device, backhaul = self.cfg.costs.hierarchy_profiles()
        return hierarchy_round_latency(
            float(train["latency-s"]),
            self.model.num_tunable(),
            max(self.clusters_per_edge.values()),
            len(self.edges),
            self.strategy.is_cloud_round(server_round),
            edge_device,
            backhaul,
        )

    def recorded_rounds(self, recorder: RoundRecorder) -> RecordedRounds:
        return RecordedRounds(self.strategy, recorder, self.node_edges, self.round_latency)

    def evaluate_fn(self, recorder: RoundRecorder) -> Callable[[int, ArrayRecord], MetricRecord]:
        """Flower's central evaluation: record the round, keep its modules."""

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            row = self.central_evaluation(arrays)
            recorder.record(server_round, row)
            recorder.save_round_modules(server_round, {k: v.numpy() for k, v in arrays.items()})
            return MetricRecord(row)  # type: ignore[arg-type]

        return central_evaluate

    def inference_request(self, modules: ArrayRecord, node: int) -> Message:
        """A request to `node`; with a population it comes from the next requesting device and
        runs over that device's inference cluster."""
        self._requester = self.population.next_requester() if self.population else ""
        return inference_message(self.cfg, self.model, modules, node, self._requester)

    def served(self, reply: Message | None, node: int, edge: int, index: int) -> dict[str, Any]:
        """The row of a served request (an error row when there was no reply)."""
        if reply is None:
            row = {"request": index, "node": node, "edge": edge, "error": "no reply"}
        else:
            row = inference_row(reply, self.cfg.inference.distribution, node, edge, index)
        if self._requester:
            row["requester"] = self._requester
        return row

    def serving_strategy(self) -> ServeRequests:
        """`inference-requests` SL inference requests after fine-tuning; inference.json keeps
        each as soon as it is served."""
        rows: list[dict[str, Any]] = []

        def write(row: dict[str, Any]) -> None:
            rows.append(row)
            (self.output_dir / "inference.json").write_text(json.dumps(rows, indent=2))

        return ServeRequests(self.node_edges, self.inference_request, self.served, write)

    def integrated_strategy(self, tracking: Tracking | None = None) -> IntegratedStrategy:
        cfg = self.cfg
        rows: list[dict[str, Any]] = []

        def write(row: dict[str, Any]) -> None:
            rows.append(row)
            (self.output_dir / "integrated.json").write_text(json.dumps(rows, indent=2))
            if tracking is not None:
                tracking.log_row(row)

        return IntegratedStrategy(
            self.strategy.edge_strategies,
            self.node_edges,
            policy=cfg.scheduling.policy,
            demand=cfg.scheduling.demand_list(),
            quality=QualityModel(
                value=cfg.scheduling.service_value, finetune_cost=cfg.scheduling.finetune_cost
            ),
            energy_price=cfg.scheduling.energy_price,
            evaluate_edge=lambda e, modules: self.evaluate_edge(e, modules)[0],
            request=self.inference_request,
            served=self.served,
            seed=cfg.run.seed,
            on_round=write,
        )


def prepare(grid: Grid, cfg: RunConfig) -> HfslRun:
    """Start-up: config.json, the nodes' edges and the strategies (cheap, and what can still be
    refused), then the data, the foundation and the edge models."""
    output_dir = Path(cfg.run.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    num_edges = cfg.hierarchy.num_edges()
    identities = query_identities(
        grid, wait_for_clusters(grid, cfg.hierarchy.min_clusters), num_edges
    )
    node_edges = {n: i["edge-id"] for n, i in identities.items()}
    population = None
    layout = cfg.cluster_layout()
    if layout is not None:  # only the nodes that run a formed cluster train
        population = assign_nodes(layout, identities)
        node_edges = {n: e for n, e in node_edges.items() if n in population.node_clusters}
        if not node_edges:
            raise RuntimeError(
                f"no node runs a formed cluster: {len(identities)} node(s), "
                f"{len(layout.fine_tuning)} fine-tuning cluster(s) (cluster-ids: "
                f"{sorted(i['cluster-id'] for i in identities.values())})"
            )
    per_edge = {e: list(node_edges.values()).count(e) for e in range(num_edges)}
    if empty := [e for e, n in per_edge.items() if n == 0]:
        raise RuntimeError(
            f"edge(s) {empty} have no client cluster ({len(node_edges)} node(s) for "
            f"{num_edges} edge-domains)"
        )
    edge_strategies = {e: build_edge_strategy(cfg, per_edge[e]) for e in range(num_edges)}
    data = load_image_data(cfg.data_spec())
    Foundation.of(cfg).ensure(data, cfg.run.torch_device())
    model = Foundation.of(cfg).load(data.num_classes)
    edges = [
        edge_image_data(data, e, cfg.hierarchy.shares(), d, seed=cfg.run.seed)
        for e, d in enumerate(cfg.hierarchy.domains())
    ]
    strategy = CloudEdgeStrategy(
        edge_strategies,
        node_edges,
        cloud_every=cfg.hierarchy.cloud_every,
        cloud_mix=cfg.hierarchy.cloud_mix,
        cloud_keys=(lambda k: k.startswith("prompt."))
        if cfg.hierarchy.cloud_modules == "prompts"
        else (lambda k: True),
        train_metrics_fn=aggregate_train_metrics,
    )
    log(
        INFO,
        "GaisNet HFSL: %s %s, %d prompts; %d tunable of %d parameters (%.3f %%)",
        cfg.model.model_name,
        cfg.model.mode,
        cfg.model.num_prompts,
        model.num_tunable(),
        model.num_total(),
        100 * model.num_tunable() / model.num_total(),
    )
    for e, domain in enumerate(cfg.hierarchy.domains()):
        log(
            INFO,
            "edge %d: domain %r, %d clusters, %d training images",
            e,
            domain,
            per_edge[e],
            len(edges[e].train_labels),
        )
    if population is not None:
        report = cluster_report(cfg, population, model, edges, identities)
        (output_dir / "clusters.json").write_text(json.dumps(report, indent=2))
        log_report(report)
    else:
        plan = cfg.plan()
        log(
            INFO,
            "each cluster: start point -> %d peers %s -> end point",
            plan.num_peers,
            plan.sizes(),
        )
    return HfslRun(cfg, output_dir, model, edges, node_edges, strategy, population)
