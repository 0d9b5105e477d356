"""`flwr run` for real: the CLI, a managed local SuperLink, the simulation engine, the app.

Goes through `scripts/flwr_local.py run` (what `scripts/run.sh` runs) with this interpreter's
Flower, a private FLWR_HOME and free ports, so it neither reuses nor disturbs any other
SuperLink. Afterwards no process this test started may be left: the managed SuperLink outlives
`flwr run` by design, so this is where a cleanup bug shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.simulation, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _load_flwr_local() -> ModuleType:
    return importlib.import_module("gaisnet_flwr.experiments.flwr_local")


flwr_local = _load_flwr_local()


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def started_by(home: Path, ports: list[int]) -> list[str]:
    """Live Flower/Ray processes that belong to this test's SuperLink: by command line (home,
    ports) or, on Linux, by the FLWR_HOME they inherited (Ray workers name neither)."""
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


def flwr_run(tmp_path: Path, run_config: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    home = tmp_path / "flwr-home"
    ports = free_ports(2)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
        "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
    }
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "flwr_local.py"),
        "run",
        "--app", str(REPO),
        "--output-dir", str(out),
        "--num-supernodes", "2",
        "--", "--run-config", run_config,
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


def tiny(tmp_path: Path, **extra: str) -> str:
    # 1 round of a 2-block model; the 1-epoch cloud foundation goes to tmp, not ~/.cache.
    foundation_dir = json.dumps(str(tmp_path / "foundation"))
    settings = {
        "depth": "2",
        "embed-dim": "32",
        "num-heads": "2",
        "peers-per-cluster": "2",
        "num-rounds": "1",
        "pretrain-epochs": "1",
        "foundation-dir": foundation_dir,
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in settings.items())


def test_flwr_run_completes_and_cleans_up(tmp_path: Path) -> None:
    result, out = flwr_run(tmp_path, tiny(tmp_path))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "FINAL: central test accuracy" in result.stdout, log[-4000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in rows] == [0, 1]
    assert rows[1]["train/num-clusters"] == 2
    assert (out / "final_tunable.npz").is_file()
    assert "FINAL:" in (out / "run.log").read_text()  # the stream is teed to the log


def test_a_failed_run_is_reported_as_a_failure(tmp_path: Path) -> None:
    # Flower accepts the value (a string), the ServerApp refuses it: `flwr run --stream` still
    # exits 0, so only the wrapper's checks can turn this into a non-zero exit.
    result, _ = flwr_run(tmp_path, tiny(tmp_path, mode="'bogus'"))
    assert result.returncode != 0
    assert "RUN FAILED" in result.stderr
    assert "status is 'finished:failed'" in result.stderr, result.stderr[-2000:]
