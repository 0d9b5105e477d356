"""The integrated service loop: each round, fine-tune one edge model or serve a request.

Paper Sec. IV-C and V-F. The demand names, per round, which edge's model a request needs. The
scheduler (`gaisnet_flwr/scheduler.py`: RS, MSIP or MLCP) picks the action from the *measured*
accuracy of every edge model and the fitted gain of fine-tuning it:
  * fine-tune edge e: one real HFSL round over e's clusters through e's own strategy instance,
    costing `finetune-cost` plus `energy-price` x the energy the cost model puts on the round;
    then e is re-evaluated on its domain's test set and its gain refitted;
  * serve: one real split-inference request on a cluster of the demanded edge, earning
    `service-value` x the accuracy the request achieved minus `energy-price` x its energy.
Decisions, accuracies and cumulative profit per round go to `integrated.json`.
"""

from __future__ import annotations

import json
import random
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from gaisnet_flwr.apps.serving import serve_request
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import ImageData
from gaisnet_flwr.service.scheduler import SERVE, QualityModel, choose_action
from gaisnet_flwr.training.loops import evaluate
from gaisnet_flwr.vit.model import PromptedViT
from strategies.cloud_edge import CloudEdgeStrategy, EdgeGrid

PRIOR_GAIN = 0.3  # fraction of the accuracy gap one round closes, until measured


def fitted_gain(history: list[tuple[float, float]]) -> float:
    """Mean measured fraction of the gap closed per fine-tuning round, clipped to [0.01, 0.9]."""
    if not history:
        return PRIOR_GAIN
    fractions = [(after - before) / max(1e-6, 1.0 - before) for before, after in history]
    return min(0.9, max(0.01, sum(fractions) / len(fractions)))


def run_integrated(
    grid: Grid,
    cfg: RunConfig,
    strategy: CloudEdgeStrategy,
    model: PromptedViT,
    edges: list[ImageData],
    output_dir: Path,
) -> list[dict[str, Any]]:
    device = cfg.torch_device()
    modules = {e: ArrayRecord(model.tunable_state()) for e in range(len(edges))}

    def accuracy_of(e: int) -> float:
        model.load_tunable_state(modules[e].to_torch_state_dict())
        return evaluate(model, edges[e].test, device=device).accuracy

    accuracy = [accuracy_of(e) for e in range(len(edges))]
    history: list[list[tuple[float, float]]] = [[] for _ in edges]
    demand = cfg.demand_list()
    rng = random.Random(cfg.seed)
    rows: list[dict[str, Any]] = []
    cumulative = 0.0
    energy = {"serve": 0.0, "finetune": 0.0}
    for t, wanted in enumerate(demand):
        gains = [fitted_gain(h) for h in history]
        # Resource costs as last measured by the cost model (0 until an action was seen).
        quality = QualityModel(
            value=cfg.service_value,
            finetune_cost=cfg.finetune_cost + cfg.energy_price * energy["finetune"],
            serve_cost=cfg.energy_price * energy["serve"],
        )
        action = choose_action(cfg.policy, quality, accuracy, gains, demand[t:], rng)
        row: dict[str, Any] = {"round": t + 1, "demand": wanted, "action": action}
        if action == SERVE:
            nodes = strategy.nodes_of(wanted)
            reply = serve_request(
                grid, cfg, model, modules[wanted], nodes[t % len(nodes)], wanted, t
            )
            served_accuracy = float(reply.get("accuracy", 0.0)) if "error" not in reply else 0.0
            energy["serve"] = float(reply.get("energy-j", energy["serve"]))
            profit = quality.value * served_accuracy - cfg.energy_price * energy["serve"]
            row["energy-j"] = energy["serve"]
            row.update({"served-accuracy": served_accuracy, "error": reply.get("error")})
        else:
            e = int(action.split(":")[1])
            edge_strategy = strategy.edge_strategies[e]
            messages = list(
                edge_strategy.configure_train(
                    t + 1, modules[e], ConfigRecord({}), EdgeGrid(grid, strategy.nodes_of(e))
                )
            )
            replies = list(grid.send_and_receive(messages, timeout=3600))
            # Clusters that failed (a dead D2D peer) are left out of the aggregate, and counted.
            row["failed-clusters"] = len(messages) - sum(not r.has_error() for r in replies)
            arrays, _ = edge_strategy.aggregate_train(t + 1, replies)
            if arrays is not None:
                modules[e] = arrays
            before = accuracy[e]
            accuracy[e] = accuracy_of(e)
            history[e].append((before, accuracy[e]))
            ok = [r.content.metric_records["metrics"] for r in replies if not r.has_error()]
            energy["finetune"] = float(sum(m["energy-j"] for m in ok))  # type: ignore[misc]
            profit = -cfg.finetune_cost - cfg.energy_price * energy["finetune"]
            row["energy-j"] = energy["finetune"]
        cumulative += profit
        row.update(
            {
                "profit": profit,
                "cumulative-profit": cumulative,
                "accuracy": list(accuracy),
                "gains": gains,
            }
        )
        rows.append(row)
        (output_dir / "integrated.json").write_text(json.dumps(rows, indent=2))
        log(
            INFO,
            "[integrated %d/%d] %s: request for edge %d -> %s, profit %+.1f, cumulative "
            "%.1f, accuracy %s",
            t + 1,
            len(demand),
            cfg.policy,
            wanted,
            action,
            profit,
            cumulative,
            " ".join(f"{a:.3f}" for a in accuracy),
        )
    log(
        INFO,
        "FINAL: %s cumulative profit %.1f over %d rounds; results in %s",
        cfg.policy,
        cumulative,
        len(demand),
        output_dir,
    )
    return rows
