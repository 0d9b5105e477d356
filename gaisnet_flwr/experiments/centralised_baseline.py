"""Centralised prompt tuning on the pooled cluster data: the reference HFSL is judged against.

Trains the same prompted model (same foundation, same prompts init, same optimizer and batch size)
on the union of every cluster's training split for num-rounds x local-epochs epochs, and prints
its test accuracy per epoch next to an HFSL run's per-round accuracy (metrics.json written by the
ServerApp):

    python scripts/centralised_baseline.py --clusters 4 --hfsl outputs/<run>/metrics.json
    python scripts/centralised_baseline.py --run-config "partitioning='dirichlet'" --clusters 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gaisnet_flwr.config import RunConfig, parse_overrides

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=5"')
    parser.add_argument("--clusters", type=int, default=4, help="clusters the data was split in")
    parser.add_argument("--hfsl", type=Path, help="metrics.json of an HFSL run to compare with")
    args = parser.parse_args(argv)
    from torch.utils.data import ConcatDataset

    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import cluster_datasets, edge_image_data, load_image_data
    from gaisnet_flwr.derived import data_spec, edge_shares
    from gaisnet_flwr.split.precision import resolve_device
    from gaisnet_flwr.training.loops import evaluate, train_centralised

    cfg = RunConfig.from_run_config(parse_overrides(args.run_config))
    spec = data_spec(cfg)
    data = load_image_data(spec)
    Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    if len(cfg.hierarchy.edge_domains) != 1:
        raise SystemExit("the centralised baseline compares with a single-edge HFSL run")
    edge = edge_image_data(
        data, 0, list(edge_shares(cfg.hierarchy)), cfg.hierarchy.edge_domains[0], seed=cfg.run.seed
    )
    pooled: ConcatDataset = ConcatDataset(
        [cluster_datasets(edge, c, args.clusters, spec)[0] for c in range(args.clusters)]
    )
    model = Foundation.of(cfg).load(data.num_classes)
    epochs = cfg.hierarchy.num_rounds * cfg.training.local_epochs
    accuracy = [evaluate(model, edge.test).accuracy]
    started = time.perf_counter()
    train_centralised(
        model,
        pooled,
        cfg.training,
        epochs,
        cfg.run.seed,
        on_epoch=lambda epoch, m: accuracy.append(evaluate(m, edge.test).accuracy),
    )
    print(
        f"centralised prompt tuning on {len(pooled)} pooled images of {args.clusters} clusters, "
        f"{epochs} epochs ({time.perf_counter() - started:.1f} s)"
    )
    hfsl = json.loads(args.hfsl.read_text()) if args.hfsl else []
    hfsl_acc = {row["round"]: row["accuracy"] for row in hfsl}
    print(f"{'epoch/round':>11}  {'centralised':>11}  {'HFSL':>8}")
    for epoch, acc in enumerate(accuracy):
        # HFSL round r has seen r * local-epochs epochs of every cluster's data.
        r = epoch / cfg.training.local_epochs
        h = hfsl_acc.get(int(r)) if r.is_integer() else None
        print(f"{epoch:>11}  {acc:>11.4f}  {'' if h is None else f'{h:.4f}':>8}")
    if hfsl_acc:
        gap = 100 * (accuracy[-1] - hfsl_acc[max(hfsl_acc)])
        print(
            f"final: centralised {accuracy[-1]:.4f}, HFSL {hfsl_acc[max(hfsl_acc)]:.4f}, "
            f"gap {gap:+.2f} points"
        )


if __name__ == "__main__":
    main()
