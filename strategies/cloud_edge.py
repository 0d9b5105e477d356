"""The cloud-edge hierarchy: edges aggregate their clusters, the cloud aggregates the edges.

Paper Sec. III-B: each edge server aggregates its own client clusters (edge-end subnetwork,
domain-specific knowledge); every K rounds the cloud aggregates the edges' domain knowledge
(cloud-edge subnetwork) and delivers foundation knowledge back. Two separable pieces:

  * `EdgeServer` (strategies/edge.py): one edge's round over its own clusters;
  * `Cloud`: which rounds are cloud rounds and `cloud_aggregate`, the cloud's average of the
    edges' modules weighted by their training examples, delivered back as
    `mix * cloud + (1 - mix) * edge`.

`CloudEdgeStrategy` composes them inside one ServerApp (the simulation's logical hierarchy):
the global ArrayRecord holds the edges' modules side by side (`edge{e}/<module>`); it hands
each edge its own, and on cloud rounds runs the cloud's aggregation. A deployed edge process
runs an `EdgeServer` alone and a cloud process `Cloud.deliver`, the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gaisnet_flwr.config import CLOUD_MODULES
from gaisnet_flwr.contract import (
    CLOUD_ROUND,
    FAILED_AGGREGATES,
    FAILED_CLUSTERS,
    LATENCY,
    NUM_EXAMPLES,
    PARTITION_ID,
    ROUND_LATENCY,
    edge_key,
    join_edges,
    reply_metrics,
    split_edges,
)
from strategies.edge import EdgeServer

NDArrays = dict[str, np.ndarray]
Failures = list[dict[str, int | str]]
# (server round, the round's aggregated train metrics, its failures) -> nothing: the results
RoundListener = Callable[[int, Mapping[str, Any], Failures], None]
# (server round, the round's aggregated train metrics) -> its latency through the hierarchy
LatencyPricer = Callable[[int, Mapping[str, Any]], float]
# (server round, the round's aggregated validation metrics) -> nothing: the results
EvaluateListener = Callable[[int, Mapping[str, Any]], None]


class RunFailedError(RuntimeError):
    """The run cannot go on (e.g. no cluster trained in a round): the ServerApp fails with it."""


def cloud_aggregate(
    edge_modules: Mapping[int, NDArrays],
    edge_weights: Mapping[int, float],
    keys: Iterable[str],
    mix: float,
) -> dict[int, NDArrays]:
    """Cloud aggregation and delivery for the modules in `keys`; the others stay per edge.

    cloud[k] = sum_e w_e * edge_e[k] / sum_e w_e;  delivered_e[k] = mix * cloud[k] + (1 - mix) *
    edge_e[k]. With mix = 1 every edge receives the cloud's modules; with mix = 0 nothing moves.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    edges = sorted(edge_modules)
    weights = np.array([float(edge_weights[e]) for e in edges])
    if weights.sum() <= 0:
        return {e: dict(edge_modules[e]) for e in edges}
    delivered = {e: dict(edge_modules[e]) for e in edges}
    for key in keys:
        stack = np.stack([edge_modules[e][key] for e in edges])
        cloud = np.tensordot(weights / weights.sum(), stack, axes=1).astype(stack.dtype)
        for e in edges:
            delivered[e][key] = (mix * cloud + (1.0 - mix) * edge_modules[e][key]).astype(
                stack.dtype
            )
    return delivered


@dataclass(frozen=True)
class Cloud:
    """The cloud's part: aggregate across edges every `every` rounds (0: never, isolated
    edges), the `modules` it aggregates (one of CLOUD_MODULES: the prompts, or all), and the
    weight `mix` of its aggregate in what each edge receives back."""

    every: int
    mix: float
    modules: str = "prompts"

    def __post_init__(self) -> None:
        if self.modules not in CLOUD_MODULES:
            raise ValueError(f"cloud modules {self.modules!r}; valid: {', '.join(CLOUD_MODULES)}")

    def is_round(self, server_round: int) -> bool:
        return self.every > 0 and server_round % self.every == 0

    def keys(self, modules: Iterable[str]) -> list[str]:
        """The module keys the cloud aggregates."""
        return [k for k in modules if self.modules == "all" or k.startswith("prompt.")]

    def deliver(
        self, per_edge: Mapping[int, ArrayRecord], weights: Mapping[int, float]
    ) -> dict[int, ArrayRecord]:
        """What each edge receives back from one cloud aggregation (`cloud_aggregate`)."""
        modules = {e: {k: v.numpy() for k, v in rec.items()} for e, rec in per_edge.items()}
        keys = self.keys(modules[next(iter(modules))])
        delivered = cloud_aggregate(modules, weights, keys, self.mix)
        log(
            INFO,
            "cloud: aggregated %d modules across %d edges (mix %.2f)",
            len(keys),
            len(per_edge),
            self.mix,
        )
        return {e: ArrayRecord({k: Array(v) for k, v in d.items()}) for e, d in delivered.items()}


