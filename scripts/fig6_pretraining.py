"""The paper's Fig. 6 on the embedded default: fine-tuning from the pre-trained foundation model
vs from a randomly initialised one, test accuracy per epoch on the same edge data.

Both runs prompt-tune (vpt-deep) the same architecture with the same prompts initialisation,
optimizer and data; only the frozen backbone differs (cloud pre-trained vs random).

    python scripts/fig6_pretraining.py --epochs 10 --out outputs/fig6.csv
    python scripts/fig6_pretraining.py --run-config "edge-domains='invert'"   # a shifted edge
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from gaisnet_flwr.cloud import ensure_foundation, load_foundation
from gaisnet_flwr.config import RunConfig, parse_overrides
from gaisnet_flwr.data import edge_image_data, load_image_data
from gaisnet_flwr.training import evaluate, train_centralised


def curve(cfg: RunConfig, epochs: int) -> list[float]:
    data = load_image_data(cfg.data_spec())
    ensure_foundation(cfg, data)
    edge = edge_image_data(data, 0, [1.0], cfg.domains()[0], seed=cfg.seed)
    model = load_foundation(cfg, data.num_classes)
    accuracy = [evaluate(model, edge.test).accuracy]
    train_centralised(
        model,
        edge.train,
        cfg,
        epochs,
        on_epoch=lambda _, m: accuracy.append(evaluate(m, edge.test).accuracy),
    )
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("outputs/fig6_pretraining.csv"))
    args = parser.parse_args()
    cfg = RunConfig.from_run_config(parse_overrides(args.run_config))
    started = time.perf_counter()
    pre = curve(cfg.replace(foundation="cloud"), args.epochs)
    rnd = curve(cfg.replace(foundation="none"), args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "pretrained", "random"])
        writer.writerows(zip(range(args.epochs + 1), pre, rnd, strict=True))
    print(
        f"edge domain {cfg.domains()[0]!r}, {cfg.mode}, {args.epochs} epochs "
        f"({time.perf_counter() - started:.0f} s); CSV: {args.out}"
    )
    print(f"{'epoch':>5}  {'pre-trained FM':>14}  {'random FM':>9}  {'gap':>6}")
    for epoch, (a, b) in enumerate(zip(pre, rnd, strict=True)):
        print(f"{epoch:>5}  {a:>14.4f}  {b:>9.4f}  {100 * (a - b):>+6.1f}")


if __name__ == "__main__":
    main()
