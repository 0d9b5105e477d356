"""Integrated fine-tuning and inference as a Flower strategy (paper Sec. IV-C and V-F).

Run under Flower's `Strategy.start`, one round per entry of the demand (which edge's model the
round's request needs). In `configure_train` the scheduler (`gaisnet_flwr.service.scheduler`:
RS, MSIP or MLCP) picks the round's action from the *measured* accuracy of every edge model and
the fitted gain of fine-tuning it:
  * fine-tune edge e: train messages to e's clusters through e's own strategy instance (one real
    HFSL round); `aggregate_train` aggregates them with that strategy, re-evaluates e (the
    injected `evaluate_edge`) and refits its gain. It costs `finetune_cost` plus
    `energy_price` x the energy the clusters' cost model reports;
  * serve: one `query.infer` message to a cluster of the demanded edge; `aggregate_train`
    records the served request, earning `service_value` x the accuracy it achieved minus
    `energy_price` x its energy.
The global arrays are the edges' modules side by side (`edge<e>/<module>`), as in the
cloud-edge strategy. Each round's row (decision, accuracies, profit) goes to `on_round`; the
round's numbers are also the MetricRecord `aggregate_train` returns (Flower's `Result`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gaisnet_flwr.service.integrated import fitted_gain
from gaisnet_flwr.service.scheduler import SERVE, QualityModel, choose_action
from strategies.cloud_edge import (
    CentralEvaluationOnly,
    EdgeGrid,
    RunFailedError,
    join_edges,
    split_edges,
)

# (edge, its modules) -> the accuracy of that edge model on its domain's test set
EdgeEvaluator = Callable[[int, ArrayRecord], float]
# (edge's modules, node) -> the query.infer message that asks `node` to serve with them
RequestBuilder = Callable[[ArrayRecord, int], Message]
# (reply or None, node, edge, request index) -> the served request's row
ServedReport = Callable[[Message | None, int, int, int], dict[str, Any]]


class IntegratedStrategy(CentralEvaluationOnly):
    """Each round: fine-tune one edge model or serve that round's request (module docstring)."""

    def __init__(  # noqa: PLR0913 - the economics are explicit parameters
        self,
        edge_strategies: Mapping[int, Strategy],
        node_edges: Mapping[int, int],
        *,
        policy: str,
        demand: Sequence[int],
        quality: QualityModel,
        energy_price: float,
        evaluate_edge: EdgeEvaluator,
        request: RequestBuilder,
        served: ServedReport,
        seed: int = 0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.edge_strategies = dict(sorted(edge_strategies.items()))
        self.node_edges = dict(node_edges)
        self.policy = policy
        self.demand = list(demand)
        self.quality = quality  # value and fixed fine-tuning cost; resources are added per round
        self.energy_price = energy_price
        self.evaluate_edge = evaluate_edge
        self.request = request
        self.served = served
        self.on_round = on_round
        self.rng = random.Random(seed)
        self.accuracy: list[float] = []
        self.history: list[list[tuple[float, float]]] = [[] for _ in self.edge_strategies]
        self.energy = {"serve": 0.0, "finetune": 0.0}  # as last measured by the cost model
        self.cumulative = 0.0
        self._modules: dict[int, ArrayRecord] = {}
        self._row: dict[str, Any] = {}
        self._node = -1  # the node serving this round's request
        self._sent = 0  # train messages sent this round

    def nodes_of(self, edge: int) -> list[int]:
        return sorted(n for n, e in self.node_edges.items() if e == edge)

    # -- the round's decision -------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        t = server_round - 1
        self._modules = split_edges(arrays)
        if not self.accuracy:  # the start models, measured once
            self.accuracy = [self.evaluate_edge(e, m) for e, m in self._modules.items()]
        gains = [fitted_gain(h) for h in self.history]
        quality = QualityModel(
            value=self.quality.value,
            finetune_cost=self.quality.finetune_cost + self.energy_price * self.energy["finetune"],
            serve_cost=self.energy_price * self.energy["serve"],
        )
        action = choose_action(
            self.policy, quality, self.accuracy, gains, self.demand[t:], self.rng
        )
        wanted = self.demand[t]
        self._row = {"round": server_round, "demand": wanted, "action": action, "gains": gains}
        if action == SERVE:
            nodes = self.nodes_of(wanted)
            self._node = nodes[t % len(nodes)]
            return [self.request(self._modules[wanted], self._node)]
        edge = int(action.split(":")[1])
        messages = list(
            self.edge_strategies[edge].configure_train(
                server_round,
                self._modules[edge],
                ConfigRecord(dict(config)),
                EdgeGrid(grid, self.nodes_of(edge)),
            )
        )
        self._sent = len(messages)
        return messages

    # -- what the round achieved ----------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        row = self._row
        gains = row.pop("gains")
        if row["action"] == SERVE:
            wanted = row["demand"]
            served = self.served(
                replies[0] if replies else None, self._node, wanted, server_round - 1
            )
            served_accuracy = float(served.get("accuracy", 0.0)) if "error" not in served else 0.0
            self.energy["serve"] = float(served.get("energy-j", self.energy["serve"]))
            profit = self.quality.value * served_accuracy - self.energy_price * self.energy["serve"]
            row["energy-j"] = self.energy["serve"]
            row.update({"served-accuracy": served_accuracy, "error": served.get("error")})
        else:
            edge = int(row["action"].split(":")[1])
            # Clusters that failed (a dead D2D peer) are left out of the aggregate, and counted;
            # a fine-tuning round in which no cluster trained fails the run.
            trained = sum(not r.has_error() for r in replies)
            row["failed-clusters"] = self._sent - trained
            if trained == 0:
                reasons = [r.error.reason for r in replies if r.has_error()] or ["no reply"]
                raise RunFailedError(
                    f"round {server_round}: no cluster of edge {edge} trained ({self._sent} "
                    f"sent; first: {reasons[0]})"
                )
            arrays, _ = self.edge_strategies[edge].aggregate_train(server_round, replies)
            if arrays is not None:
                self._modules[edge] = arrays
            before = self.accuracy[edge]
            self.accuracy[edge] = self.evaluate_edge(edge, self._modules[edge])
            self.history[edge].append((before, self.accuracy[edge]))
            ok = [r.content.metric_records["metrics"] for r in replies if not r.has_error()]
            self.energy["finetune"] = float(sum(m["energy-j"] for m in ok))  # type: ignore[misc]
            profit = -self.quality.finetune_cost - self.energy_price * self.energy["finetune"]
            row["energy-j"] = self.energy["finetune"]
        self.cumulative += profit
        row.update(
            {
                "profit": profit,
                "cumulative-profit": self.cumulative,
                "accuracy": list(self.accuracy),
                "gains": gains,
            }
        )
        log(
            INFO,
            "[integrated %d/%d] %s: request for edge %d -> %s, profit %+.1f, cumulative "
            "%.1f, accuracy %s",
            server_round,
            len(self.demand),
            self.policy,
            row["demand"],
            row["action"],
            profit,
            self.cumulative,
            " ".join(f"{a:.3f}" for a in self.accuracy),
        )
        if self.on_round:
            self.on_round(row)
        metrics: dict[str, float | int | list[float]] = {
            "profit": profit,
            "cumulative-profit": self.cumulative,
            "energy-j": float(row["energy-j"]),
            "served": int(row["action"] == SERVE),
            "accuracy": list(self.accuracy),
        }
        return join_edges(self._modules), MetricRecord(metrics)  # type: ignore[arg-type]

    def summary(self) -> None:
        log(
            INFO,
            "\t├── IntegratedStrategy: %s over %d rounds of demand, %d edge model(s)",
            self.policy,
            len(self.demand),
            len(self.edge_strategies),
        )
