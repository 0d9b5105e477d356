"""SL inference requests after fine-tuning, as a strategy run by Flower's `Strategy.start`.

Paper Sec. III-D: the edge delivers its model to a cluster's start point, which runs its chain
and returns the result. Round t of `start` is request t: `configure_train` sends one
`query.infer` message, round-robin over the clusters, carrying the modules of that cluster's
edge; `aggregate_train` reports what came back and hands the modules on unchanged. A failed
request (an error reply or none) is reported in its row; it never stops the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from gaisnet_flwr.contract import split_edges
from strategies.cloud_edge import CentralEvaluationOnly


class Serving(Protocol):
    """How the ServerApp serves SL inference requests (apps/server_app.py), for the serving and
    the integrated strategies."""

    def request(self, modules: ArrayRecord, node: int) -> Message:
        """The query.infer message that asks `node` to serve with its edge's `modules`."""

    def report(self, reply: Message | None, node: int, edge: int, index: int) -> dict[str, Any]:
        """The served request's row (an error row when there was no reply)."""


class ServeRequests(CentralEvaluationOnly):
    """One inference request per round, round-robin over the clusters (module docstring)."""

    def __init__(
        self,
        node_edges: Mapping[int, int],
        serving: Serving,
        on_request: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.node_edges = dict(node_edges)
        self.serving = serving
        self.on_request = on_request
        self._node = -1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = sorted(self.node_edges)
        self._node = nodes[(server_round - 1) % len(nodes)]
        edge_modules = split_edges(arrays)[self.node_edges[self._node]]
        return [self.serving.request(edge_modules, self._node)]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reply = next(iter(replies), None)
        row = self.serving.report(reply, self._node, self.node_edges[self._node], server_round - 1)
        if self.on_request:
            self.on_request(row)
        numbers = {
            k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return None, MetricRecord(numbers)  # type: ignore[arg-type]  # modules stay as delivered

    def summary(self) -> None:
        log(INFO, "\t├── ServeRequests: round-robin over %d cluster(s)", len(self.node_edges))
