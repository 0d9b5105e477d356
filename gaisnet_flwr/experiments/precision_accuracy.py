"""The accuracy cost of a lower precision on the embedded default: bf16 autocast, and bf16 /
fp16 smashed data on the D2D hops, against fp32 (issue 14; target: within 0.5 points).

Each setting runs the real HFSL rounds (ServerApp, strategies, ClientApps in this process,
`experiments.common.hfsl.hfsl_rounds`) on the embedded default run-config, for every seed; the table
gives the edge's test accuracy after the last round, per seed and as the mean difference to
fp32 (paired by seed), next to the D2D bytes a round moved. On a CPU bf16 autocast is slow
(emulated): the run is small on purpose.

    python scripts/precision_accuracy.py                         # docs/precision, seeds 0-2
    python scripts/precision_accuracy.py --seeds 0 --run-config "num-rounds=2"
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Sized
from pathlib import Path
from typing import cast

from gaisnet_flwr.config import RunConfig, parse_overrides

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.

# (precision, smashed-dtype): the reference first
SETTINGS = [
    ("fp32", "fp32"),
    ("bf16", "fp32"),
    ("fp32", "bf16"),
    ("fp32", "fp16"),
    ("bf16", "bf16"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("docs/precision"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clusters", type=int, default=4, help="client clusters (4: run.sh's)")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=2"')
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.experiments.common.hfsl import hfsl_rounds
    from gaisnet_flwr.split.precision import resolve_device

    torch.set_num_threads(args.threads)
    base = RunConfig.of(
        **{k.replace("-", "_"): v for k, v in parse_overrides(args.run_config).items()}
    )
    data = load_image_data(data_spec(base))
    Foundation.of(base).ensure(data, resolve_device(base.run.device))
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for seed in args.seeds:
        for precision, smashed in SETTINGS:
            cfg = base.replace(seed=seed, precision=precision, smashed_dtype=smashed)
            started = time.perf_counter()
            run = hfsl_rounds(cfg, cfg.hierarchy.num_rounds, args.clusters)
            last = run[-1]
            rows.append(
                {
                    "seed": seed,
                    "precision": precision,
                    "smashed-dtype": smashed,
                    "rounds": last.round,
                    "accuracy": round(last.accuracy, 6),
                    "loss": round(last.loss, 6),
                    "d2d-bytes-per-round": last.d2d_forward_bytes + last.d2d_backward_bytes,
                    "wall-s": round(time.perf_counter() - started, 1),
                }
            )
            print(
                f"seed {seed} precision={precision} smashed-dtype={smashed}: accuracy "
                f"{last.accuracy:.4f}, D2D {rows[-1]['d2d-bytes-per-round']} B/round, "
                f"{rows[-1]['wall-s']} s",
                flush=True,
            )
    with (args.out / "precision_accuracy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    test_images = len(cast(Sized, data.test))
    (args.out / "report.md").write_text(report(rows, args, base, test_images))
    print((args.out / "report.md").read_text())
    return 0


def report(
    rows: list[dict[str, object]], args: argparse.Namespace, base: RunConfig, test_images: int
) -> str:
    def accuracy(seed: object, p: str, s: str) -> float:
        return float(
            next(
                r["accuracy"]  # type: ignore[arg-type]
                for r in rows
                if r["seed"] == seed and r["precision"] == p and r["smashed-dtype"] == s
            )
        )

    seeds = sorted({r["seed"] for r in rows})  # type: ignore[type-var]
    lines = [
        "# Precision and smashed-data dtype: accuracy on the embedded default",
        "",
        f"`python scripts/precision_accuracy.py --seeds {' '.join(map(str, args.seeds))} "
        f"--clusters {args.clusters}"
        + (f' --run-config "{args.run_config}"' if args.run_config else "")
        + f"` (CPU, {args.threads} torch thread(s); {base.hierarchy.num_rounds} rounds, "
        f"{args.clusters} clusters, the embedded default otherwise). Edge test accuracy after "
        f"the last round, in percent (the test set has {test_images} images: one image is "
        f"{100 / test_images:.2f} points); "
        "difference to fp32 paired by seed; the edge's mean test loss shows that every "
        "setting did change training.",
        "",
        "| precision | smashed-dtype | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | mean diff. to fp32 (min, max) | test loss, mean | D2D bytes / round |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|---|",
    ]
    for p, s in SETTINGS:
        acc = [100 * accuracy(seed, p, s) for seed in seeds]
        diff = [
            a - 100 * accuracy(seed, "fp32", "fp32") for a, seed in zip(acc, seeds, strict=True)
        ]
        loss = statistics.mean(
            float(r["loss"])  # type: ignore[arg-type]
            for r in rows
            if r["precision"] == p and r["smashed-dtype"] == s
        )
        d2d = next(
            r["d2d-bytes-per-round"]
            for r in rows
            if r["precision"] == p and r["smashed-dtype"] == s
        )
        lines.append(
            f"| {p} | {s} | "
            + " | ".join(f"{a:.2f}" for a in acc)
            + f" | {statistics.mean(acc):.2f} | {statistics.mean(diff):+.2f} "
            f"({min(diff):+.2f}, {max(diff):+.2f}) | {loss:.6f} | {d2d:,} |"
        )
    lines += ["", "CSV: [precision_accuracy.csv](precision_accuracy.csv).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
