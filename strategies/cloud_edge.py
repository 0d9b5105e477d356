"""The cloud-edge strategy: edges aggregate their clusters, the cloud aggregates the edges.

Paper Sec. III-B: each edge server aggregates its own client clusters (edge-end subnetwork,
domain-specific knowledge); every K rounds the cloud aggregates the edges' domain knowledge
(cloud-edge subnetwork) and delivers foundation knowledge back. One ServerApp runs the whole
hierarchy through Flower's strategy hooks:

  * every edge has its own instance of any Message-API strategy (per-module FedAvg by default),
    which sees only its own nodes (an `EdgeGrid` view of the grid);
  * the global ArrayRecord is the edges' tunable modules side by side, keys `edge{e}/<module>`;
  * on cloud rounds, `cloud_aggregate` averages the chosen modules across edges, weighted by the
    edges' training examples, and delivers `mix * cloud + (1 - mix) * edge` to each edge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

NDArrays = dict[str, np.ndarray]
# The code of a failure record for an edge whose aggregate is not finite (cluster failures carry
# their reply's error code, or -1 for no reply).
NON_FINITE_AGGREGATE = -2


class RunFailedError(RuntimeError):
    """The run cannot go on (e.g. no cluster trained in a round): the ServerApp fails with it."""


def non_finite_keys(arrays: ArrayRecord) -> list[str]:
    """The modules of `arrays` that hold a NaN or an infinity (floating-point arrays only)."""
    bad = []
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            bad.append(key)
    return sorted(bad)


def edge_key(edge: int, key: str) -> str:
    return f"edge{edge}/{key}"


def refused_aggregates(metrics: Mapping[str, object]) -> list[dict[str, int | str]]:
    """The round's failures that are refused edge aggregates, read from the aggregated train
    MetricRecord (`edge{e}/aggregate-refused`): node -1, code NON_FINITE_AGGREGATE."""
    failures: list[dict[str, int | str]] = []
    for key, value in sorted(metrics.items()):
        prefix, _, name = key.partition("/")
        if name == "aggregate-refused" and value:
            edge = int(prefix.removeprefix("edge"))
            reason = f"edge {edge}'s aggregate is not finite; the edge keeps its previous modules"
            failures.append(
                {"node": -1, "edge": edge, "code": NON_FINITE_AGGREGATE, "reason": reason}
            )
    return failures


def split_edges(arrays: ArrayRecord) -> dict[int, ArrayRecord]:
    """`edge{e}/<key>` -> {e: ArrayRecord(<key>: ...)}."""
    per_edge: dict[int, dict[str, Array]] = {}
    for key, value in arrays.items():
        prefix, _, module = key.partition("/")
        if not prefix.startswith("edge") or not module:
            raise ValueError(f"array key {key!r} is not of the form 'edge<e>/<module>'")
        per_edge.setdefault(int(prefix[4:]), {})[module] = value
    return {e: ArrayRecord(dict(v)) for e, v in sorted(per_edge.items())}


def join_edges(per_edge: Mapping[int, ArrayRecord]) -> ArrayRecord:
    return ArrayRecord(
        {edge_key(e, k): v for e, rec in sorted(per_edge.items()) for k, v in rec.items()}
    )


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


def round_failures(
    replies: Iterable[Message], sent_nodes: Iterable[int], node_edges: Mapping[int, int]
) -> list[dict[str, int | str]]:
    """The clusters that failed a round: an error reply (e.g. a dead D2D peer; the reply
    carries code and reason) or no reply at all from a node the round was sent to."""
    replies = list(replies)
    failures: list[dict[str, int | str]] = []
    for r in replies:
        if r.has_error():
            node = r.metadata.src_node_id
            failures.append(
                {
                    "node": node,
                    "edge": node_edges.get(node, -1),
                    "code": int(r.error.code),
                    "reason": str(r.error.reason),
                }
            )
    answered = {r.metadata.src_node_id for r in replies}
    for node in sent_nodes:
        if node not in answered:
            failures.append(
                {"node": node, "edge": node_edges.get(node, -1), "code": -1,
                 "reason": "no reply within the round's timeout"}
            )  # fmt: skip
    return failures


class EdgeGrid(Grid):
    """The grid as one edge server sees it: only that edge's nodes."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._nodes = sorted(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def set_run(self, run):  # type: ignore[no-untyped-def]
        return self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def,override]
        return self._grid.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return self._grid.send_and_receive(messages, timeout=timeout)


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


