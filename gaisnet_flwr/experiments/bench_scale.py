"""How the real app scales with the number of client clusters N: `flwr run` on Flower's
simulation engine (Ray), N = 10 ... 1000, the embedded default.

For each N this runs `flwr run . --stream` on a private managed SuperLink (FLWR_HOME and ports
of its own; stopped by PID afterwards, `experiments/flwr_local.py`) with
`num-rounds=2 inference-requests=0 fraction-evaluate=0.0 cluster-samples=K` (every cluster draws
its own K images, so a cluster's data and work are the same at every N) and prints:

  * s/round: the mean `round-time-s` of metrics.json (train messages to all N clusters,
    aggregation, the central evaluation), and s/round/cluster;
  * start-up: from `flwr run` to the ServerApp's `[ROUND 1/2]` line (SuperLink, Ray, actors,
    the foundation check, the clusters' identity query);
  * CPU seconds during the rounds (from the `[ROUND 1/..]` line to the FINAL line) by who
    spent them, from /proc of every process the SuperLink started: Flower's loop = the
    flwr-simulation process minus the ServerApp's own thread (which logs its thread CPU time),
    ours = the ServerApp thread + the Ray actors running the ClientApps (which includes Ray's
    per-message work), Ray = raylet, GCS and Ray's helpers; the Flower-loop share = Flower's
    loop / (Flower's loop + ours);
  * CPU s/round/cluster: all those CPU seconds per round and cluster, which the machine's
    load (other jobs on the same cores) distorts far less than the wall-clock times;
  * peak memory: the largest sum of resident memory over those processes, sampled every 0.5 s
    (shared pages count once per process, as `ps` counts them).

    python scripts/bench_scale.py                              # N = 10,100,300,1000
    python scripts/bench_scale.py --clusters 10,100 --max-in-flight 0   # Flower's all-at-once

Linux only (/proc). The load on the machine changes the times: the load average is printed
with each row.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gaisnet_flwr.experiments.flwr_local import (
    RunOutcome,
    private_env,
    processes,
    stop_local_superlink,
    superlink_family,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class ScaleRow:
    clusters: int
    rounds: int
    s_per_round: float
    s_per_round_per_cluster: float
    startup_s: float
    total_s: float
    peak_rss_gb: float
    cpu_flower_loop_s: float
    cpu_serverapp_s: float
    cpu_clientapps_s: float
    cpu_ray_s: float
    flower_loop_share: float
    cpu_s_per_round_per_cluster: float  # all four CPU columns / rounds / N: what load hides less
    max_in_flight: int
    cluster_samples: int
    client_cpus: int
    load_1min: float


def _proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return cpu, int(statm.split()[1]) * PAGE_BYTES


def _kind(args: str) -> str:
    if "flwr-simulation" in args:
        return "simulation"
    if args.startswith("ray::"):
        return "actor"
    if any(k in args for k in ("raylet", "gcs_server", "/ray/", "ray/_private", "dashboard")):
        return "ray"
    return "flower"  # superlink, superexec


class Sampler(threading.Thread):
    """Every `interval_s`: the CPU time of each process of the SuperLink's family (the last
    value seen per process) and the sum of their resident memory (its peak)."""

    def __init__(self, home: Path, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.home, self.interval_s = home, interval_s
        self.cpu: dict[int, tuple[str, float]] = {}
        self.peak_rss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for p in superlink_family(self.home):
                usage = _proc_usage(p.pid)
                if usage is not None:
                    self.cpu[p.pid] = (_kind(p.args), usage[0])
                    total += usage[1]
            self.peak_rss = max(self.peak_rss, total)
            self.stop.wait(self.interval_s)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, cpu in list(self.cpu.values()):
            out[kind] = out.get(kind, 0.0) + cpu
        return out


def _minus(later: dict[str, float], earlier: dict[str, float]) -> dict[str, float]:
    return {k: v - earlier.get(k, 0.0) for k, v in later.items()}


def run_one(args: argparse.Namespace, clusters: int, work: Path) -> ScaleRow:
    home = work / f"flwr-home-{clusters}"
    output = work / f"out-{clusters}"
    bindir = Path(sys.executable).parent
    env = private_env(home)
    run_config = (
        f"num-rounds={args.rounds} inference-requests=0 fraction-evaluate=0.0 "
        f"cluster-samples={args.cluster_samples} max-in-flight={args.max_in_flight} "
        f"output-dir={json.dumps(str(output))} {args.run_config}"
    )
    cmd = [
        str(bindir / "flwr"), "run", str(args.app.resolve()), "--stream",
        "--federation-config",
        f"num-supernodes={clusters} client-resources-num-cpus={args.client_cpus}",
        "--run-config", run_config,
    ]  # fmt: skip
    load = os.getloadavg()[0]
    sampler = Sampler(home)
    log_path = work / f"run-{clusters}.log"
    started = time.monotonic()
    round1 = None
    run_id = final = failure = None
    server_cpu = server_startup_cpu = 0.0
    at_round1: dict[str, float] = {}
    at_final: dict[str, float] = {}
    sampler.start()
    try:
        with (
            log_path.open("w") as log,
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                stdin=subprocess.DEVNULL,
            ) as proc,
        ):
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(f"{time.monotonic() - started:8.2f} {line}")  # when it arrived
                if round1 is None and "[ROUND 1/" in line:
                    round1 = time.monotonic() - started
                    at_round1 = sampler.by_kind()
                if m := re.search(r"Successfully started run (\d+)", line):
                    run_id = m.group(1)
                if "FINAL:" in line:
                    final = line[line.index("FINAL:") :].strip()
                    at_final = sampler.by_kind()
                if failure is None and "RUN FAILED: " in line:
                    failure = line.split("RUN FAILED: ", 1)[1].strip()
                if m := re.search(r"ServerApp thread CPU ([\d.]+) s at start-up", line):
                    server_startup_cpu = float(m.group(1))
                elif m := re.search(r"ServerApp thread CPU ([\d.]+) s", line):
                    server_cpu = float(m.group(1))
            rc = proc.wait()
        total = time.monotonic() - started
        outcome = RunOutcome(rc, run_id, "not started", final, output, log_path, failure=failure)
        outcome.check(bindir / "flwr", default_results=output, env=env)
    finally:
        sampler.stop.set()
        sampler.join()
        stop_local_superlink(home)
    if not outcome.ok:
        raise RuntimeError(f"N={clusters}: {outcome.why} (log: {log_path})")
    rows = json.loads((outcome.results / "metrics.json").read_text())[1:]
    per_round = sum(float(r["round-time-s"]) for r in rows) / len(rows)
    cpu = _minus(at_final, at_round1)  # the rounds only
    server_cpu -= server_startup_cpu
    flower = max(cpu.get("simulation", 0.0) - server_cpu, 0.0)
    ours = server_cpu + cpu.get("actor", 0.0)
    return ScaleRow(
        clusters=clusters,
        rounds=len(rows),
        s_per_round=round(per_round, 3),
        s_per_round_per_cluster=round(per_round / clusters, 5),
        startup_s=round(round1 if round1 is not None else float("nan"), 1),
        total_s=round(total, 1),
        peak_rss_gb=round(sampler.peak_rss / 2**30, 2),
        cpu_flower_loop_s=round(flower, 1),
        cpu_serverapp_s=round(server_cpu, 1),
        cpu_clientapps_s=round(cpu.get("actor", 0.0), 1),
        cpu_ray_s=round(cpu.get("ray", 0.0), 1),
        flower_loop_share=round(flower / (flower + ours), 3) if flower + ours else 0.0,
        cpu_s_per_round_per_cluster=round(
            (flower + ours + cpu.get("ray", 0.0)) / len(rows) / clusters, 5
        ),
        max_in_flight=args.max_in_flight,
        cluster_samples=args.cluster_samples,
        client_cpus=args.client_cpus,
        load_1min=round(load, 2),
    )


def write(rows: list[ScaleRow], out: Path, meta: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    out.with_suffix(".json").write_text(
        json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", default="10,100,300,1000", help="comma-separated N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cluster-samples", type=int, default=16)
    parser.add_argument("--max-in-flight", type=int, default=16)
    parser.add_argument("--client-cpus", type=int, default=1)
    parser.add_argument("--run-config", default="", help="more run-config overrides")
    parser.add_argument("--app", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, default=None, help="CSV (and .json) to write")
    parser.add_argument("--work", type=Path, default=None, help="keep logs and outputs here")
    args = parser.parse_args(argv)
    clusters = [int(n) for n in args.clusters.split(",")]
    if any(n < 1 for n in clusters):
        parser.error(f"--clusters={args.clusters!r}: every N must be >= 1")
    cols = (
        "N  s/round  s/round/cluster  start-up s  peak GB  "
        "CPU s: Flower loop / ServerApp / ClientApps / Ray  Flower share  CPU s/round/cluster  load"
    )
    print(cols, flush=True)
    rows: list[ScaleRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n in clusters:
            r = run_one(args, n, work)
            rows.append(r)
            print(
                f"{r.clusters:<4} {r.s_per_round:>7.2f}  {r.s_per_round_per_cluster:>15.4f}  "
                f"{r.startup_s:>10.1f}  {r.peak_rss_gb:>7.2f}  "
                f"{r.cpu_flower_loop_s:>8.1f} / {r.cpu_serverapp_s:.1f} / "
                f"{r.cpu_clientapps_s:.1f} / {r.cpu_ray_s:.1f}  {r.flower_loop_share:>12.3f}  "
                f"{r.cpu_s_per_round_per_cluster:>18.4f}  {r.load_1min:.2f}",
                flush=True,
            )
    if args.out is not None and rows:
        meta = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "cpus": os.cpu_count(),
            "processes-at-start": len(processes()),
        }
        write(rows, args.out, meta)
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0