class CloudEdgeStrategy(Strategy):
    """The hierarchy in one ServerApp: `edges` (edge id -> its EdgeServer) under the `cloud`.

    Args:
        edges: one EdgeServer per edge id, each with its clusters' tasks.
        cloud: when and what the cloud aggregates.
        train_metrics_fn: all clusters' train replies -> the round's totals
            (`contract.aggregate_metrics`).
        price_latency: the round's simulated latency through the hierarchy, from its totals.
        on_round: hands each round's totals and failures to the results (the recorder).
        on_evaluate: hands each round's aggregated cluster validation to the results.
    """

    def __init__(
        self,
        edges: Mapping[int, EdgeServer],
        cloud: Cloud,
        train_metrics_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        price_latency: LatencyPricer | None = None,
        on_round: RoundListener | None = None,
        on_evaluate: EvaluateListener | None = None,
    ) -> None:
        self.edges = dict(sorted(edges.items()))
        self.cloud = cloud
        self.train_metrics_fn = train_metrics_fn
        self.price_latency = price_latency
        self.on_round = on_round
        self.on_evaluate = on_evaluate
        self.node_edges = {n: e for e, edge in self.edges.items() for n in edge.nodes}
        self._sent: dict[int, ArrayRecord] = {}  # what this round's configure_train sent

    def _order(self, reply: Message) -> tuple[int, float, int]:
        node = reply.metadata.src_node_id
        partition = reply_metrics(reply).get(PARTITION_ID, 0)
        return (self.node_edges[node], float(partition), node)  # type: ignore[arg-type]

    def _by_edge(self, replies: Iterable[Message]) -> dict[int, list[Message]]:
        grouped: dict[int, list[Message]] = {e: [] for e in self.edges}
        for reply in replies:
            grouped[self.node_edges[reply.metadata.src_node_id]].append(reply)
        return grouped

    # -- train ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = split_edges(arrays)
        messages: list[Message] = []
        for e, edge in self.edges.items():
            messages += edge.configure_train(server_round, self._sent[e], config, grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        per_edge: dict[int, ArrayRecord] = {}
        weights: dict[int, float] = {}
        metrics: dict[str, Any] = {}
        failures: Failures = []
        for e, edge_replies in self._by_edge(replies).items():
            edge = self.edges[e]
            arrays, edge_metrics = edge.aggregate_train(server_round, edge_replies)
            # An edge whose clusters all failed (or whose aggregate was refused) keeps what it had.
            per_edge[e] = arrays if arrays is not None else self._sent[e]
            weights[e] = edge.last.weight
            failures += edge.last.failures
            metrics.update((edge_key(e, k), v) for k, v in (edge_metrics or {}).items())
        if self.cloud.is_round(server_round) and len(per_edge) > 1:
            per_edge = self.cloud.deliver(per_edge, weights)
            metrics[CLOUD_ROUND] = 1
        refused = sum(f["node"] == -1 for f in failures)
        metrics[FAILED_CLUSTERS] = len(failures) - refused
        metrics[FAILED_AGGREGATES] = refused
        # The round's totals over every cluster, summed in a fixed order (edge, partition-id,
        # node): float sums must not depend on which cluster answered first.
        ok = sorted((r for r in replies if not r.has_error()), key=self._order)
        ok_all = [r.content for r in ok]
        if self.train_metrics_fn and ok_all:
            metrics.update(self.train_metrics_fn(ok_all, NUM_EXAMPLES))
        if self.price_latency is not None and LATENCY in metrics:
            metrics[ROUND_LATENCY] = self.price_latency(server_round, metrics)
        if self.on_round is not None:
            self.on_round(server_round, metrics, failures)
        if not ok_all:  # nothing to aggregate, nothing learnt: the run has failed
            sent = sum(len(edge.last.sent) for edge in self.edges.values())
            first = failures[0] if failures else {"node": "?", "edge": "?", "reason": "?"}
            raise RunFailedError(
                f"round {server_round}: no cluster trained ({sent} sent, {len(failures)} failed; "
                f"first: node {first['node']} (edge {first['edge']}): {first['reason']})"
            )
        return join_edges(per_edge), MetricRecord(metrics)

    # -- evaluate -------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sent = split_edges(arrays)
        messages: list[Message] = []
        for e, edge in self.edges.items():
            messages += edge.configure_evaluate(server_round, sent[e], config, grid)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics: dict[str, float | int] = {}
        for e, edge_replies in self._by_edge(replies).items():
            result = self.edges[e].aggregate_evaluate(server_round, edge_replies)
            for k, v in (result or {}).items():
                if isinstance(v, int | float):
                    metrics[edge_key(e, k)] = v
        if self.on_evaluate is not None and metrics:
            self.on_evaluate(server_round, metrics)
        return MetricRecord(metrics) if metrics else None  # type: ignore[arg-type]

    def summary(self) -> None:
        log(
            INFO,
            "\t├── CloudEdgeStrategy: %d edge server(s), cloud every %s round(s), mix %.2f",
            len(self.edges),
            self.cloud.every or "no",
            self.cloud.mix,
        )
        for edge in self.edges.values():
            edge.summary()


class CentralEvaluationOnly(Strategy):
    """A strategy with no federated evaluation: its models are measured centrally (the
    ServerApp's `evaluate_fn`), so the evaluate half of a round sends nothing."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None
