"""One HFSL round vs one round of Flower's stock FedAvg full fine-tuning, side by side.

Both rounds use the same model, foundation, partitions, epochs, batch size and optimizer, and
both are real Flower apps on the in-process grid (`gaisnet_flwr.apps.inprocess`: the nodes'
ClientApps run one after another in this process, so the ratio compares the work, not Ray's
scheduling):
  * HFSL: the GaisNet ServerApp and ClientApp: every cluster prompt-tunes over its split chain
    (start point -> peers -> end point) and uploads its tunable modules; the edge aggregates
    them per module.
  * stock FedAvg: a baseline app as in Flower's quickstart-pytorch: every client fine-tunes
    every weight of the unsplit model and uploads the whole model; Flower's `FedAvg` strategy
    aggregates.
A round's time is what the ServerApp measures from the end of the start model's central
evaluation to the end of round 1's (train messages, aggregation, central evaluation). Upload
bytes are Flower's own count of the ArrayRecord each client replies with.

    python scripts/bench_round.py                      # the embedded default, 4 clusters
    python scripts/bench_round.py --run-config "depth=12 embed-dim=192 num-heads=3"
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.inprocess import run_apps, run_inprocess, simulation_node_configs
from gaisnet_flwr.config import RunConfig, parse_overrides
from gaisnet_flwr.contract import NodeIdentity

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

NUM_CLASSES = 10  # the embedded digits
CLIENT_THREADS = 1  # torch threads per ClientApp call, both sides (flwr run's default actors)


def hfsl_round(cfg: RunConfig, clusters: int) -> tuple[float, int, int]:
    """Seconds, upload bytes and D2D bytes of one HFSL round of the GaisNet apps."""
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        settings = {
            **cfg.to_dict(),
            "num-rounds": 1,
            "inference-requests": 0,
            "fraction-evaluate": 0.0,
            "output-dir": tmp,
        }
        run = run_inprocess(settings, clusters, client_threads=CLIENT_THREADS)
    d2d = int(run.train(1, c.D2D_FWD)) + int(run.train(1, c.D2D_BWD))
    return run.round_time(1), int(run.train(1, c.UPLOAD)), d2d


def full_config(cfg: RunConfig) -> RunConfig:
    return cfg.replace(mode="full", num_prompts=0)


def stock_client_app(cfg: RunConfig) -> ClientApp:
    """Quickstart-style FedAvg client: unsplit training of every weight on its partition."""
    from clients.split_client import ClusterData, EdgeDataKey
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.derived import data_spec, edge_shares
    from gaisnet_flwr.training.loops import train_centralised

    app = ClientApp()
    full = full_config(cfg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        _, partition, clusters = NodeIdentity.from_node_config(context.node_config).place(1)
        domain, shares = full.hierarchy.edge_domains[0], edge_shares(full.hierarchy)
        edge = EdgeDataKey(data_spec(full), 0, shares, domain, None)
        train_set = ClusterData.build(edge, partition, clusters).train_set  # its partition
        model = Foundation.of(full).load(NUM_CLASSES)
        model.load_state_dict(msg.content.array_records[c.ARRAYS].to_torch_state_dict())
        # In mode "full" every parameter is tunable.
        train_centralised(
            model, train_set, full.training, full.training.local_epochs, full.run.seed
        )
        arrays = ArrayRecord(model.state_dict())
        metrics = {c.NUM_EXAMPLES: len(train_set), c.UPLOAD: arrays.count_bytes()}  # type: ignore[arg-type]
        return Message(c.reply_content(arrays, metrics), reply_to=msg)

    return app


def summed(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The clients' counters added up (FedAvg's default would average them)."""
    metrics = [r.metric_records[c.METRICS_RECORD] for r in records]
    return MetricRecord({k: sum(m[k] for m in metrics) for k in metrics[0]})  # type: ignore[misc]


def stock_server_app(cfg: RunConfig, clusters: int) -> ServerApp:
    """Flower's FedAvg over every weight; the round's time and upload go to the Context."""
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.split.precision import resolve_device
    from gaisnet_flwr.training.loops import evaluate

    app = ServerApp()
    full = full_config(cfg)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = Foundation.of(full).load(NUM_CLASSES)
        test = load_image_data(data_spec(full)).test
        evaluated: list[float] = []

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy = evaluate(model, test, device=resolve_device(full.run.device)).accuracy
            evaluated.append(time.perf_counter())
            return MetricRecord({"accuracy": accuracy})

        strategy = FedAvg(
            fraction_evaluate=0.0,
            min_train_nodes=clusters,
            min_available_nodes=clusters,
            train_metrics_aggr_fn=summed,
        )
        result = strategy.start(
            grid, ArrayRecord(model.state_dict()), num_rounds=1, evaluate_fn=central
        )
        upload = result.train_metrics_clientapp[1][c.UPLOAD]
        context.state["round"] = MetricRecord(
            {c.ROUND_TIME: evaluated[1] - evaluated[0], c.UPLOAD: upload}
        )

    return app


def stock_fedavg_round(cfg: RunConfig, clusters: int) -> tuple[float, int]:
    """Seconds and upload bytes of one round of plain FedAvg fine-tuning every weight."""
    run_config: Mapping[str, Any] = {}
    context = run_apps(
        stock_server_app(cfg, clusters),
        stock_client_app(cfg),
        run_config,
        simulation_node_configs(clusters),
        client_threads=CLIENT_THREADS,
    )
    result = context.state.metric_records["round"]
    return float(result[c.ROUND_TIME]), int(result[c.UPLOAD])  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="")
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.split.precision import resolve_device

    cfg = RunConfig.from_run_config(parse_overrides(args.run_config))
    Foundation.of(cfg).ensure(load_image_data(data_spec(cfg)), resolve_device(cfg.run.device))
    print(
        f"torch {torch.__version__}, {CLIENT_THREADS} thread(s) per client; {cfg.model.model_name} "
        f"img {cfg.model.img_size} depth {cfg.model.depth} dim {cfg.model.embed_dim}; "
        f"{args.clusters} clusters, {cfg.training.local_epochs} local epoch(s), batch "
        f"{cfg.training.batch_size}, {cfg.cluster.peers_per_cluster} "
        f"peers per cluster"
    )
    hfsl, stock = [], []
    for _ in range(args.repeats):  # interleaved, median
        hfsl.append(hfsl_round(cfg, args.clusters))
        stock.append(stock_fedavg_round(cfg, args.clusters))
    h = sorted(hfsl)[len(hfsl) // 2]
    s = sorted(stock)[len(stock) // 2]
    print(
        f"HFSL prompt tuning (split chain): round {h[0]:.2f} s, upload {h[1]:,} B, D2D {h[2]:,} B"
    )
    print(f"stock FedAvg, every weight:       round {s[0]:.2f} s, upload {s[1]:,} B")
    print(
        f"ratios HFSL / stock: round time {h[0] / s[0]:.3f}x, upload bytes {h[1] / s[1]:.4f}x "
        f"({s[1] / h[1]:.0f}x less to upload)"
    )


if __name__ == "__main__":
    main()
