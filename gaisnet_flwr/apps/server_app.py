"""ServerApp: the cloud and its edge servers running HFSL fine-tuning (paper Sec. III-B, III-C).

Start-up (`hfsl.prepare`): the foundation, every node's edge, one strategy per edge under the
cloud-edge strategy. Then Flower's `Strategy.start` runs the rounds: clusters fine-tune their
edge's tunable modules over their split chains, each edge aggregates its clusters, every
`cloud-every` rounds the cloud aggregates across edges, and each edge model is evaluated on its
own domain's test set; results go to `output-dir`. With `service = "integrated"` the integrated
strategy decides, round by round, to fine-tune an edge model or serve a request instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from logging import ERROR, INFO
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from gaisnet_flwr.apps.hfsl import HfslRun, check_run_config, prepare
from gaisnet_flwr.apps.in_flight import InFlightWindow
from gaisnet_flwr.apps.recorder import RoundRecorder
from gaisnet_flwr.apps.tracking import Tracking, check_mlflow
from strategies.cloud_edge import join_edges


def fine_tune(grid: Grid, run: HfslRun) -> Result:
    cfg = run.cfg
    recorder = RoundRecorder.for_run(
        run.output_dir, cfg.hierarchy.num_rounds, cfg.to_dict(), cfg.run.mlflow_tracking_uri
    )
    initial = run.initial_modules()
    try:
        result = run.recorded_rounds(recorder).start(
            grid=grid,
            initial_arrays=join_edges({e: initial for e in range(len(run.edges))}),
            num_rounds=cfg.hierarchy.num_rounds,
            evaluate_fn=run.evaluate_fn(recorder),
        )
    except BaseException:
        recorder.close(failed=True)  # the rounds so far: summary.png, trackers marked failed
        raise
    path = recorder.save_modules({k: v.numpy() for k, v in result.arrays.items()})
    failed = [int(r.get("failed-clusters", 0)) for r in recorder.rows[1:]]
    summary = recorder.close()
    if cfg.inference.inference_requests:  # SL inference with the fine-tuned edge models
        run.serving_strategy().start(
            grid=grid,
            initial_arrays=result.arrays,
            num_rounds=cfg.inference.inference_requests,
            timeout=300,
        )
    log(
        INFO,
        "FINAL: central test accuracy %.4f after %d rounds (%d edge(s), %d clusters; "
        "%d cluster failure(s) in %d round(s)); "
        "results in %s (modules: %s, picture: %s, TensorBoard: tensorboard --logdir %s)",
        recorder.rows[-1]["accuracy"],
        cfg.hierarchy.num_rounds,
        len(run.edges),
        len(run.node_edges),
        sum(failed),
        sum(n > 0 for n in failed),
        run.output_dir,
        path.name,
        summary.name,
        run.output_dir.parent,
    )
    return result


def integrated(grid: Grid, run: HfslRun) -> Result:
    demand = run.cfg.scheduling.demand_list()
    initial = run.initial_modules()
    # TensorBoard (and MLflow) get each round's decision row: profit, energy, accuracies.
    tracking = Tracking.open(run.output_dir, run.cfg.to_dict(), run.cfg.run.mlflow_tracking_uri)
    try:
        result = run.integrated_strategy(tracking).start(
            grid=grid,
            initial_arrays=join_edges({e: initial for e in range(len(run.edges))}),
            num_rounds=len(demand),
        )
    finally:
        names = ("integrated.json", "config.json")
        tracking.close([run.output_dir / n for n in names], failed=sys.exc_info()[0] is not None)
    log(
        INFO,
        "FINAL: %s cumulative profit %.1f over %d rounds; results in %s "
        "(TensorBoard: tensorboard --logdir %s)",
        run.cfg.scheduling.policy,
        result.train_metrics_clientapp[len(demand)]["cumulative-profit"],
        len(demand),
        run.output_dir,
        run.output_dir.parent,
    )
    return result


def create_server_app(fallback_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; `fallback_config` serves `run_simulation`, which passes no run-config."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        started_cpu = time.thread_time()
        try:
            cfg = check_run_config(context.run_config or fallback_config or {})
            check_mlflow(cfg.run.mlflow_tracking_uri)  # before any work
            # At most max-in-flight messages at once: Flower's simulation loop scans every
            # stored message for every node (apps/in_flight.py).
            grid = InFlightWindow(grid, cfg.hierarchy.max_in_flight)
            run = prepare(grid, cfg)
            log(INFO, "ServerApp thread CPU %.2f s at start-up", time.thread_time() - started_cpu)
            (integrated if cfg.scheduling.service == "integrated" else fine_tune)(grid, run)
        except Exception as err:
            # One line the drivers (flwr_local, lab) pick out of the stream; then Flower marks
            # the run failed (`flwr ls`: finished:failed).
            log(ERROR, "RUN FAILED: %s: %s", type(err).__name__, " ".join(str(err).split()))
            raise
        finally:
            # The ServerApp's own CPU time (this thread): what the scale benchmark subtracts
            # from the simulation process's to tell Flower's loop apart from ours.
            log(INFO, "ServerApp thread CPU %.2f s", time.thread_time() - started_cpu)

    return server


app = create_server_app()
