"""Warm ClientApp processes (deploy/warm_clientapp.py): the shim hands Flower's `flwr-clientapp`
to a child of the server, with its arguments, environment, folder, streams and exit status, and
becomes the real one when no server is there. The lab runs (tests/test_lab.py,
tests/test_hierarchy_lab.py) use it for every ClientApp and give the modules bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gaisnet_flwr.deploy.warm_clientapp import write_shim
from gaisnet_flwr.experiments import flwr_local


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A server that preloads nothing heavy (the forking is what is tested here)."""
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gaisnet_flwr.deploy.warm_clientapp", "server",
         "--socket", str(sock), "--preload", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server did not listen within 60 s"
            time.sleep(0.05)
        yield sock, proc
    finally:
        flwr_local.stop_processes({proc.pid}, timeout_s=10)
        proc.wait(timeout=30)
    assert not sock.exists(), "the server leaves no socket behind"


def run_shim(shim: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GAISNET_MARK": "from-the-caller"}
    return subprocess.run(
        [str(shim), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_shim_runs_flower_s_clientapp_in_a_child_of_the_server(
    server: tuple[Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    sock, proc = server
    shim = write_shim(tmp_path / "bin", sock, fallback=tmp_path / "never-used")
    shown = run_shim(shim, "--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "Run a Flower ClientApp" in shown.stdout  # Flower's own parser, on the shim's stdout
    refused = run_shim(shim, "--token", "t", "--no-such-flag", cwd=tmp_path)
    assert refused.returncode == 2  # argparse's status, relayed
    assert "unrecognized arguments: --no-such-flag" in refused.stderr
    assert proc.poll() is None, "a child's exit is not the server's"


def test_the_child_works_in_the_callers_folder(
    server: tuple[Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """A relative path resolves where the caller is: Flower reads `--root-certificates ca.pem`
    there (and refuses its content), where a missing file is refused as a bad path."""
    sock, _ = server
    shim = write_shim(tmp_path / "bin", sock)
    work = tmp_path / "work"
    work.mkdir()
    (work / "ca.pem").write_text("not a certificate")
    args = ("--token", "t", "--root-certificates", "ca.pem", "--runtime-api-address", "127.0.0.1:1")
    found = run_shim(shim, *args, cwd=work)
    assert found.returncode != 0 and "no start line" in found.stderr, found.stderr[-500:]
    missing = run_shim(shim, *args, cwd=tmp_path)
    assert "path is invalid" in missing.stdout + missing.stderr


def test_without_a_server_the_shim_is_the_real_clientapp(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text(f"#!{sys.executable}\nimport sys; print('real', sys.argv[1:])\n")
    real.chmod(0o755)
    shim = write_shim(tmp_path / "bin", tmp_path / "absent.sock", fallback=real)
    done = run_shim(shim, "--token", "t", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "real ['--token', 't']"


def test_only_its_user_may_reach_the_server(server: tuple[Path, subprocess.Popen[str]]) -> None:
    sock, _ = server
    assert sock.stat().st_mode & 0o777 == 0o600


def test_a_bad_request_costs_only_itself(
    server: tuple[Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Refused (too large; no streams), it leaves no descriptor open in the server, which
    serves the next caller."""
    import socket
    import struct

    sock, proc = server
    open_fds = lambda: len(os.listdir(f"/proc/{proc.pid}/fd"))  # noqa: E731
    before = open_fds()
    for fds in ([0, 1, 2], []):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(sock))
            socket.send_fds(conn, [struct.pack("!I", 1 << 30)], fds)
            assert conn.recv(4) == b""  # closed without a child
    assert open_fds() == before
    shim = write_shim(tmp_path / "bin", sock)
    assert run_shim(shim, "--help", cwd=tmp_path).returncode == 0


def test_a_long_lab_folder_gets_a_stable_socket_in_tmp(tmp_path: Path) -> None:
    from gaisnet_flwr.experiments.lab import Lab

    deep = tmp_path / ("x" * 120)
    place = Lab(deep).warm_socket()
    assert place.parent == Path("/tmp") and len(str(place)) < 100
    probe = (
        "from pathlib import Path; from gaisnet_flwr.experiments.lab import Lab; "
        f"print(Lab(Path({str(deep)!r})).warm_socket())"
    )
    elsewhere = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert elsewhere.stdout.strip() == str(place)  # another process finds the same socket
