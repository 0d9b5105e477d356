"""`flwr run` start-up: the GaisNet app vs a Flower app that does nothing, side by side.

Three apps take turns: ours; the no-op, Flower's floor; and the timm floor, the no-op whose
ServerApp and ClientApp modules also `import timm` (with torch and torchvision) as any app that
runs a timm model in both must. On a small machine the third is the honest floor: those imports
cost about 3.5 s of CPU per process (`python -X importtime -c "import timm"`), paid by the
simulation process and by every Ray actor.

All run as a user runs them: `flwr run APP --stream` on a private managed SuperLink (its own
FLWR_HOME and ports, stopped by PID afterwards: `experiments/flwr_local.py`), on Flower's Ray
simulation with N SuperNodes and one CPU per ClientApp, no runtime environment built
(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION). The no-op app is Flower's floor: FedAvg over one
4-float array, a ClientApp that echoes it (docs/running.md, "Flower's and Ray's floor"); ours is
the default run (`num-rounds=1 inference-requests=0`), its foundation checkpoint made before
the timing starts.

The figure is the time from starting `flwr run` to the line Flower's `Strategy.start` logs
when round 1's train replies are in (`aggregate_train: Received ...`): the SuperLink, the
simulation process, Ray and its actors, and for ours the ServerApp's preparation (config,
identity query, data, foundation, the initial model's evaluation) and one round of training.
The two apps take turns (the order alternating), so that the load moves both alike; each run's
load average is printed with it. Times are as the log stream delivers the lines: it is polled
every 0.5 s (Flower's LOG_STREAM_INTERVAL), the same for both apps. For ours, where the time
goes: the stream times of the ServerApp's milestones.

    python scripts/bench_startup.py                              # N = 4 and 100, 3 turns each
    python scripts/bench_startup.py --clusters 4 --repeats 5 --out docs/startup/bench_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gaisnet_flwr.experiments.flwr_local import private_env, stop_local_superlink

NOOP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "noop"
version = "0.1.0"
dependencies = ["flwr[simulation]"]

[tool.hatch.build.targets.wheel]
packages = ["noop"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "noop.server:app"
clientapp = "noop.client:app"

[tool.flwr.app.config]
"""
NOOP_SERVER = """\
{imports}import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    FedAvg(fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]), num_rounds=1
    )
"""
NOOP_CLIENT = """\
{imports}from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = {"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}
    return Message(RecordDict(content), reply_to=msg)
"""

# The line `Strategy.start` logs once a round's train replies are in (flwr 1.42).
REPLIES_IN = "aggregate_train: Received"
# Where ours spends its start-up: the first stream line matching each pattern.
MILESTONES = {
    "simulation started": "Starting Flower Simulation",
    "config checked, identities in, data and model ready": "GaisNet HFSL:",
    "initial model evaluated": r"\[round 0/",
    "round 1 sent": r"\[ROUND 1/",
    "round 1 replies in": REPLIES_IN,
}


# What the timm floor's two modules import besides the no-op's.
TIMM_IMPORTS = "import timm  # noqa: F401  (torch and torchvision with it)\n"


def write_noop_app(directory: Path, imports: str = "") -> Path:
    """The no-op Flower app as a folder `flwr run` takes; `imports` (source lines) go at the top
    of its ServerApp and ClientApp modules."""
    (directory / "noop").mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(NOOP_PYPROJECT)
    (directory / "noop" / "__init__.py").write_text("")
    (directory / "noop" / "server.py").write_text(NOOP_SERVER.replace("{imports}", imports))
    (directory / "noop" / "client.py").write_text(NOOP_CLIENT.replace("{imports}", imports))
    return directory


@dataclass
class StartupRun:
    app: str  # one of APPS
    clusters: int
    seconds: float  # `flwr run` to round 1's train replies in (nan: never)
    load_1min: float
    milestones: dict[str, float] = field(default_factory=dict)


def time_one(app: Path, name: str, clusters: int, run_config: str, work: Path) -> StartupRun:
    """One `flwr run` of `app`, timed to round 1's replies; stopped there."""
    home = work / f"flwr-home-{name}-{clusters}-{time.monotonic_ns()}"
    env = private_env(home)
    cmd = [
        str(Path(sys.executable).parent / "flwr"), "run", str(app), "--stream",
        "--federation-config", f"num-supernodes={clusters} client-resources-num-cpus=1",
    ]  # fmt: skip
    if run_config:
        cmd += ["--run-config", run_config]
    load = os.getloadavg()[0]
    marks: dict[str, float] = {}
    log_path = work / f"{home.name}.log"
    started = time.monotonic()
    try:
        with (
            log_path.open("w") as log,
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                stdin=subprocess.DEVNULL,
            ) as proc,
        ):  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                now = time.monotonic() - started
                log.write(f"{now:8.2f} {line}")
                for label, pattern in MILESTONES.items():
                    if label not in marks and re.search(pattern, line):
                        marks[label] = round(now, 2)
                if REPLIES_IN in line or "RUN FAILED" in line:
                    break
            proc.terminate()  # the rest of the run is not start-up
    finally:
        stop_local_superlink(home)
    seconds = marks.get("round 1 replies in", float("nan"))
    if seconds != seconds:
        raise RuntimeError(
            f"{name} N={clusters}: round 1's replies never came in (log: {log_path})"
        )
    return StartupRun(name, clusters, seconds, round(load, 2), marks)


