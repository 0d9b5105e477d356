"""Round results through Flower's records: a strategy wrapper that hands them to the recorder.

`RecordedRounds` wraps the run's strategy (the cloud-edge strategy) for `Strategy.start`. It
delegates every hook and, in `aggregate_train`, sees what Flower hands the strategy: the train
replies (an error reply carries the failure's code and reason; a node sent to that did not
answer failed too) and the aggregated MetricRecord. It adds the round's simulated latency
through the hierarchy (`round-latency-s`) to that record, which is what `Result` keeps, and
hands record and failures to the recorder. The central evaluation (`evaluate_fn`) completes
the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gaisnet_flwr.apps.recorder import RoundRecorder
from strategies.cloud_edge import RunFailedError, refused_aggregates, round_failures

# (server round, aggregated train metrics) -> the round's latency through the hierarchy
LatencyPricer = Callable[[int, Mapping[str, float | int]], float]


class RecordedRounds(Strategy):
    """`strategy`'s rounds, each handed to `recorder` (see the module docstring)."""

    def __init__(
        self,
        strategy: Strategy,
        recorder: RoundRecorder,
        node_edges: Mapping[int, int],
        price_latency: LatencyPricer | None = None,
    ) -> None:
        self.strategy = strategy
        self.recorder = recorder
        self.node_edges = dict(node_edges)
        self.price_latency = price_latency
        self._sent_nodes: list[int] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent_nodes = sorted(m.metadata.dst_node_id for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        train: dict[str, float | int] = dict(metrics or {})  # type: ignore[arg-type]
        if self.price_latency is not None and "latency-s" in train:
            train["round-latency-s"] = self.price_latency(server_round, train)
        failures = round_failures(replies, self._sent_nodes, self.node_edges)
        failures += refused_aggregates(train)  # from the record, not the strategy's state
        self.recorder.train_round(server_round, train, failures)
        trained = sum(not r.has_error() for r in replies)
        if trained == 0:  # nothing to aggregate, nothing learnt: the run has failed
            first = failures[0] if failures else {"node": "?", "edge": "?", "reason": "?"}
            raise RunFailedError(
                f"round {server_round}: no cluster trained ({len(self._sent_nodes)} sent, "
                f"{len(failures)} failed; first: node {first['node']} (edge {first['edge']}): "
                f"{first['reason']})"
            )
        return arrays, MetricRecord(train)  # type: ignore[arg-type]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
