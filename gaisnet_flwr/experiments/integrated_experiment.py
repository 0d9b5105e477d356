"""Integrated fine-tuning and inference (paper Fig. 8 / Table V on real models): the real
ServerApp and ClientApps in process (`gaisnet_flwr.apps.inprocess`), once per policy with the
same seed and demand; prints each policy's decisions and cumulative profit.

    python scripts/integrated_experiment.py --clusters 4 \
        --run-config "edge-domains='none,invert' demand='1,1,1,1,1,1,0,1'"
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.config import parse_overrides
from gaisnet_flwr.contract import CUMULATIVE_PROFIT
from gaisnet_flwr.service.scheduler import POLICIES, SERVE, Action


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-config", default="edge-domains='none,invert' demand='1,1,1,1,1,1,0,1'"
    )
    parser.add_argument("--clusters", type=int, default=4)
    args = parser.parse_args(argv)
    overrides = {**parse_overrides(args.run_config), "service": "integrated"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in POLICIES:
            cfg = {**overrides, "policy": policy, "output-dir": str(Path(tmp) / policy)}
            started = time.perf_counter()
            rows = run_inprocess(cfg, args.clusters).integrated()
            results[policy] = (rows, time.perf_counter() - started)
    print(f"\ndemand (edge per round): {overrides['demand']}, edges {overrides['edge-domains']}")
    for policy, (rows, seconds) in results.items():
        actions = " ".join(
            SERVE if (edge := Action(r["action"]).edge) is None else f"ft{edge}" for r in rows
        )
        print(
            f"{policy:>5}: cumulative profit {rows[-1][CUMULATIVE_PROFIT]:8.1f} | {actions} "
            f"| final accuracy {rows[-1]['accuracy']} ({seconds:.0f} s)"
        )


if __name__ == "__main__":
    main()
