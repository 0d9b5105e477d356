"""Integrated fine-tuning and inference as a Flower strategy (paper Sec. IV-C and V-F).

Run under Flower's `Strategy.start`, one round per entry of the demand (which edge's model the
round's request needs). In `configure_train` the scheduler (`gaisnet_flwr.service.scheduler`:
RS, MSIP or MLCP) picks the round's action from the *measured* accuracy of every edge model and
the fitted gain of fine-tuning it:
  * fine-tune edge e: train messages to e's clusters through e's own `EdgeServer` (one real
    HFSL round); `aggregate_train` aggregates them there, re-evaluates e (the injected
    `evaluate_edge`) and refits its gain. It costs `finetune_cost` plus
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

from gaisnet_flwr.contract import (
    ACCURACY,
    CUMULATIVE_PROFIT,
    ENERGY,
    FAILED_CLUSTERS,
    PROFIT,
    SERVED_ACCURACY,
    join_edges,
    reply_metrics,
    split_edges,
)
from gaisnet_flwr.service.scheduler import Action, QualityModel, choose_action, fitted_gain
from strategies.cloud_edge import CentralEvaluationOnly, RunFailedError
from strategies.edge import EdgeServer
from strategies.serving import Serving

# (edge, its modules) -> the accuracy of that edge model on its domain's test set
EdgeEvaluator = Callable[[int, ArrayRecord], float]


class IntegratedStrategy(CentralEvaluationOnly):
    """Each round: fine-tune one edge model or serve that round's request (module docstring)."""

    def __init__(  # noqa: PLR0913 - the economics are explicit parameters
        self,
        edges: Mapping[int, EdgeServer],
        *,
        policy: str,
        demand: Sequence[int],
        quality: QualityModel,
        energy_price: float,
        evaluate_edge: EdgeEvaluator,
        serving: Serving,
        seed: int = 0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.edges = dict(sorted(edges.items()))
        self.policy = policy
        self.demand = list(demand)
        self.quality = quality  # value and fixed fine-tuning cost; resources are added per round
        self.energy_price = energy_price
        self.evaluate_edge = evaluate_edge
        self.serving = serving
        self.on_round = on_round
        self.rng = random.Random(seed)
        self.accuracy: list[float] = []
        self.history: list[list[tuple[float, float]]] = [[] for _ in self.edges]
        # What serving a request and a fine-tuning round cost, as last measured (cost model, J).
        self.serve_energy = self.finetune_energy = 0.0
        self.cumulative = 0.0
        self._modules: dict[int, ArrayRecord] = {}
        self._row: dict[str, Any] = {}
        self._node = -1  # the node serving this round's request

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
            finetune_cost=self.quality.finetune_cost + self.energy_price * self.finetune_energy,
            serve_cost=self.energy_price * self.serve_energy,
        )
        action = choose_action(
            self.policy, quality, self.accuracy, gains, self.demand[t:], self.rng
        )
        wanted = self.demand[t]
        self._row = {"round": server_round, "demand": wanted, "action": action, "gains": gains}
        if action.edge is None:
            nodes = self.edges[wanted].nodes
            self._node = nodes[t % len(nodes)]
            return [self.serving.request(self._modules[wanted], self._node)]
        return self.edges[action.edge].configure_train(
            server_round, self._modules[action.edge], config, grid
        )

    # -- what the round achieved ----------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        row = self._row
        gains = row.pop("gains")
        action: Action = row["action"]
        if action.edge is None:
            wanted = row["demand"]
            served = self.serving.report(
                replies[0] if replies else None, self._node, wanted, server_round - 1
            )
            served_accuracy = float(served.get(ACCURACY, 0.0)) if "error" not in served else 0.0
            self.serve_energy = float(served.get(ENERGY, self.serve_energy))
            profit = self.quality.value * served_accuracy - self.energy_price * self.serve_energy
            row[ENERGY] = self.serve_energy
            row.update({SERVED_ACCURACY: served_accuracy, "error": served.get("error")})
        else:
            edge = action.edge
            # Clusters that failed (a dead D2D peer) are left out of the aggregate, and counted;
            # a fine-tuning round in which no cluster trained fails the run.
            arrays, _ = self.edges[edge].aggregate_train(server_round, replies)
            last = self.edges[edge].last
            row[FAILED_CLUSTERS] = len(last.sent) - last.trained
            if last.trained == 0:
                reasons = [str(f["reason"]) for f in last.failures] or ["no reply"]
                raise RunFailedError(
                    f"round {server_round}: no cluster of edge {edge} trained ({len(last.sent)} "
                    f"sent; first: {reasons[0]})"
                )
            if arrays is not None:
                self._modules[edge] = arrays
            before = self.accuracy[edge]
            self.accuracy[edge] = self.evaluate_edge(edge, self._modules[edge])
            self.history[edge].append((before, self.accuracy[edge]))
            ok = [reply_metrics(r) for r in replies if not r.has_error()]
            self.finetune_energy = float(sum(m[ENERGY] for m in ok))
            profit = -self.quality.finetune_cost - self.energy_price * self.finetune_energy
            row[ENERGY] = self.finetune_energy
        self.cumulative += profit
        row.update(
            {
                PROFIT: profit,
                CUMULATIVE_PROFIT: self.cumulative,
                ACCURACY: list(self.accuracy),
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
            PROFIT: profit,
            CUMULATIVE_PROFIT: self.cumulative,
            ENERGY: float(row[ENERGY]),
            "served": int(action.edge is None),
            ACCURACY: list(self.accuracy),
        }
        return join_edges(self._modules), MetricRecord(metrics)  # type: ignore[arg-type]

    def summary(self) -> None:
        log(
            INFO,
            "\t├── IntegratedStrategy: %s over %d rounds of demand, %d edge model(s)",
            self.policy,
            len(self.demand),
            len(self.edges),
        )
