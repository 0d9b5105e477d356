"""Beyond one machine: `flwr run` puts its ClientApps on an existing Ray cluster of two nodes.

Two Ray nodes on 127.0.0.1, each with 1 CPU, a temp dir and ports of their own (`ray start
--head`, then `ray start --address=...`), and `flwr run` with RAY_ADDRESS pointing at the head:
Flower's simulation engine (`RayBackend.init_ray` -> `ray.init()`) joins that cluster instead of
starting its own, sizes its actor pool from the cluster's nodes (1 actor per CPU: one per node)
and the clusters' ClientApps run on both. The proof is the process tree: a Ray actor is a child
of its node's raylet, and while it runs a message its title is `ray::ClientAppActor.run`; the
test samples `ps` during the run and asks that actors of both raylets ran messages. Everything
started here is stopped by PID afterwards (Flower's SuperLink by its FLWR_HOME, Ray by its temp
dir), whatever other Ray clusters run on the machine. docs/running.md has the same steps for
real machines.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import flwr_run_local

pytestmark = [pytest.mark.simulation, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
flwr_local = importlib.import_module("gaisnet_flwr.experiments.flwr_local")
RAY = str(Path(sys.executable).parent / "ray")
# 2 rounds of a 2-block model, 16 images per cluster, a 1-epoch cloud foundation in tmp
TINY = (
    "depth=2 embed-dim=32 num-heads=2 peers-per-cluster=2 num-rounds=2 pretrain-epochs=1 "
    "cluster-samples=16 device='cpu'"
)


def ray_node_args(temp_dir: Path) -> list[str]:
    """Ports of this node's own (Ray's fixed defaults would meet other clusters' nodes)."""
    agent, grpc, runtime_env, metrics, manager, objects = flwr_local.free_ports(6)
    return [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
        "--disable-usage-stats",
    ]


def ours(temp_dir: Path) -> set[int]:
    """Our Ray nodes' processes: the ones whose command line names our temp dir."""
    return {p.pid for p in flwr_local.processes().values() if str(temp_dir) in p.args}


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path]]:
    # A short path: Ray's Unix sockets live under it (at most ~107 bytes per path).
    temp_dir = Path(tempfile.mkdtemp(prefix="gr-", dir="/tmp"))
    gcs, client, dashboard = flwr_local.free_ports(3)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    address = f"127.0.0.1:{gcs}"
    started: set[int] = set()
    try:
        for extra in (
            # even without the dashboard, the head starts its API server on --dashboard-port
            ["--head", f"--port={gcs}", f"--ray-client-server-port={client}",
             "--include-dashboard=false", f"--dashboard-port={dashboard}"],
            [f"--address={address}"],
        ):  # fmt: skip
            subprocess.run(
                [RAY, "start", *extra, *ray_node_args(temp_dir)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=180,
            )
            started |= ours(temp_dir)
        yield address, temp_dir
    finally:
        started |= ours(temp_dir)
        # A test cluster in a temporary folder: no orderly shutdown to wait for (a Ray node
        # outlived SIGTERM for the whole 20 s default grace, each run, before SIGKILL).
        flwr_local.stop_processes(started, timeout_s=3.0)
        left = [p for p in ours(temp_dir) if flwr_local.processes()[p].alive]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


class ActorWatch(threading.Thread):
    """Every 0.2 s: which raylet each ClientApp actor that is running a message belongs to."""

    def __init__(self, raylets: set[int]) -> None:
        super().__init__(daemon=True)
        self.raylets = raylets
        self.ran_on: dict[int, set[int]] = {}  # raylet pid -> actor pids seen running a message
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for p in flwr_local.processes().values():
                if p.args.startswith("ray::ClientAppActor.run") and p.ppid in self.raylets:
                    self.ran_on.setdefault(p.ppid, set()).add(p.pid)
            self.stop.wait(0.2)


def test_flwr_run_puts_the_clusters_on_both_nodes_of_a_ray_cluster(
    tmp_path: Path, ray_cluster: tuple[str, Path]
) -> None:
    address, temp_dir = ray_cluster
    raylets = {
        p.pid
        for p in flwr_local.processes().values()
        if "raylet" in p.args.split()[0] and str(temp_dir) in p.args
    }
    assert len(raylets) == 2, "two Ray nodes should be up"
    watch = ActorWatch(raylets)
    watch.start()
    try:
        result, _ = flwr_run_local(
            tmp_path,
            f"{TINY} foundation-dir='{tmp_path / 'foundation'}'",
            num_supernodes=6,
            extra_env={"RAY_ADDRESS": address},  # what makes Flower's ray.init() join it
        )
    finally:
        watch.stop.set()
        watch.join()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every cluster trained every round" in result.stdout
    assert set(watch.ran_on) == raylets, (
        f"ClientApps ran messages under raylets {sorted(watch.ran_on)}; "
        f"the cluster's raylets are {sorted(raylets)}"
    )
    # and the run's own processes (SuperLink, SuperExec, simulation) are gone: flwr_run_local
    # checks that none is left
