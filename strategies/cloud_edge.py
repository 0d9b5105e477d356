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
each edge its own, and on cloud rounds runs the cloud's aggregation. Deployed, the same two
pieces run in processes of their own: an edge process runs its `EdgeServer` (inside a
`CloudEdgeStrategy` over that one edge, for the same metrics and records:
apps/edge_app.py), and the cloud process runs `CloudServer`, whose nodes are the edge servers
and which aggregates with `Cloud.deliver` (apps/cloud_app.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gaisnet_flwr.contract import (
    CLOUD_ROUND,
    EDGE_WEIGHT,
    EDGES_CONTRIBUTED,
    EDGES_FAILED,
    FAILED_AGGREGATES,
    FAILED_CLUSTERS,
    LATENCY,
    NO_REPLY,
    NUM_EXAMPLES,
    ROUND_LATENCY,
    EdgeReport,
    EdgeRequest,
    aggregate_metrics,
    edge_key,
    failure,
    join_edges,
    split_edges,
)
from strategies.edge import EdgeServer
from strategies.registry import reply_order

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
    edges), the `modules` it aggregates (the prompts, or all: config.CLOUD_MODULES, checked
    where the run-config is read), and the weight `mix` of its aggregate in what each edge
    receives back."""

    every: int
    mix: float
    modules: str = "prompts"

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
        price_latency: the round's simulated latency through the hierarchy, from its totals.
        on_round: hands each round's totals and failures to the results (the recorder).
        require_training: a round in which no cluster trained fails the run (one ServerApp
            holds the whole hierarchy); a deployed edge process leaves that to the cloud, which
            fails a cloud round no edge contributed to.
        on_evaluate: hands each round's aggregated cluster validation to the results.
    """

    def __init__(
        self,
        edges: Mapping[int, EdgeServer],
        cloud: Cloud,
        price_latency: LatencyPricer | None = None,
        on_round: RoundListener | None = None,
        require_training: bool = True,
        on_evaluate: EvaluateListener | None = None,
    ) -> None:
        self.edges = dict(sorted(edges.items()))
        self.cloud = cloud
        self.price_latency = price_latency
        self.on_round = on_round
        self.require_training = require_training
        self.on_evaluate = on_evaluate
        self.node_edges = {n: e for e, edge in self.edges.items() for n in edge.nodes}
        self._sent: dict[int, ArrayRecord] = {}  # what this round's configure_train sent

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
        # The round's totals over every cluster (each metric as the contract declares it),
        # summed in a fixed order (edge, then each edge's: `reply_order`): float sums must not
        # depend on which cluster answered first.
        ok = [r for r in replies if not r.has_error()]
        ok.sort(key=lambda r: (self.node_edges[r.metadata.src_node_id], reply_order(r)))
        ok_all = [r.content for r in ok]
        if ok_all:
            metrics.update(aggregate_metrics(ok_all, NUM_EXAMPLES))
        if self.price_latency is not None and LATENCY in metrics:
            metrics[ROUND_LATENCY] = self.price_latency(server_round, metrics)
        if self.on_round is not None:
            self.on_round(server_round, metrics, failures)
        if not ok_all and self.require_training:  # nothing learnt: the run has failed
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


# -- the cloud as a process of its own (tier 'cloud') -------------------------------------------
def cloud_chunks(num_rounds: int, every: int) -> list[tuple[int, int]]:
    """The hierarchy's rounds 1..num_rounds as the cloud's rounds: (first, last) per cloud
    round, K = `every` edge rounds each (the last may be shorter, and is a cloud aggregation
    only if it ends on a multiple of K); every = 0 (isolated edges): one chunk of them all."""
    step = every if every > 0 else num_rounds
    return [(first, min(first + step - 1, num_rounds)) for first in range(1, num_rounds + 1, step)]


