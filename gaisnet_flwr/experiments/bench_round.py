"""One HFSL round vs one round of Flower's stock FedAvg full fine-tuning, side by side.

Both rounds use the same model, foundation, partitions, epochs, batch size and optimizer:
  * HFSL: every cluster prompt-tunes over its split chain (start point -> peers -> end point)
    and uploads its tunable modules; the edge aggregates them per module.
  * stock FedAvg: every client fine-tunes every weight of the unsplit model (as in Flower's
    quickstart-pytorch) and uploads the whole model; the server runs Flower's FedAvg aggregation.
Clusters run one after another in this process (the round time is their sum plus the
aggregation), so the ratio compares the work, not Ray's scheduling. Upload bytes are Flower's
own count of the ArrayRecord each client replies with.

    python scripts/bench_round.py                      # the embedded default, 4 clusters
    python scripts/bench_round.py --run-config "depth=12 embed-dim=192 num-heads=3"
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from clients.split_client import ClusterIdentity, SplitClusterClient
from gaisnet_flwr.cloud.foundation import ensure_foundation, load_foundation
from gaisnet_flwr.config import RunConfig, parse_overrides
from gaisnet_flwr.data.images import load_image_data
from gaisnet_flwr.training.loops import train_centralised
from strategies.module_fedavg import aggregate_modules

NUM_CLASSES = 10  # the embedded digits


def hfsl_round(cfg: RunConfig, clusters: int) -> tuple[float, int, int]:
    """Seconds, upload bytes and D2D bytes of one HFSL round."""
    arrays = ArrayRecord(load_foundation(cfg, NUM_CLASSES).tunable_state())
    started = time.perf_counter()
    replies = [
        SplitClusterClient(cfg, ClusterIdentity(0, c, clusters)).train(
            arrays, ConfigRecord({"server-round": 1})
        )
        for c in range(clusters)
    ]
    current = {k: v.numpy() for k, v in arrays.items()}
    aggregate_modules(
        current,
        [
            (
                {k: v.numpy() for k, v in r.array_records["arrays"].items()},
                float(r.metric_records["metrics"]["num-examples"]),
            )  # type: ignore[arg-type]
            for r in replies
        ],
    )
    seconds = time.perf_counter() - started
    upload = sum(r.array_records["arrays"].count_bytes() for r in replies)
    d2d = sum(
        int(r.metric_records["metrics"][k])  # type: ignore[arg-type]
        for r in replies
        for k in ("d2d-bytes-fwd", "d2d-bytes-bwd")
    )
    return seconds, upload, d2d


def stock_fedavg_round(cfg: RunConfig, clusters: int) -> tuple[float, int]:
    """Seconds and upload bytes of one round of plain FedAvg fine-tuning every weight."""
    full = cfg.replace(mode="full", num_prompts=0)
    global_state = load_foundation(full, NUM_CLASSES).state_dict()
    started = time.perf_counter()
    replies = []
    for c in range(clusters):
        client = SplitClusterClient(full, ClusterIdentity(0, c, clusters))  # same partition
        model = load_foundation(full, NUM_CLASSES)
        model.load_state_dict(global_state)
        # Unsplit training of every weight: in mode "full" every parameter is tunable.
        train_centralised(model, client.train_set, full, full.local_epochs)
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(client.train_set)}),
            }
        )
        replies.append(content)
    aggregate_arrayrecords(replies, "num-examples")
    seconds = time.perf_counter() - started
    return seconds, sum(r.array_records["arrays"].count_bytes() for r in replies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="")
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = RunConfig.from_run_config(parse_overrides(args.run_config))
    ensure_foundation(cfg, load_image_data(cfg.data_spec()))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cfg.model_name} "
        f"img {cfg.img_size} depth {cfg.depth} dim {cfg.embed_dim}; {args.clusters} clusters, "
        f"{cfg.local_epochs} local epoch(s), batch {cfg.batch_size}, {cfg.peers_per_cluster} "
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
