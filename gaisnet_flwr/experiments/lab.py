"""A whole GaisNet lab on one machine, on loopback: SuperLink, SuperNodes, D2D peer processes.

The same processes a lab runs on real devices (docs/deploy.md):
  * one `flower-superlink` (the edge server; the cloud runs inside its ServerApp),
  * per client cluster one `flower-supernode` (the cluster's start point) whose node-config
    names its members, and K + 1 `gaisnet-peer` processes (K peers and the end point).

    python scripts/lab.py run [--clusters 2] [--peers-per-cluster 1] [--tls] [--dir DIR]
                              [-- --run-config "num-rounds=3"]    # up, flwr run, check, down
    python scripts/lab.py up [same options]     # bring the lab up and leave it running
    python scripts/lab.py down --dir DIR        # stop what `up` started (PIDs in DIR/pids.json)

`run` stops every process it started, by PID (with their children: Flower's SuperExec and app
processes), also when the run fails or is interrupted. Ports are free ones picked at start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gaisnet_flwr.experiments.flwr_local as flwr_local
from gaisnet_flwr.deploy.pki import LabPki, make_lab_pki
from gaisnet_flwr.experiments.provenance import Provenance

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


def wait_for_port(port: int, proc: subprocess.Popen, name: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{name} is not listening on port {port} after {timeout_s:.0f} s")


class Lab:
    """The lab's processes and files under `directory` (home/, logs/, pki/, pids.json)."""

    def __init__(
        self,
        directory: Path,
        clusters: int = 2,
        peers_per_cluster: int = 1,
        tls: bool = False,
        peer_args: tuple[str, ...] = (),
    ) -> None:
        if clusters < 1 or peers_per_cluster < 1:
            raise ValueError("a lab needs >= 1 cluster and >= 1 peer per cluster")
        self.dir = directory.resolve()
        self.clusters = clusters
        self.peers_per_cluster = peers_per_cluster
        self.tls = tls
        self.peer_args = peer_args  # more `gaisnet-peer` options, e.g. ("--threads", "2")
        self.home = self.dir / "home"
        self.logs = self.dir / "logs"
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.peer_ports: dict[tuple[int, int], int] = {}
        self.superlink_port = 0
        self._pki: LabPki | None = None

    # -- processes ----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("a")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.dir,
            start_new_session=True,  # its own process group: stopped with its children
        )  # fmt: skip
        self.procs[name] = proc
        self._write_pids()
        return proc

    def _write_pids(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        (self.dir / "pids.json").write_text(json.dumps(pids, indent=2))

    def peer_name(self, cluster: int, member: int) -> str:
        return f"peer-c{cluster}-m{member}"

    def start_peer(self, cluster: int, member: int) -> subprocess.Popen:
        """Member `member` of `cluster`: 1..K are the peers, K + 1 the end point. Each peer is
        started with `--next` its successor's address, the one member it may call; the end
        point with none."""
        port = self._port(cluster, member)
        cmd = [str(BIN / "gaisnet-peer"), "--listen", f"{LOOPBACK}:{port}"]
        if member <= self.peers_per_cluster:
            cmd += ["--next", f"{LOOPBACK}:{self._port(cluster, member + 1)}"]
        if self.tls:
            pki = self.pki()  # mutual TLS: callers (start point, previous peer) need a cert
            cmd += ["--certfile", str(pki.certfile), "--keyfile", str(pki.keyfile),
                    "--ca-certfile", str(pki.ca_certfile), "--require-client-cert"]  # fmt: skip
        else:
            cmd.append("--insecure")
        return self._spawn(self.peer_name(cluster, member), [*cmd, *self.peer_args])

    def _port(self, cluster: int, member: int) -> int:
        """The member's port, picked once (a restarted peer keeps its address). `up` picks every
        member's at once, so they differ; a peer started alone picks its own and its next's."""
        if (cluster, member) not in self.peer_ports:
            taken = set(self.peer_ports.values())
            self.peer_ports[(cluster, member)] = min(
                set(flwr_local.free_ports(len(taken) + 1)) - taken
            )
        return self.peer_ports[(cluster, member)]

    def peer_address(self, cluster: int, member: int) -> str:
        return f"{LOOPBACK}:{self.peer_ports[(cluster, member)]}"

    def wait_for_peers(self) -> None:
        for (c, m), port in self.peer_ports.items():
            wait_for_port(port, self.procs[self.peer_name(c, m)], self.peer_name(c, m))

    def pki(self) -> LabPki:
        """The lab's throwaway CA and server certificate (made on first use)."""
        if self._pki is None:
            self._pki = make_lab_pki(self.dir / "pki")
        return self._pki

    def node_config(self, cluster: int) -> str:
        members = range(1, self.peers_per_cluster + 2)
        peers = ",".join(self.peer_address(cluster, m) for m in members)
        config = f'partition-id={cluster} num-partitions={self.clusters} peers="{peers}"'
        if self.tls:  # mutual TLS: the start point presents the lab's client certificate
            pki = self.pki()
            config += (
                f' peer-ca-certfile="{pki.ca_certfile}" peer-certfile="{pki.client_certfile}"'
                f' peer-keyfile="{pki.client_keyfile}"'
            )
        return config

    def up(self) -> None:
        """Peers first (a SuperNode's first message may already need them), then the
        SuperLink, then one SuperNode per cluster; wait until every listener answers."""
        tls_link = ["--insecure"]
        if self.tls:
            pki = self.pki()
            tls_link = ["--ssl-certfile", str(pki.certfile), "--ssl-keyfile", str(pki.keyfile),
                        "--ssl-ca-certfile", str(pki.ca_certfile)]  # fmt: skip
        members = [
            (c, m) for c in range(self.clusters) for m in range(1, self.peers_per_cluster + 2)
        ]
        ports = flwr_local.free_ports(len(members) + 1 + self.clusters)
        self.peer_ports.update(zip(members, ports, strict=False))
        for c, m in members:
            self.start_peer(c, m)
        self.superlink_port, *node_ports = ports[len(members) :]
        self._spawn(
            "superlink",
            [str(BIN / "flower-superlink"), *tls_link, "--port", str(self.superlink_port),
             "--host", LOOPBACK, "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        self._write_flwr_config()
        wait_for_port(self.superlink_port, self.procs["superlink"], "flower-superlink")
        for c, port in enumerate(node_ports):
            root = (
                ["--root-certificates", str(self.pki().ca_certfile)] if self.tls else ["--insecure"]
            )
            self._spawn(
                f"supernode-{c}",
                [str(BIN / "flower-supernode"), *root,
                 "--superlink", f"{LOOPBACK}:{self.superlink_port}",
                 "--port", str(port), "--node-config", self.node_config(c)],
            )  # fmt: skip
        self.wait_for_peers()

    def _write_flwr_config(self) -> None:
        lines = ["[superlink]", 'default = "lab"', "", "[superlink.lab]",
                 f'address = "{LOOPBACK}:{self.superlink_port}"']  # fmt: skip
        if self.tls:
            lines.append(f'root-certificates = "{self.pki().ca_certfile}"')
        else:
            lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one process abruptly (a device dying), e.g. `peer-c0-m1`."""
        proc = self.procs[name]
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        self._write_pids()

    def down(self) -> list[flwr_local.Proc]:
        pids = {p.pid for p in self.procs.values()}
        stopped = flwr_local.stop_processes(pids)
        for proc in self.procs.values():
            proc.wait(timeout=30)  # reap: no zombies left behind
        self.procs.clear()
        self._write_pids()
        return stopped

    # -- a run ---------------------------------------------------------------------------------
    def run(
        self,
        run_config: str = "",
        app: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> flwr_local.RunOutcome:
        """`flwr run` the app (the Flower app folder, its pyproject.toml; by default the
        working directory, as `flwr run .`) on this lab's SuperLink and check that it really
        finished. `progress` gets the stream's lines that say how far the run got."""
        app = Path.cwd() if app is None else app
        if not (app / "pyproject.toml").is_file():
            raise FileNotFoundError(
                f"{app} is not a Flower app folder (no pyproject.toml): run from the gaisnet-flwr "
                f"checkout, or pass its folder"
            )
        results = self.dir / "results"
        lab_keys = {
            "min-clusters": self.clusters,
            "peers-per-cluster": self.peers_per_cluster,
            "output-dir": json.dumps(str(results)),
        }
        given = set(re.findall(r"([\w-]+)\s*=", run_config))  # the caller's keys win
        overrides = " ".join(
            [f"{k}={v}" for k, v in lab_keys.items() if k not in given] + [run_config]
        )
        cmd = [str(BIN / "flwr"), "run", str(app), "lab", "--stream", "--run-config", overrides]
        record = Provenance.start(shlex.join(["python", "scripts/lab.py", *sys.argv[1:]]), app)
        record.run_config = {"tls": self.tls, "flwr-run": shlex.join(cmd[1:])}
        outcome = flwr_local.stream_run(
            cmd, self.logs / "flwr-run.log", echo=False, env=self.env(), progress=progress
        )
        outcome.check(BIN / "flwr", default_results=results, env=self.env())
        record.write(outcome.results)  # what made the results, beside them
        return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "up", "down"))
    parser.add_argument("--dir", type=Path, default=Path("outputs") / "lab")
    parser.add_argument("--clusters", type=int, default=2)
    parser.add_argument("--peers-per-cluster", type=int, default=1)
    parser.add_argument(
        "--tls", action="store_true",
        help="TLS everywhere, mutual between start points and peers (a throwaway lab CA)",
    )  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.command == "down":
        pids_file = args.dir / "pids.json"
        if not pids_file.is_file():
            sys.exit(f"error: no {pids_file}: nothing was brought up there")
        pids = set(json.loads(pids_file.read_text()).values())
        stopped = flwr_local.stop_processes(pids)
        pids_file.write_text("{}")
        print(f"[lab] stopped {len(stopped)} processes")
        return 0

    lab = Lab(args.dir, args.clusters, args.peers_per_cluster, args.tls)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_config = ""
    if extra:
        if extra[0] != "--run-config" or len(extra) != 2:
            sys.exit('error: extra arguments must be: -- --run-config "key=value ..."')
        run_config = extra[1]
    started = time.monotonic()

    def say(text: str) -> None:  # a long wait shows where it is (the whole stream: the log)
        print(f"[lab {time.monotonic() - started:5.0f} s] {text}", flush=True)

    try:
        say(
            f"starting {args.clusters * (args.peers_per_cluster + 1)} peers, a SuperLink and "
            f"{args.clusters} SuperNodes in {args.dir}"
        )
        lab.up()
        print(f"[lab] up in {time.monotonic() - started:.0f} s: SuperLink on port "
              f"{lab.superlink_port}, {args.clusters} SuperNodes, {len(lab.peer_ports)} peers "
              f"({'TLS' if args.tls else 'insecure'}); logs in {lab.logs}")  # fmt: skip
        if args.command == "up":
            print(f"[lab] FLWR_HOME={lab.home} flwr run . lab --stream --run-config "
                  f"'min-clusters={args.clusters} peers-per-cluster={args.peers_per_cluster}'\n"
                  f"[lab] stop with: python scripts/lab.py down --dir {args.dir}")  # fmt: skip
            lab.procs.clear()  # leave them running
            return 0
        say(f"flwr run . lab (the whole stream: {lab.logs / 'flwr-run.log'})")
        outcome = lab.run(run_config, progress=say)
        if outcome.ok:
            # (its FINAL line was among the progress lines)
            print(f"[lab] run {outcome.run_id} completed in {time.monotonic() - started:.0f} s "
                  f"({outcome.cluster_failures}); results in {outcome.results}")  # fmt: skip
            return 0
        print(f"[lab] RUN FAILED: {outcome.why}. See {outcome.log} and "
              f"{lab.logs}", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        if lab.procs:
            print(f"[lab] stopped {len(lab.down())} processes")


if __name__ == "__main__":
    sys.exit(main())
