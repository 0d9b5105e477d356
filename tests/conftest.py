"""Shared fixtures and helpers: tiny ViTs that run in milliseconds on a CPU (timm shape
overrides), Flower reply messages, the task identity Flower's runtime sets, and the real apps
on Flower's simulation engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict

from gaisnet_flwr.apps.inprocess import task_identity as flower_task_identity
from gaisnet_flwr.contract import ClusterTask

# A 32x32 input, 8x8 patches -> 16 patch tokens; depth 6 so plans over 1-6 peers exist.
TINY = dict(img_size=32, patch_size=8, depth=6, embed_dim=32, num_heads=2)
# A whole run in seconds: the apps on a tiny random-backbone ViT, 2 edges (the digits and their
# inverted domain), no inference requests.
TINY_RUN: dict[str, Any] = {
    "depth": 2,
    "embed-dim": 32,
    "num-heads": 2,
    "peers-per-cluster": 2,
    "batch-size": 64,
    "foundation": "none",
    "inference-requests": 0,
    "device": "cpu",
    "edge-domains": "none,invert",
}

# The prefix-token / pooling layouts a PromptedViT must handle exactly (tests/test_exactness.py
# covers more timm families).
VARIANTS = {
    "cls-token": ("vit_tiny_patch16_224", {}),
    "avg-pool": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, fc_norm=True)),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    "map-pool": ("vit_base_patch16_siglip_224", {}),  # SigLIP: no prefix, attention pool
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch at one thread for a whole module: tiny tensors gain nothing from threads, and on a
    loaded 2-core machine OpenMP's spinning threads made tests ~100x slower (test_costs: 1.3 s
    vs 0.016 s per segment measurement). Request it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Set the task identity Flower's runtime sets before a ServerApp builds messages (through
    the one adapter of Flower internals, `apps.inprocess.task_identity`).

    A module that builds messages outside a runtime requests it for all its tests with
    `pytestmark = pytest.mark.usefixtures("task_identity")`.
    """
    with flower_task_identity(run_id=1, node_id=1):
        yield


def make_reply(
    arrays: Mapping[str, np.ndarray],
    num_examples: int,
    partition_id: int,
    *,
    node_id: int | None = None,
    metrics: Mapping[str, int | float] | None = None,
) -> Message:
    """A real reply Message from cluster `partition_id` to a ``train`` instruction."""
    instruction = Message(
        RecordDict(),
        dst_node_id=node_id if node_id is not None else 100 + partition_id,
        message_type=MessageType.TRAIN,
    )
    metric_values: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": num_examples,
        "partition-id": partition_id,
        "train-loss": 0.5 + partition_id,
    }
    metric_values.update(metrics or {})
    content = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(value) for key, value in arrays.items()}),
            "metrics": MetricRecord(metric_values),
        }
    )
    return Message(content, reply_to=instruction)


def make_task(edge: int = 0, partition: int = 0, num_partitions: int = 1) -> ClusterTask:
    """A cluster task as the ServerApp builds one: the preset devices and links of a cluster of
    one peer over one block, with made-up FLOPs and memory (strategies only carry it)."""
    from gaisnet_flwr.costs.profiles import ClusterProfile, load_profiles
    from gaisnet_flwr.split.plan import SplitPlan

    devices = ["phone-mid", "phone-high", "phone-mid"]
    profile = ClusterProfile.from_names(load_profiles(), devices, "d2d-50m", "uplink-1mhz")
    plan = SplitPlan.from_sizes([1])
    flops = ((1, 0), (2, 2), (1, 1))
    return ClusterTask(
        edge,
        "none",
        (1.0,) * (edge + 1),
        partition,
        num_partitions,
        partition,
        plan,
        profile,
        flops,
        (1, 2, 3),
    )


def cluster_client(run_config: Mapping[str, Any], partition: int = 0, clusters: int = 2) -> Any:
    """The split client of cluster `partition` of `clusters` on edge 0, with the task the
    ServerApp would send it (its preparation's `TaskBuilder` over `derived.derive`)."""
    from clients.split_client import ClusterData, EdgeDataKey, SplitClusterClient
    from gaisnet_flwr.apps.server_app import TaskBuilder
    from gaisnet_flwr.cloud.foundation import Foundation
    from gaisnet_flwr.config import RunConfig
    from gaisnet_flwr.derived import derive

    derived = derive(RunConfig.from_run_config(run_config))
    assert derived.plan is not None
    task = TaskBuilder(derived).task(
        (0, partition, clusters), partition, derived.plan, derived.cluster
    )
    data = ClusterData.build(EdgeDataKey.of(derived.spec, task, None), partition, clusters)
    model = Foundation.of(derived.cfg).load(data.data.num_classes)
    return SplitClusterClient(derived.cfg, task, data, model)