APPS = ("gaisnet", "no-op", "timm floor")


def summary(runs: list[StartupRun], clusters: int) -> dict[str, Any]:
    """Medians per app; ours / the no-op and ours / the timm floor as the ratio of medians with
    the spread of the turns' ratios (each turn runs all three, so a ratio pairs runs made at
    nearly the same load)."""
    times = {a: [r.seconds for r in runs if r.app == a and r.clusters == clusters] for a in APPS}
    row: dict[str, Any] = {"clusters": clusters, "turns": len(times["gaisnet"])}
    for app in APPS:
        row[f"{app} s (median)"] = statistics.median(times[app])
    for key, (num, den) in {
        "ours / no-op": ("gaisnet", "no-op"),
        "ours / timm floor": ("gaisnet", "timm floor"),
        "timm floor / no-op": ("timm floor", "no-op"),
    }.items():
        turns = [a / b for a, b in zip(times[num], times[den], strict=True)]
        row[key] = statistics.median(times[num]) / statistics.median(times[den])
        row[f"{key} turns min"] = min(turns)
        row[f"{key} turns max"] = max(turns)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gaisnet-bench-startup", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--clusters", default="4,100", help="comma-separated N (SuperNodes)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="turns (ours, no-op, timm floor) per N"
    )
    parser.add_argument("--app", type=Path, default=Path("."), help="the GaisNet app folder")
    parser.add_argument("--run-config", default="", help="more run-config for ours")
    parser.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    parser.add_argument("--work", type=Path, default=None, help="keep the logs here")
    args = parser.parse_args(argv)
    clusters = [int(n) for n in args.clusters.split(",")]
    if any(n < 1 for n in clusters) or args.repeats < 1:
        parser.error("every N and --repeats must be >= 1")

    from gaisnet_flwr.experiments.provenance import Provenance

    app = args.app.resolve()
    record = Provenance.start(
        "python scripts/bench_startup.py " + " ".join(argv or sys.argv[1:]), app
    )
    ours_config = f"num-rounds=1 inference-requests=0 {args.run_config}".strip()
    ensure_foundation(app, ours_config)
    runs: list[StartupRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        noop = write_noop_app(work / "noop-app")
        timm_floor = write_noop_app(work / "timm-floor-app", TIMM_IMPORTS)
        results = work / "results"
        ours_config += f" output-dir={json.dumps(str(results))}"
        header = f"{'app':<10} {'N':>4} {'s to round 1 replies':>21}  load  milestones (s)"
        print(header, flush=True)
        for n in clusters:
            for r in range(args.repeats):
                turn = [("gaisnet", app, ours_config), ("no-op", noop, ""),
                        ("timm floor", timm_floor, "")]  # fmt: skip
                shift = r % len(turn)  # each app goes first in turn: the load moves all alike
                for name, folder, config in turn[shift:] + turn[:shift]:
                    run = time_one(folder, name, n, config, work)
                    runs.append(run)
                    marks = ", ".join(f"{k} {v:.1f}" for k, v in run.milestones.items())
                    print(
                        f"{run.app:<10} {n:>4} {run.seconds:>21.1f}  {run.load_1min:.1f}  {marks}",
                        flush=True,
                    )
    rows = [summary(runs, n) for n in clusters]
    for s in rows:
        medians = ", ".join(f"{a} {s[f'{a} s (median)']:.1f} s" for a in APPS)
        ratios = "; ".join(
            f"{k} {s[k]:.2f} [turns {s[f'{k} turns min']:.2f}, {s[f'{k} turns max']:.2f}]"
            for k in ("ours / no-op", "ours / timm floor", "timm floor / no-op")
        )
        print(f"N = {s['clusters']} (medians of {s['turns']}): {medians}; {ratios}", flush=True)
    if args.out is not None:
        record.run_config = {"clusters": clusters, "repeats": args.repeats, "ours": ours_config}
        record.write_beside(args.out, {"summary": rows, "runs": [asdict(r) for r in runs]})
    return 0


def ensure_foundation(app: Path, run_config: str) -> None:
    """Our default foundation checkpoint, made now if missing: start-up, not pre-training."""
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.config import RunConfig, parse_overrides
    from gaisnet_flwr.data.images import load_image_data
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.experiments.flwr_local import app_run_config
    from gaisnet_flwr.split.precision import resolve_device

    cfg = RunConfig.from_run_config({**app_run_config(app), **parse_overrides(run_config)})
    Foundation.of(cfg).ensure(load_image_data(data_spec(cfg)), resolve_device(cfg.run.device))


if __name__ == "__main__":
    sys.exit(main())
