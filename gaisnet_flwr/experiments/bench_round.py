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
On equal footing: both ClientApps keep what does not change within a run per process (their
partition's data, the model) and both ServerApps run at the same torch threads (run-config
server-threads). A round's time is what the ServerApp measures from the end of the start
model's central evaluation to the end of round 1's (train messages, aggregation, central
evaluation); per epoch is that over local-epochs. Pairs take turns (the order alternating)
after --warmup pairs that are not counted; the ratio is the median of the pairs' ratios with
their range. Upload bytes are Flower's own count of the ArrayRecord each client replies with.

    python scripts/bench_round.py                      # the embedded default, 4 clusters
    python scripts/bench_round.py --vit-b16 --clusters 2   # ViT-B/16 architecture, random weights
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
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


def hfsl_round(cfg: RunConfig, clusters: int) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds, upload bytes and D2D bytes of one HFSL round of the GaisNet
    apps."""
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
    return run.round_time(1), run.round_cpu(1), int(run.train(1, c.UPLOAD)), d2d


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
    # What does not change within a run is built once per process, as the GaisNet ClientApp
    # does (apps/cluster_node.py: ClientCache): each partition's data and the model (its
    # weights are the message's). Without it a stock round rebuilt its data and re-read the
    # checkpoint per message (~44 % of its time), and the ratio compared unlike things.
    data: dict[tuple[int, int], Any] = {}
    models: list[Any] = []

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        _, partition, clusters = NodeIdentity.from_node_config(context.node_config).place(1)
        if (partition, clusters) not in data:
            domain, shares = full.hierarchy.edge_domains[0], edge_shares(full.hierarchy)
            edge = EdgeDataKey(data_spec(full), 0, shares, domain, None)
            data[partition, clusters] = ClusterData.build(edge, partition, clusters).train_set
        train_set = data[partition, clusters]  # its partition
        if not models:
            models.append(Foundation.of(full).load(NUM_CLASSES))
        model = models[0]
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
    from gaisnet_flwr.split.precision import resolve_device, torch_threads
    from gaisnet_flwr.training.loops import evaluate

    app = ServerApp()
    full = full_config(cfg)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # the server's threads as the GaisNet ServerApp sets them (run-config server-threads)
        with torch_threads(full.run.server_threads or None):
            serve(grid, context)

    def serve(grid: Grid, context: Context) -> None:
        model = Foundation.of(full).load(NUM_CLASSES)
        test = load_image_data(data_spec(full)).test
        evaluated: list[tuple[float, float]] = []

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy = evaluate(model, test, device=resolve_device(full.run.device)).accuracy
            evaluated.append((time.perf_counter(), time.process_time()))
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
        (wall0, cpu0), (wall1, cpu1) = evaluated
        context.state["round"] = MetricRecord(
            {c.ROUND_TIME: wall1 - wall0, c.ROUND_CPU: cpu1 - cpu0, c.UPLOAD: upload}
        )

    return app


def stock_fedavg_round(cfg: RunConfig, clusters: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and upload bytes of one round of plain FedAvg fine-tuning
    every weight."""
    run_config: Mapping[str, Any] = {}
    context = run_apps(
        stock_server_app(cfg, clusters),
        stock_client_app(cfg),
        run_config,
        simulation_node_configs(clusters),
        client_threads=CLIENT_THREADS,
    )
    result = context.state.metric_records["round"]
    wall, cpu = float(result[c.ROUND_TIME]), float(result[c.ROUND_CPU])  # type: ignore[arg-type]
    return wall, cpu, int(result[c.UPLOAD])  # type: ignore[arg-type]