def edge_servers(node_edges: Mapping[int, int], make_strategy: Any) -> dict[int, Any]:
    """One EdgeServer per edge over its nodes (node id -> edge id), each with the strategy
    `make_strategy(num_clusters)` builds."""
    from strategies.edge import EdgeServer

    servers = {}
    for edge in sorted(set(node_edges.values())):
        nodes = sorted(n for n, e in node_edges.items() if e == edge)
        tasks = {n: make_task(edge, k, len(nodes)) for k, n in enumerate(nodes)}
        servers[edge] = EdgeServer(edge, make_strategy(len(nodes)), tasks)
    return servers


def make_error_reply(partition_id: int) -> Message:
    """A reply carrying an error, as a failed ClientApp sends."""
    instruction = Message(
        RecordDict(), dst_node_id=100 + partition_id, message_type=MessageType.TRAIN
    )
    return Message(Error(code=0, reason="cluster chain broke"), reply_to=instruction)


def run_simulated(config: dict[str, Any], num_clusters: int) -> None:
    """The real apps on Flower's simulation engine, one node per cluster."""
    # Imported here: only the simulation tests pay for the apps and Ray.
    from flwr.simulation import run_simulation

    from gaisnet_flwr.apps.client_app import create_client_app
    from gaisnet_flwr.apps.server_app import create_server_app

    # run_simulation passes no run-config: the apps fall back to `config`.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        # A Ray of its own: without RAY_ADDRESS, ray.init() joins the newest `ray start` cluster
        # on the machine (another test's or session's).
        mp.setenv("RAY_ADDRESS", os.environ.get("RAY_ADDRESS") or "local")
        run_simulation(
            server_app=create_server_app(config),
            client_app=create_client_app(config),
            num_supernodes=num_clusters,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )


def started_by(home: Any, ports: list[int]) -> list[str]:
    """Live Flower/Ray processes that belong to a test's SuperLink: by command line (home,
    ports) or, on Linux, by the FLWR_HOME they inherited (Ray workers name neither)."""
    from pathlib import Path

    from gaisnet_flwr.experiments import flwr_local

    needles = [str(home), *(f":{p}" for p in ports)]
    marker = f"FLWR_HOME={home}\0".encode()
    found = []
    for p in flwr_local.processes().values():
        if not p.alive or not any(name in p.args for name in (*flwr_local.FLOWER_AND_RAY, "/ray/")):
            continue
        try:
            inherited = marker in Path(f"/proc/{p.pid}/environ").read_bytes()
        except OSError:  # not Linux, or already gone
            inherited = False
        if inherited or any(n in p.args for n in needles):
            found.append(f"{p.pid} {p.args[:100]}")
    return found


def flwr_run_local(
    tmp_path: Any,
    run_config: str | list[str],
    num_supernodes: int = 2,
    extra_env: dict[str, str] | None = None,
    wrapper_args: tuple[str, ...] = (),
) -> tuple[Any, Any]:
    """A real `flwr run` of this app on a private managed SuperLink (own FLWR_HOME and ports),
    through scripts/flwr_local.py, which stops the SuperLink and Ray afterwards; fails if any
    process of it is left running. Returns the finished process and the run's output-dir."""
    import subprocess
    import sys
    from pathlib import Path

    from gaisnet_flwr.experiments import flwr_local

    repo = Path(__file__).resolve().parents[1]
    home, out = Path(tmp_path) / "flwr-home", Path(tmp_path) / "out"
    ports = flwr_local.free_ports(2)
    env = {
        "RAY_ADDRESS": "local",  # a Ray of its own unless the caller names a cluster
        **os.environ,
        **(extra_env or {}),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
        "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
    }
    cmd = [
        sys.executable, str(repo / "scripts" / "flwr_local.py"), "run", "--app", str(repo),
        "--output-dir", str(out), "--num-supernodes", str(num_supernodes), *wrapper_args, "--",
        # each a preset file or key=value items, merged in order as scripts/run.sh does
        *(a for value in ([run_config] if isinstance(run_config, str) else run_config)
          for a in ("--run-config", value)),
    ]  # fmt: skip
    try:
        result = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
        )
    finally:
        flwr_local.stop_local_superlink(home)  # a no-op unless the wrapper itself died
    left = started_by(home, ports)
    assert not left, f"processes left running after `flwr run`: {left}"
    return result, out


def python_json(code: str, *args: str, env: Mapping[str, str] | None = None) -> Any:
    """Run `code` in a fresh interpreter (the repository as its working directory) and return
    the JSON its last output line holds; a failure shows its stderr. The timeout is generous:
    a loaded CI machine is slow, and nothing here is timed."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=None if env is None else dict(env),
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
