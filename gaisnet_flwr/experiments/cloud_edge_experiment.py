"""Does cloud aggregation help a data-poor edge? The real ServerApp and ClientApps, run in
process (`gaisnet_flwr.apps.inprocess`) twice with the same seed: cloud-edge aggregation every
round vs every edge trained in isolation (cloud-every=0). Prints each edge's final accuracy.

    python scripts/cloud_edge_experiment.py \
        --run-config "edge-domains='invert,invert,invert' edge-shares='1,1,0.1' num-rounds=5" \
        --clusters 6
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.config import RunConfig, parse_overrides

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.


def run(overrides: dict, clusters: int, output_dir: Path) -> list[dict]:
    return run_inprocess({**overrides, "output-dir": str(output_dir)}, clusters).metrics()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-config",
        default="edge-domains='invert,invert,invert' edge-shares='1,1,0.1' num-rounds=5",
    )
    parser.add_argument("--clusters", type=int, default=6)
    args = parser.parse_args(argv)
    from gaisnet_flwr.derived import edge_shares

    overrides = parse_overrides(args.run_config)
    cfg = RunConfig.from_run_config(overrides)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, every in (("cloud-edge", overrides.get("cloud-every", 1) or 1), ("isolated", 0)):
            started = time.perf_counter()
            rows = run({**overrides, "cloud-every": every}, args.clusters, Path(tmp) / label)
            results[label] = (rows, time.perf_counter() - started)
    print(
        f"\n{args.clusters} clusters over edges {cfg.hierarchy.edge_domains} with shares "
        f"{list(edge_shares(cfg.hierarchy))}, {cfg.hierarchy.num_rounds} rounds, cloud mix "
        f"{cfg.hierarchy.cloud_mix}, cloud modules {cfg.hierarchy.cloud_modules}"
    )
    print(
        f"{'edge':>6}  {'domain':>8}  {'share':>5}  {'start':>6}  {'cloud-edge':>10}  "
        f"{'isolated':>8}"
    )
    for e, (domain, share) in enumerate(
        zip(cfg.hierarchy.edge_domains, list(edge_shares(cfg.hierarchy)), strict=True)
    ):
        key = f"edge{e}/accuracy"
        start = results["isolated"][0][0][key]
        with_cloud = results["cloud-edge"][0][-1][key]
        alone = results["isolated"][0][-1][key]
        print(f"{e:>6}  {domain:>8}  {share:>5}  {start:>6.4f}  {with_cloud:>10.4f}  {alone:>8.4f}")
    for label, (_, seconds) in results.items():
        print(f"{label}: {seconds:.0f} s")


if __name__ == "__main__":
    main()