@dataclass
class CloudRound:
    """What one cloud round of the deployed cloud came to (`CloudServer.last`)."""

    number: int  # the cloud round, 1..
    first: int  # the hierarchy's rounds the edges trained in it
    last: int
    sent: dict[int, int] = field(default_factory=dict)  # edge -> the node it was sent to
    reports: dict[int, EdgeReport] = field(default_factory=dict)  # the edges that answered
    failures: Failures = field(default_factory=list)  # each edge left out, and why
    delivered: dict[int, ArrayRecord] = field(default_factory=dict)  # what each edge gets back
    metrics: dict[str, Any] = field(default_factory=dict)
    aggregated: bool = False  # the cloud aggregated across edges (a cloud round of K)

    @property
    def contributed(self) -> list[int]:
        """The edges whose clusters trained: their modules count in the cloud's average."""
        return sorted(e for e, r in self.reports.items() if r.weight > 0)

    @property
    def missing(self) -> list[int]:
        return sorted({int(f["edge"]) for f in self.failures})

    @property
    def completed(self) -> bool:
        return bool(self.contributed)


class CloudServer(Strategy):
    """The cloud as a process of its own: its nodes are the edge servers (apps/cloud_app.py).

    Cloud round c sends each edge the modules the cloud holds for it (a restarted edge starts
    from them) and asks it to train the hierarchy's rounds `chunks[c - 1]`; each edge answers
    with its modules, its weight (the training examples of its clusters that trained in its
    last round) and its metrics. The cloud then runs `Cloud.deliver` over every edge, as
    `CloudEdgeStrategy` does in one ServerApp: an edge that failed or missed the deadline counts
    with weight 0 and the modules it was sent (as an edge whose clusters all failed does there),
    and gets its delivery with the next round's request; the others get it in the evaluate
    phase, and answer with its accuracy on their domains. A cloud round in which no edge
    contributed fails the run (RunFailedError).

    Args:
        cloud: when and what the cloud aggregates.
        chunks: (first, last) hierarchy rounds per cloud round (`cloud_chunks`).
        locate: the grid -> {edge: its node now} (apps/cloud_app.EdgeDirectory).
        num_edges: the edges of edge-domains.
        timeout_s: how long an edge has for a cloud round (run-config cloud-timeout-s).
        done: cloud rounds already completed (a resumed cloud): Flower's round r is cloud
            round done + r.
        on_round: each cloud round's record, after its train phase (the results, the state).
        on_delivered: (cloud round, the edges' metrics after the delivery).
        shared: the run-config every edge must share (config.shared_keys), sent with each
            request: an edge with another refuses to serve, naming the keys.
    """

    def __init__(
        self,
        cloud: Cloud,
        chunks: Sequence[tuple[int, int]],
        locate: Callable[[Grid], Mapping[int, int]],
        num_edges: int,
        timeout_s: float,
        done: int = 0,
        on_round: Callable[[CloudRound], None] | None = None,
        on_delivered: Callable[[int, Mapping[str, Any]], None] | None = None,
        shared: Mapping[str, Any] | None = None,
    ) -> None:
        self.cloud = cloud
        self.shared = dict(shared or {})
        self.chunks = list(chunks)
        self.locate = locate
        self.num_edges = num_edges
        self.timeout_s = timeout_s
        self.done = done
        self.on_round = on_round
        self.on_delivered = on_delivered
        self.last = CloudRound(0, 0, 0)
        self._messages: dict[int, Message] = {}  # edge -> this phase's message to it

    def _round(self, server_round: int) -> tuple[int, int, int, bool]:
        number = self.done + server_round
        first, last = self.chunks[number - 1]
        return number, first, last, number == len(self.chunks)

    def _send(self, kind: str, server_round: int, modules: Mapping[int, ArrayRecord],
              nodes: Mapping[int, int], stop: bool = False) -> list[Message]:  # fmt: skip
        number, first, last, final = self._round(server_round)
        final = final or stop
        self._messages = {
            e: EdgeRequest(
                kind, number, first, last, final, self.timeout_s, modules[e], self.shared
            ).to_message(node)
            for e, node in nodes.items()
        }
        return list(self._messages.values())

    def _answers(self, replies: Iterable[Message]) -> dict[int, Message]:
        """Each edge's reply, matched by the message it answers (an error the SuperLink makes
        for a node that went offline comes from the SuperLink, not from the node)."""
        by_id = {m.metadata.message_id: e for e, m in self._messages.items()}
        return {
            by_id[r.metadata.reply_to_message_id]: r
            for r in replies
            if r.metadata.reply_to_message_id in by_id
        }

    # -- train: the edges' rounds, the cloud's aggregation ------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        number, first, last, _ = self._round(server_round)
        nodes = dict(self.locate(grid))
        self.last = CloudRound(number, first, last, sent=nodes)
        self._held = split_edges(arrays)
        log(INFO, "cloud round %d: edges %s train rounds %d-%d", number, sorted(nodes), first,
            last)  # fmt: skip
        return self._send("train", server_round, self._held, nodes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.last
        answers = self._answers(replies)
        metrics: dict[str, Any] = {}
        for e in range(self.num_edges):
            node = record.sent.get(e)
            reply = answers.get(e)
            if node is None:
                reason = "no SuperNode of this edge is connected to the cloud"
                record.failures.append(failure(-1, e, NO_REPLY, reason))
            elif reply is None:
                reason = "no reply within the cloud round's timeout"
                record.failures.append(failure(node, e, NO_REPLY, reason))
            elif reply.has_error():
                record.failures.append(failure(node, e, reply.error.code, str(reply.error.reason)))
            else:
                report = EdgeReport.from_content(reply.content)
                record.reports[e] = report
                metrics.update(report.metrics)
                metrics[edge_key(e, EDGE_WEIGHT)] = report.weight
                metrics[edge_key(e, FAILED_CLUSTERS)] = len(report.failures)
        per_edge: dict[int, ArrayRecord] = {}
        for e in range(self.num_edges):  # an edge left out counts with what it was sent
            answered = record.reports[e].modules if e in record.reports else None
            per_edge[e] = answered if answered is not None else self._held[e]
        weights = {
            e: record.reports[e].weight if e in record.reports else 0.0
            for e in range(self.num_edges)
        }
        record.aggregated = (
            self.cloud.is_round(record.last) and self.num_edges > 1 and record.completed
        )
        record.delivered = self.cloud.deliver(per_edge, weights) if record.aggregated else per_edge
        metrics[CLOUD_ROUND] = int(record.aggregated)
        metrics[EDGES_CONTRIBUTED] = len(record.contributed)
        metrics[EDGES_FAILED] = len(record.failures)
        record.metrics = metrics
        if self.on_round is not None:
            self.on_round(record)
        if not record.completed:  # nothing aggregated, nothing learnt: the run has failed
            why = "; ".join(f"edge {f['edge']}: {f['reason']}" for f in record.failures)
            raise RunFailedError(
                f"cloud round {record.number}: no edge contributed "
                f"({why or 'no cluster of any edge trained'})"
            )
        return join_edges(record.delivered), MetricRecord(metrics)

    # -- evaluate: the delivery, and each edge's accuracy on its domain -------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        answered = {e: self.last.sent[e] for e in self.last.reports}
        return self._send("evaluate", server_round, split_edges(arrays), answered)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics: dict[str, Any] = {}
        for e, reply in sorted(self._answers(replies).items()):
            if reply.has_error():
                log(WARNING, "cloud round %d: edge %d did not take the delivery: %s",
                    self.last.number, e, reply.error.reason)  # fmt: skip
                continue
            metrics.update(EdgeReport.from_content(reply.content).metrics)
        if self.on_delivered is not None:
            self.on_delivered(self.last.number, metrics)
        return MetricRecord(metrics) if metrics else None

    def stop(self, grid: Grid, arrays: ArrayRecord) -> None:
        """Fine-tuning stops after this cloud round (a stopping rule met, apps/convergence.py):
        every edge connected now is sent its delivery again, marked final, and ends its run with
        it, as after the last cloud round (an edge that answered holds it already)."""
        nodes = dict(self.locate(grid))
        messages = self._send("evaluate", self.last.number - self.done, split_edges(arrays),
                              nodes, stop=True)  # fmt: skip
        answers = self._answers(grid.send_and_receive(messages, timeout=self.timeout_s))
        for e, node in sorted(nodes.items()):
            reply = answers.get(e)
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else reply.error.reason
                log(WARNING, "cloud: edge %d (node %s) did not take the final delivery: %s", e,
                    node, why)  # fmt: skip

    def summary(self) -> None:
        log(INFO, "\t├── CloudServer: %d edge server(s), %d cloud round(s) (%d done), cloud "
            "every %s round(s), mix %.2f", self.num_edges, len(self.chunks), self.done,
            self.cloud.every or "no", self.cloud.mix)  # fmt: skip


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