# ViT-B/16's architecture (the paper's model) with random weights, on a little data: where the
# paper's claim lives (prompts add ~5 % tokens; the backbone needs no weight gradients).
VIT_B16 = (
    "model-name='vit_base_patch16_224' img-size=224 patch-size=16 depth=12 embed-dim=768 "
    "num-heads=12 foundation='none' optimizer='adamw' lr=0.001 batch-size=4 cluster-samples=10"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="", help="run-config keys for both sides")
    parser.add_argument(
        "--vit-b16", action="store_true",
        help=f"ViT-B/16 architecture, random weights, small data ({VIT_B16}); "
        "--run-config adds to it",
    )  # fmt: skip
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved pairs")
    parser.add_argument(
        "--warmup", type=int, default=1,
        help="pairs run first and not counted (the first round of a process pays its imports "
        "and caches)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the pairs as JSON here")
    args = parser.parse_args(argv)
    if args.clusters < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--clusters and --repeats must be >= 1, --warmup >= 0")
    import torch

    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.experiments.provenance import Provenance
    from gaisnet_flwr.split.precision import resolve_device

    overrides = f"{VIT_B16 if args.vit_b16 else ''} {args.run_config}".strip()
    cfg = RunConfig.from_run_config(parse_overrides(overrides))
    given = sys.argv[1:] if argv is None else argv
    record = Provenance.start(shlex.join(["python", "scripts/bench_round.py", *given]), Path("."))
    Foundation.of(cfg).ensure(load_image_data(data_spec(cfg)), resolve_device(cfg.run.device))
    epochs = cfg.training.local_epochs
    print(
        f"torch {torch.__version__}, {CLIENT_THREADS} thread(s) per client; {cfg.model.model_name} "
        f"img {cfg.model.img_size} depth {cfg.model.depth} dim {cfg.model.embed_dim}; "
        f"{args.clusters} clusters, {epochs} local epoch(s), batch "
        f"{cfg.training.batch_size}, {cfg.cluster.peers_per_cluster} peers per cluster; "
        f"both ClientApps cache their data and model per process",
        flush=True,
    )
    for _ in range(args.warmup):
        hfsl_round(cfg, args.clusters), stock_fedavg_round(cfg, args.clusters)
    pairs = []
    for r in range(args.repeats):  # interleaved, the order alternating: the load moves both
        first, second = (hfsl_round, stock_fedavg_round)[:: 1 if r % 2 == 0 else -1]
        done: dict[Any, tuple[Any, ...]] = {f: f(cfg, args.clusters) for f in (first, second)}
        h, s = done[hfsl_round], done[stock_fedavg_round]
        pair = {"hfsl s": h[0], "stock s": s[0], "hfsl cpu s": h[1], "stock cpu s": s[1],
                "wall ratio": h[0] / s[0], "cpu ratio": h[1] / s[1],
                "hfsl upload B": h[2], "stock upload B": s[2], "d2d B": h[3],
                "load": round(os.getloadavg()[0], 2)}  # fmt: skip
        pairs.append(pair)
        print(
            f"pair {r + 1}: HFSL {h[0]:.2f} s ({h[1]:.2f} s CPU), stock {s[0]:.2f} s "
            f"({s[1]:.2f} s CPU); ratio {pair['wall ratio']:.3f} wall, {pair['cpu ratio']:.3f} "
            f"CPU (load {pair['load']:.1f})",
            flush=True,
        )
    summary: dict[str, float] = {"local epochs": epochs, "pairs": len(pairs)}
    for kind in ("cpu", "wall"):
        ratios = sorted(p[f"{kind} ratio"] for p in pairs)
        summary |= {f"{kind} ratio median": statistics.median(ratios),
                    f"{kind} ratio min": ratios[0], f"{kind} ratio max": ratios[-1]}  # fmt: skip
    for side in ("hfsl", "stock"):
        for unit in ("s", "cpu s"):
            summary[f"{side} {unit} median"] = statistics.median(p[f"{side} {unit}"] for p in pairs)
    up_h, up_s, d2d = pairs[0]["hfsl upload B"], pairs[0]["stock upload B"], pairs[0]["d2d B"]
    for side, name in (
        ("hfsl", "HFSL prompt tuning (split chain)"),
        ("stock", "stock FedAvg, every weight"),
    ):
        cpu = summary[f"{side} cpu s median"]
        print(f"{name + ':':34} round {summary[f'{side} s median']:.2f} s wall, {cpu:.2f} s CPU "
              f"({cpu / epochs:.2f} s CPU per epoch)")  # fmt: skip
    print(
        f"ratios HFSL / stock, per round and per epoch ({epochs} a round): CPU "
        f"{summary['cpu ratio median']:.3f}x [pairs {summary['cpu ratio min']:.3f}, "
        f"{summary['cpu ratio max']:.3f}], wall {summary['wall ratio median']:.3f}x "
        f"[{summary['wall ratio min']:.3f}, {summary['wall ratio max']:.3f}]; upload bytes "
        f"{up_h / up_s:.4f}x ({up_s / up_h:.0f}x less to upload), D2D {d2d:,} B"
    )
    if args.out is not None:
        record.run_config = {
            "run-config": overrides, "clusters": args.clusters, "warmup pairs": args.warmup,
        }  # fmt: skip
        record.write_beside(args.out, {"summary": summary, "pairs": pairs})


if __name__ == "__main__":
    main()