class CloudEdgeStrategy(Strategy):
    """Two-level aggregation: per-edge strategies, and the cloud every `cloud_every` rounds.

    Args:
        edge_strategies: one strategy instance per edge id.
        node_edges: node id -> edge id (from the nodes' identity replies).
        cloud_every: cloud rounds are those divisible by it; 0 = never (isolated edges).
        cloud_mix: weight of the cloud's modules in what each edge receives back.
        cloud_keys: which module keys the cloud aggregates (e.g. the prompts).
        train_metrics_fn: aggregates all clusters' train replies into this round's totals.
    """

    def __init__(
        self,
        edge_strategies: Mapping[int, Strategy],
        node_edges: Mapping[int, int],
        cloud_every: int,
        cloud_mix: float,
        cloud_keys: Callable[[str], bool],
        train_metrics_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        missing = sorted(set(edge_strategies) - set(node_edges.values()))
        if missing:
            raise ValueError(f"edge(s) {missing} have no client cluster")
        self.edge_strategies = dict(sorted(edge_strategies.items()))
        self.node_edges = dict(node_edges)
        self.cloud_every = cloud_every
        self.cloud_mix = cloud_mix
        self.cloud_keys = cloud_keys
        self.train_metrics_fn = train_metrics_fn
        self._sent: dict[int, ArrayRecord] = {}  # what this round's configure_train sent
        self._sent_nodes: list[int] = []

    def nodes_of(self, edge: int) -> list[int]:
        """The nodes (client clusters) of one edge server, in id order."""
        return sorted(n for n, e in self.node_edges.items() if e == edge)

    def _by_edge(self, replies: Iterable[Message]) -> dict[int, list[Message]]:
        grouped: dict[int, list[Message]] = {e: [] for e in self.edge_strategies}
        for reply in replies:
            grouped[self.node_edges[reply.metadata.src_node_id]].append(reply)
        return grouped

    def is_cloud_round(self, server_round: int) -> bool:
        return self.cloud_every > 0 and server_round % self.cloud_every == 0

    # -- train ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = split_edges(arrays)
        messages: list[Message] = []
        for edge, strategy in self.edge_strategies.items():
            messages += strategy.configure_train(
                server_round,
                self._sent[edge],
                ConfigRecord(dict(config)),
                EdgeGrid(grid, self.nodes_of(edge)),
            )
        self._sent_nodes = sorted(m.metadata.dst_node_id for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # A failed cluster costs its own contribution: the round goes on with the others and
        # is marked (failed-clusters, and the reasons in the results).
        failures = round_failures(replies, self._sent_nodes, self.node_edges)
        for f in failures:
            log(
                WARNING,
                "round %d: cluster node %s (edge %s) left out: %s",
                server_round,
                f["node"],
                f["edge"],
                f["reason"],
            )
        per_edge: dict[int, ArrayRecord] = {}
        weights: dict[int, float] = {}
        metrics: dict[str, float | int] = {}
        refused = 0
        for edge, edge_replies in self._by_edge(replies).items():
            arrays, edge_metrics = self.edge_strategies[edge].aggregate_train(
                server_round, edge_replies
            )
            ok = [r for r in edge_replies if not r.has_error()]
            weights[edge] = float(
                sum(
                    r.content.metric_records["metrics"]["num-examples"]  # type: ignore[misc]
                    for r in ok
                )
            )
            if arrays is not None and (bad := non_finite_keys(arrays)):
                reason = (
                    f"edge {edge}'s aggregate is not finite (NaN or inf in {bad[:4]}); the edge "
                    f"keeps its previous modules"
                )
                log(WARNING, "round %d: %s", server_round, reason)
                metrics[edge_key(edge, "aggregate-refused")] = 1  # see refused_aggregates
                refused += 1
                arrays, weights[edge] = None, 0.0
            # An edge whose clusters all failed (or whose aggregate was refused) keeps what it
            # had.
            per_edge[edge] = arrays if arrays is not None else self._sent[edge]
            metrics[edge_key(edge, "clusters")] = len(ok)
            for k, v in (edge_metrics or {}).items():
                if isinstance(v, int | float):
                    metrics[edge_key(edge, k)] = v
        if self.is_cloud_round(server_round) and len(per_edge) > 1:
            modules = {e: {k: v.numpy() for k, v in rec.items()} for e, rec in per_edge.items()}
            keys = [k for k in modules[next(iter(modules))] if self.cloud_keys(k)]
            delivered = cloud_aggregate(modules, weights, keys, self.cloud_mix)
            per_edge = {
                e: ArrayRecord({k: Array(v) for k, v in d.items()}) for e, d in delivered.items()
            }
            metrics["cloud-round"] = 1
            log(
                INFO,
                "cloud: aggregated %d modules across %d edges (mix %.2f)",
                len(keys),
                len(per_edge),
                self.cloud_mix,
            )
        metrics["failed-clusters"] = len(failures)
        metrics["failed-aggregates"] = refused
        ok_all = [r.content for r in replies if not r.has_error()]
        if self.train_metrics_fn and ok_all:
            metrics.update(dict(self.train_metrics_fn(ok_all, "num-examples")))  # type: ignore[arg-type]
        return join_edges(per_edge), MetricRecord(metrics)  # type: ignore[arg-type]

    # -- evaluate -------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sent = split_edges(arrays)
        messages: list[Message] = []
        for edge, strategy in self.edge_strategies.items():
            messages += strategy.configure_evaluate(
                server_round,
                sent[edge],
                ConfigRecord(dict(config)),
                EdgeGrid(grid, self.nodes_of(edge)),
            )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics: dict[str, float | int] = {}
        for edge, edge_replies in self._by_edge(replies).items():
            result = self.edge_strategies[edge].aggregate_evaluate(server_round, edge_replies)
            for k, v in (result or {}).items():
                if isinstance(v, int | float):
                    metrics[edge_key(edge, k)] = v
        return MetricRecord(metrics) if metrics else None  # type: ignore[arg-type]

    def summary(self) -> None:
        log(
            INFO,
            "\t├── CloudEdgeStrategy: %d edge server(s), cloud every %s round(s), mix %.2f",
            len(self.edge_strategies),
            self.cloud_every or "no",
            self.cloud_mix,
        )
        for edge, strategy in self.edge_strategies.items():
            log(
                INFO,
                "\t├── edge %d: %s over %d cluster(s)",
                edge,
                type(strategy).__name__,
                len(self.nodes_of(edge)),
            )
