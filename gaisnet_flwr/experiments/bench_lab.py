"""A lab's rounds with cold vs warm ClientApp processes, side by side (deploy/warm_clientapp.py).

Cold: every message runs in a fresh `flwr-clientapp` process that imports torch and timm
itself, as a plain Flower 1.42 SuperNode's does. Warm: the same processes forked from a server
that imported them once. Each turn brings a lab up for each mode in turn (the order
alternating, so that the load moves both alike), runs the same `flwr run`, and brings it down;
the figures are the run's wall time (`flwr run` to its end) and the rounds' times as the
ServerApp records them (`round-time-s` in metrics.json). The final modules of the two modes are
compared too: warm processes must not change what is computed.

    python scripts/bench_lab.py --repeats 2 --out docs/lab-warm/bench_lab.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gaisnet_flwr.contract import ROUND_TIME
from gaisnet_flwr.experiments.lab import Lab

# Small and quick (a random foundation: no pre-training), every round a training round.
RUN_CONFIG = 'foundation="none" num-rounds=3 inference-requests=0 fraction-evaluate=0.0'
MODES = ("cold", "warm")


@dataclass
class LabRun:
    mode: str
    run_s: float  # `flwr run` start to end
    round_s: list[float]  # per round, as recorded by the ServerApp
    load_1min: float
    final_modules_sha: str


def one_run(directory: Path, mode: str, clusters: int, run_config: str, app: Path) -> LabRun:
    lab = Lab(directory, clusters, peers_per_cluster=1)
    lab.warm = mode == "warm"
    load = os.getloadavg()[0]
    try:
        lab.up()
        started = time.monotonic()
        outcome = lab.run(run_config, app)
        run_s = time.monotonic() - started
    finally:
        lab.down()
    if not outcome.ok:
        raise RuntimeError(f"{mode} lab run failed: {outcome.why} (logs: {lab.logs})")
    rows = json.loads((outcome.results / "metrics.json").read_text())
    rounds = [float(r[ROUND_TIME]) for r in rows if r.get("round", 0) > 0 and ROUND_TIME in r]
    final = np.load(outcome.results / "final_tunable.npz")
    digest = hashlib.sha256(b"".join(final[k].tobytes() for k in sorted(final)))
    return LabRun(mode, round(run_s, 2), rounds, round(load, 2), digest.hexdigest()[:16])


def summary(runs: list[LabRun]) -> dict[str, Any]:
    by = {m: [r for r in runs if r.mode == m] for m in MODES}
    turns = [w.run_s / c.run_s for c, w in zip(by["cold"], by["warm"], strict=True)]
    rounds = {m: statistics.median(s for r in by[m] for s in r.round_s) for m in MODES}
    return {
        "turns": len(turns),
        "cold run s (median)": statistics.median(r.run_s for r in by["cold"]),
        "warm run s (median)": statistics.median(r.run_s for r in by["warm"]),
        "warm / cold run": statistics.median(turns),
        "warm / cold run turns min": min(turns),
        "warm / cold run turns max": max(turns),
        "cold round s (median)": rounds["cold"],
        "warm round s (median)": rounds["warm"],
        "same final modules": len({r.final_modules_sha for r in runs}) == 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gaisnet-bench-lab", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=2, help="turns (cold, warm)")
    parser.add_argument("--clusters", type=int, default=2)
    parser.add_argument("--run-config", default=RUN_CONFIG)
    parser.add_argument("--app", type=Path, default=Path("."), help="the GaisNet app folder")
    parser.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.clusters < 1:
        parser.error("--repeats and --clusters must be >= 1")

    from gaisnet_flwr.experiments.provenance import Provenance

    app = args.app.resolve()
    record = Provenance.start("python scripts/bench_lab.py " + " ".join(argv or sys.argv[1:]), app)
    runs: list[LabRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
        for r in range(args.repeats):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                run = one_run(Path(tmp) / f"{mode}-{r}", mode, args.clusters, args.run_config, app)
                runs.append(run)
                rounds = ", ".join(f"{s:.1f}" for s in run.round_s)
                print(f"{mode:<5} run {run.run_s:6.1f} s  rounds {rounds} s  load "
                      f"{run.load_1min:.1f}", flush=True)  # fmt: skip
    row = summary(runs)
    print(
        f"warm / cold: {row['warm / cold run']:.2f} of the run [turns "
        f"{row['warm / cold run turns min']:.2f}, {row['warm / cold run turns max']:.2f}]; "
        f"a round {row['cold round s (median)']:.1f} s cold, {row['warm round s (median)']:.1f} "
        f"s warm (medians); same final modules: {row['same final modules']}",
        flush=True,
    )
    if args.out is not None:
        record.run_config = {"repeats": args.repeats, "clusters": args.clusters,
                             "run-config": args.run_config}  # fmt: skip
        record.write_beside(args.out, {"summary": row, "runs": [asdict(r) for r in runs]})
    return 0 if row["same final modules"] else 1


if __name__ == "__main__":
    sys.exit(main())
