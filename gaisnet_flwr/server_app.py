"""ServerApp: the edge server running HFSL fine-tuning (paper Sec. III-C, Fig. 4).

It builds the initial edge model, sends only its tunable modules to the client clusters, lets the
configured strategy aggregate them (per-module FedAvg by default) for `num-rounds` rounds,
evaluates the edge model centrally on the held-out test set every round, and writes results to
`output-dir`.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from gaisnet_flwr.cloud import ensure_foundation, load_foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data import load_image_data
from gaisnet_flwr.results import RoundRecorder
from gaisnet_flwr.training import cluster_plan, evaluate
from strategies.registry import build_strategy, resolve_strategy


def wait_for_clusters(grid: Grid, timeout_s: float = 60.0) -> int:
    """Nodes connected now (all of them in simulation; deployment SuperNodes may lag)."""
    deadline = time.monotonic() + timeout_s
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not nodes:
        raise RuntimeError(f"no client cluster connected within {timeout_s:.0f} s")
    return len(nodes)


def run_hfsl(grid: Grid, cfg: RunConfig) -> Result:
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    data = load_image_data(cfg.data_spec())
    device = cfg.torch_device()
    ensure_foundation(cfg, data)
    model = load_foundation(cfg, data.num_classes)
    plan = cluster_plan(cfg)
    num_clusters = wait_for_clusters(grid)
    recorder = RoundRecorder(output_dir, cfg.num_rounds)

    options: dict[str, Any] = dict(cfg.strategy_kwargs())
    if "train_metrics_aggr_fn" in inspect.signature(resolve_strategy(cfg.strategy)).parameters:
        options["train_metrics_aggr_fn"] = recorder.aggregate_train
    strategy = build_strategy(
        cfg.strategy,
        num_clusters=num_clusters,
        fraction_evaluate=cfg.fraction_evaluate,
        options=options,
    )

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
    log(
        INFO,
        "%d client clusters, each start point -> %d peers %s -> end point; strategy %s",
        num_clusters,
        plan.num_peers,
        plan.sizes(),
        type(strategy).__name__,
    )
    (output_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_tunable_state(arrays.to_torch_state_dict())
        result = evaluate(model, data.test, device=device)
        recorder.record(server_round, {"accuracy": result.accuracy, "loss": result.loss})
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.tunable_state()),
        num_rounds=cfg.num_rounds,
        train_config=ConfigRecord({}),
        evaluate_fn=central_evaluate,
    )
    final = result.arrays.to_numpy_ndarrays() if result.arrays else []
    keys = list(result.arrays.keys()) if result.arrays else []
    path = recorder.save_modules(dict(zip(keys, final, strict=True)))
    last = recorder.rows[-1]
    log(
        INFO,
        "FINAL: central test accuracy %.4f after %d rounds (%d clusters); results in %s "
        "(modules: %s)",
        last["accuracy"],
        cfg.num_rounds,
        num_clusters,
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
