"""A whole GaisNet lab on one machine, on loopback: SuperLink, SuperNodes, D2D peer processes.

The same processes a lab runs on real devices (docs/deploy.md):
  * one `flower-superlink` (the edge server; the cloud runs inside its ServerApp),
  * per client cluster one `flower-supernode` (the cluster's start point) whose node-config
    names its members, and K + 1 `gaisnet-peer` processes (K peers and the end point).

With a run-config that names a `population`, the lab forms its clusters as the run will (one
SuperNode per fine-tuning cluster, cluster-id = partition-id) and starts one `gaisnet-peer` per
member of each chain after the start point. Where a chain holds the edge server
(`edge-offload='auto'`), its `edge` member is a `gaisnet-peer` too (`edge-cN`): on real
devices it runs on the edge machine, and the chain lists its address at its place.

    python scripts/lab.py run [--clusters 2] [--peers-per-cluster 1] [--tls] [--dir DIR]
                              [-- --run-config "num-rounds=3"]    # up, flwr run, check, down
    python scripts/lab.py run -- --run-config "population='cell.toml' planner='comm-aware'
                              edge-offload='auto' ..."   # the population's clusters and chains
    python scripts/lab.py up [same options]     # bring the lab up and leave it running
    python scripts/lab.py down --dir DIR        # stop what `up` started (PIDs in DIR/pids.json)
    python scripts/lab.py run --edges 2 [--clusters 2] [--threads 1] ...
                              # the hierarchy as processes: a cloud, 2 edge servers, each
                              # with 2 clusters (`HierarchyLab`; results/cloud, results/edgeE)

`run` stops every process it started, by PID (with their children: Flower's SuperExec and app
processes), also when the run fails or is interrupted. Ports are free ones picked at start.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from signal import SIGINT, SIGTERM

import gaisnet_flwr.experiments.flwr_local as flwr_local
from gaisnet_flwr.config import parse_overrides
from gaisnet_flwr.contract import ACCURACY, EDGE_DIR, EDGE_ID, EDGES_CONTRIBUTED, ROUND_TIME
from gaisnet_flwr.deploy.pki import LabPki, make_lab_pki, make_supernode_key
from gaisnet_flwr.deploy.warm_clientapp import write_shim
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


def merged(lab_keys: dict[str, object], run_config: str) -> str:
    """The lab's run-config keys, then the caller's (`key=value ...`), which win."""
    given = set(re.findall(r"([\w-]+)\s*=", run_config))
    return " ".join([f"{k}={v}" for k, v in lab_keys.items() if k not in given] + [run_config])


def app_folder(app: Path | None) -> Path:
    """The Flower app folder (its pyproject.toml): by default the working directory."""
    app = Path.cwd() if app is None else app
    if not (app / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{app} is not a Flower app folder (no pyproject.toml): run from the gaisnet-flwr "
            f"checkout, or pass its folder"
        )
    return app


class Lab:
    """The lab's processes and files under `directory` (home/, logs/, pki/, pids.json)."""

    def __init__(
        self,
        directory: Path,
        clusters: int = 2,
        peers_per_cluster: int = 1,
        tls: bool = False,
        peer_args: tuple[str, ...] = (),
        chains: list[list[str]] | None = None,
        warm: bool = True,
    ) -> None:
        """`chains`: per cluster, its members after the start point by role (e.g. edge,
        peer1, end: `ClusterProfile.names[1:]`); by default peer1 .. peerK, end each.
        `warm`: the SuperNodes' ClientApp processes start warm (`start_warm_clientapps`)."""
        if clusters < 1 or peers_per_cluster < 1:
            raise ValueError("a lab needs >= 1 cluster and >= 1 peer per cluster")
        self.dir = directory.resolve()
        self.clusters = clusters
        self.peers_per_cluster = peers_per_cluster
        default = [*(f"peer{k + 1}" for k in range(peers_per_cluster)), "end"]
        self.chains = chains or [default] * clusters
        if len(self.chains) != clusters:
            raise ValueError(f"{len(self.chains)} chains for {clusters} clusters")
        self.tls = tls
        self.peer_args = peer_args  # more `gaisnet-peer` options, e.g. ("--threads", "2")
        self.warm = warm
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
        path = [str(self.dir / "bin")] if self.warm else []  # the warm flwr-clientapp first
        return {
            **os.environ,
            "PATH": os.pathsep.join([*path, str(BIN), os.environ.get("PATH", "")]),
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # A SuperNode's SuperExec looks for a new task every 1 s by default (flwr 1.42,
            # run_superexec.py): on loopback a poll costs next to nothing, and each message
            # waited half of that on average before its ClientApp process started.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        }

    def warm_socket(self) -> Path:
        """The warm ClientApp server's socket: in the lab's folder unless that path is too long
        for a Unix socket (~107 bytes), then in /tmp under a name made from it."""
        inside = self.dir / "warm-clientapp.sock"
        if len(str(inside)) <= 100:
            return inside
        key = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]  # the same in every process
        return Path("/tmp") / f"gaisnet-warm-{key}.sock"

    def start_warm_clientapps(self) -> None:
        """The SuperNodes' `flwr-clientapp` processes start warm: a server that imported torch
        and timm once forks each of them (deploy/warm_clientapp.py), reached through the shim
        in DIR/bin, first on the lab's PATH. Started first: its imports overlap the rest."""
        if not self.warm:
            return
        sock = self.warm_socket()
        write_shim(self.dir / "bin", sock)
        self._spawn(
            "warm-clientapp",
            [sys.executable, "-m", "gaisnet_flwr.deploy.warm_clientapp", "server",
             "--socket", str(sock)],
        )  # fmt: skip

    def wait_for_warm_clientapps(self, timeout_s: float = 120) -> None:
        """Until the server listens (a SuperNode's first message would otherwise start cold)."""
        if not self.warm:
            return
        sock, proc = self.warm_socket(), self.procs["warm-clientapp"]
        deadline = time.monotonic() + timeout_s
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the warm ClientApp server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm ClientApp server is not up after {timeout_s:.0f} s")
            time.sleep(0.1)

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

    @classmethod
    def for_run_config(
        cls,
        directory: Path,
        run_config: str,
        tls: bool = False,
        peer_args: tuple[str, ...] = (),
        clusters: int = 2,
    ) -> Lab:
        """The lab a run-config needs where the ServerApp decides the chains (a population, or
        edge-offload): one cluster per fine-tuning cluster it forms (else `clusters`), each
        with a gaisnet-peer per member of its chain, the edge server's included. The chains
        are the ServerApp's own (`cluster_tasks` over the nodes this lab starts)."""
        # the ServerApp's modules (torch, timm) only here: `--help` stays quick
        from gaisnet_flwr.apps.server_app import TaskBuilder, check_run_config, cluster_tasks
        from gaisnet_flwr.contract import NodeIdentity

        _, derived = check_run_config(parse_overrides(run_config) if run_config else {})
        if derived.layout is not None:
            clusters = len(derived.layout.fine_tuning)
        identities = {c: NodeIdentity(c, clusters) for c in range(clusters)}
        tasks, _ = cluster_tasks(derived, identities, TaskBuilder(derived))
        chains = [tasks[c].profile.names[1:] for c in range(clusters)]
        peers = derived.cfg.cluster.peers_per_cluster
        return cls(directory, clusters, peers, tls, peer_args, chains)

    def peer_name(self, cluster: int, member: int) -> str:
        if self.chains[cluster][member - 1] == "edge":
            return f"edge-c{cluster}"  # the edge server's gaisnet-peer for this chain
        return f"peer-c{cluster}-m{member}"

    def members(self) -> list[tuple[int, int]]:
        """(cluster, member) of every gaisnet-peer, members 1 .. chain length."""
        return [(c, m) for c, chain in enumerate(self.chains) for m in range(1, len(chain) + 1)]

    def start_peer(self, cluster: int, member: int) -> subprocess.Popen:
        """Member `member` of `cluster` (1 .. its chain's length: the peers, the edge server
        where the chain holds it, the end point last). Each is started with `--next` its
        successor's address, the one member it may call; the end point with none."""
        port = self._port(cluster, member)
        cmd = [str(BIN / "gaisnet-peer"), "--listen", f"{LOOPBACK}:{port}"]
        if member < len(self.chains[cluster]):
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
        members = range(1, len(self.chains[cluster]) + 1)
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
        self.start_warm_clientapps()
        members = self.members()
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
        self.wait_for_warm_clientapps()
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
        # Each was started in a process group of its own: a group outlives its leader (a
        # SuperNode that exited leaves its ClientApp process behind in it).
        stopped = flwr_local.stop_processes(pids, groups=pids)
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
        app = app_folder(app)
        results = self.dir / "results"
        lab_keys = {
            "min-clusters": self.clusters,
            "peers-per-cluster": self.peers_per_cluster,
            "output-dir": json.dumps(str(results)),
        }
        overrides = merged(lab_keys, run_config)
        cmd = [str(BIN / "flwr"), "run", str(app), "lab", "--stream", "--run-config", overrides]
        record = Provenance.start(shlex.join(["python", "scripts/lab.py", *sys.argv[1:]]), app)
        record.run_config = {"tls": self.tls, "flwr-run": shlex.join(cmd[1:])}
        outcome = flwr_local.stream_run(
            cmd, self.logs / "flwr-run.log", echo=False, env=self.env(), progress=progress
        )
        outcome.check(BIN / "flwr", default_results=results, env=self.env())
        record.write(outcome.results)  # what made the results, beside them
        return outcome


@dataclass
class HierarchyOutcome:
    """What a hierarchy run came to: the cloud's run and each edge's (`ok`: all finished)."""

    cloud: flwr_local.RunOutcome
    edges: list[flwr_local.RunOutcome]

    @property
    def ok(self) -> bool:
        return self.cloud.ok and all(e.ok for e in self.edges)

    @property
    def why(self) -> str:
        parts = [f"cloud: {self.cloud.why}"] if not self.cloud.ok else []
        parts += [f"edge {e}: {o.why}" for e, o in enumerate(self.edges) if not o.ok]
        return "; ".join(parts)


class HierarchyLab(Lab):
    """The paper's hierarchy as processes of their own, on loopback (docs/deploy.md):

      cloud     `flower-superlink` (the cloud's ServerApp runs in it: run-config tier='cloud')
      edge e    `flower-superlink` (edge e's ServerApp: tier='edge', edge-id=e),
                `flower-supernode` of the cloud's SuperLink (node-config edge-id, edge-dir:
                its ClientApp relays the cloud's messages to edge e's ServerApp),
                per cluster `flower-supernode` of edge e's SuperLink (edge-id, partition-id
                within the edge, its own foundation-dir) and its `gaisnet-peer`s.

    Every machine keeps its own folder (edge e: DIR/edges/edgeE; the start point of cluster c:
    DIR/nodes/cC; the cloud: DIR/cloud): the foundation reaches each over the wire, from the
    cloud through its edge, checked by SHA-256 at each hop. Cluster c belongs to edge
    c // clusters_per_edge. `threads` (e.g. 1): torch threads of every process (OMP_NUM_THREADS,
    gaisnet-peer --threads), which the same modules bit for bit need.
    """

    def __init__(
        self,
        directory: Path,
        edges: int = 2,
        clusters_per_edge: int = 2,
        peers_per_cluster: int = 1,
        tls: bool = False,
        threads: int | None = None,
    ) -> None:
        if edges < 1 or clusters_per_edge < 1:
            raise ValueError("a hierarchy lab needs >= 1 edge and >= 1 cluster per edge")
        peer_args = ("--threads", str(threads)) if threads else ()
        super().__init__(directory, edges * clusters_per_edge, peers_per_cluster, tls, peer_args)
        self.edges = edges
        self.per_edge = clusters_per_edge
        self.threads = threads
        self.link_ports: dict[str, int] = {}  # superlink name (cloud, edge0, ...) -> its port
        self._supernodes: dict[str, tuple[str, int, str]] = {}  # name -> (link, port, config)
        # edge -> its last submitted run: the thread that waits for it, and its outcome
        self._edge_runs: dict[int, tuple[threading.Thread, list[flwr_local.RunOutcome]]] = {}

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.threads:
            env |= {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        return env

    # -- who is where ---------------------------------------------------------------------------
    def edge_dir(self, edge: int) -> Path:
        """Edge `edge`'s folder: its ServerApp and its cloud-facing SuperNode share it."""
        return self.dir / "edges" / f"edge{edge}"

    def node_dir(self, cluster: int) -> Path:
        """Cluster `cluster`'s start point's folder (its foundation lands in foundation/)."""
        return self.dir / "nodes" / f"c{cluster}"

    def node_config(self, cluster: int) -> str:
        edge, partition = divmod(cluster, self.per_edge)
        config = super().node_config(cluster)  # its peers (and their TLS files)
        config = re.sub(r"partition-id=\d+ num-partitions=\d+ ", "", config)
        foundation = self.node_dir(cluster) / "foundation"
        return (
            f"edge-id={edge} partition-id={partition} num-partitions={self.per_edge} "
            f'foundation-dir="{foundation}" {config}'
        )

    def relay_config(self, edge: int) -> str:
        return f'edge-id={edge} edge-dir="{self.edge_dir(edge)}"'

    # -- processes ------------------------------------------------------------------------------
    def start_superlink(self, name: str) -> None:
        """SuperLink `name` ("cloud" or "edgeE") on its port (a restart keeps it)."""
        tls = ["--insecure"]
        if self.tls:
            pki = self.pki()
            tls = ["--ssl-certfile", str(pki.certfile), "--ssl-keyfile", str(pki.keyfile),
                   "--ssl-ca-certfile", str(pki.ca_certfile)]  # fmt: skip
            if name == "cloud":  # only the edge servers' registered keys may join
                tls.append("--enable-supernode-auth")
        port = self.link_ports[name]
        self._spawn(
            f"superlink-{name}",
            [str(BIN / "flower-superlink"), *tls, "--port", str(port), "--host", LOOPBACK,
             "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        wait_for_port(port, self.procs[f"superlink-{name}"], f"flower-superlink ({name})")
        if self.tls and name == "cloud":  # a restarted SuperLink keeps no registrations
            for e in range(self.edges):
                self.register(self.edge_key(e), "cloud")

    def edge_key(self, edge: int) -> Path:
        """Edge `edge`'s SuperNode key for the cloud (made on first use; `.pub` beside it)."""
        key = self.dir / "pki" / f"edge{edge}-supernode"
        if not key.exists():
            make_supernode_key(key)
        return key

    def register(self, key: Path, link: str) -> None:
        """`flwr supernode register KEY.pub LINK`: Flower's SuperNode authentication."""
        cmd = [str(BIN / "flwr"), "supernode", "register", f"{key}.pub", link]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {done.stdout[-500:]}{done.stderr}")

    def start_supernode(
        self, name: str, link: str, port: int, node_config: str, key: Path | None = None
    ) -> None:
        """A SuperNode of SuperLink `link`; under the cloud (an edge server's) with TLS, it
        authenticates with `key`, by default its edge's registered key (`edge_key`)."""
        self._supernodes[name] = (link, port, node_config)
        root = ["--root-certificates", str(self.pki().ca_certfile)] if self.tls else ["--insecure"]
        if self.tls and link == "cloud":
            if key is None:
                key = self.edge_key(int(re.sub(r"edge(\d+)-cloud", r"\1", name)))
            root += ["--auth-supernode-private-key", str(key)]
        self._spawn(
            name,
            [str(BIN / "flower-supernode"), *root,
             "--superlink", f"{LOOPBACK}:{self.link_ports[link]}",
             "--port", str(port), "--node-config", node_config],
        )  # fmt: skip

    def up(self) -> None:
        """Peers, the SuperLinks (cloud, each edge), then the edges' cloud-facing SuperNodes
        and the clusters' SuperNodes."""
        self.start_warm_clientapps()
        members = self.members()
        links = ["cloud", *(f"edge{e}" for e in range(self.edges))]
        ports = flwr_local.free_ports(len(members) + len(links) + self.edges + self.clusters)
        self.peer_ports.update(zip(members, ports, strict=False))
        for c, m in members:
            self.start_peer(c, m)
        rest = ports[len(members) :]
        self.link_ports = dict(zip(links, rest, strict=False))
        relay_ports, node_ports = rest[len(links) : len(links) + self.edges], rest[-self.clusters :]
        self._write_flwr_config()
        for name in links:
            self.start_superlink(name)
        self.superlink_port = self.link_ports["cloud"]
        self.wait_for_warm_clientapps()
        for e, port in enumerate(relay_ports):
            self.edge_dir(e).mkdir(parents=True, exist_ok=True)
            self.start_supernode(f"edge{e}-cloud", "cloud", port, self.relay_config(e))
        for c, port in enumerate(node_ports):
            edge = c // self.per_edge
            self.start_supernode(f"supernode-{c}", f"edge{edge}", port, self.node_config(c))
        self.wait_for_peers()

    def _write_flwr_config(self) -> None:
        lines = ["[superlink]", 'default = "cloud"']
        for name, port in self.link_ports.items():
            lines += ["", f"[superlink.{name}]", f'address = "{LOOPBACK}:{port}"']
            if self.tls:
                lines.append(f'root-certificates = "{self.pki().ca_certfile}"')
            else:
                lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def restart(self, name: str) -> None:
        """Kill SuperLink `name` ("cloud", "edgeE") with its ServerApp (SIGKILL: a machine
        dying) and start it again on its port, with the SuperNodes that served it: a SuperNode
        whose SuperLink forgot it (a restarted one keeps no state) exits, and a device's
        supervisor (systemd `Restart=always`, say) starts it again, as here."""
        self.kill(f"superlink-{name}")
        self.start_superlink(name)
        for node, (link, port, config) in list(self._supernodes.items()):
            if link == name:
                self._stop_group(node)
                self.start_supernode(node, link, port, config)  # (an edge's: its own key)

    def _stop_group(self, name: str) -> None:
        """Process `name`, if it still runs, and whatever it left in its process group."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):  # leader and group gone already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    # -- a run ----------------------------------------------------------------------------------
    def results(self, tier: str, name: str = "") -> Path:
        """Where a tier's results go: results/[NAME/]cloud, results/[NAME/]edgeE (`name`: one
        run's folder, so that several runs on the same lab keep theirs apart)."""
        return self.dir / "results" / name / tier

    def _submit(self, link: str, keys: dict[str, object], run_config: str, app: Path | None,
                name: str = "") -> flwr_local.RunOutcome:  # fmt: skip
        app = app_folder(app)
        results = self.results(link, name)
        overrides = merged({"output-dir": json.dumps(str(results)), **keys}, run_config)
        cmd = [str(BIN / "flwr"), "run", str(app), link, "--stream", "--run-config", overrides]
        log = self.logs / f"flwr-run-{link}.log"
        part = self.logs / f"flwr-run-{link}-{time.time_ns()}.part"  # a killed run's apart
        outcome = flwr_local.stream_run(cmd, part, echo=False, env=self.env())
        with log.open("a") as f:  # each submission's stream, one after the other
            f.write(f"\n$ {shlex.join(cmd[1:])}\n{part.read_text()}")
        part.unlink()
        outcome.log = log
        outcome.check(BIN / "flwr", default_results=results, env=self.env(), superlink=link)
        return outcome

    def start_edge(
        self, edge: int, run_config: str = "", app: Path | None = None, name: str = ""
    ) -> None:
        """Submit edge `edge`'s run (it waits for the cloud's requests); its outcome comes
        with `finish_edges`."""
        keys = {
            "tier": '"edge"',
            EDGE_ID: edge,
            EDGE_DIR: json.dumps(str(self.edge_dir(edge))),
            "min-clusters": self.per_edge,
            "peers-per-cluster": self.peers_per_cluster,
        }

        outcome: list[flwr_local.RunOutcome] = []  # this submission's, not a killed one's

        def submit() -> None:
            outcome.append(self._submit(f"edge{edge}", keys, run_config, app, name))

        thread = threading.Thread(target=submit, name=f"edge{edge}-run", daemon=True)
        thread.start()
        self._edge_runs[edge] = (thread, outcome)

    def run_cloud(self, run_config: str = "", app: Path | None = None, resume: bool = False,
                  name: str = "") -> flwr_local.RunOutcome:  # fmt: skip
        """The cloud's run, to its end (or its SuperLink's)."""
        foundation = json.dumps(str(self.dir / "cloud" / "foundation"))
        keys: dict[str, object] = {"tier": '"cloud"', "foundation-dir": foundation,
                "resume": "true" if resume else "false"}  # fmt: skip
        return self._submit("cloud", keys, run_config, app, name)

    def down(self) -> list[flwr_local.Proc]:
        stopped = super().down()
        for thread, _ in self._edge_runs.values():  # their `flwr run` ends with its SuperLink
            thread.join(timeout=60)
        return stopped

    def finish_edges(self, timeout_s: float = 600) -> list[flwr_local.RunOutcome]:
        """Each edge's run, once it has finished (after the cloud's final delivery)."""
        for thread, _ in self._edge_runs.values():
            thread.join(timeout=timeout_s)
        missing = [e for e, (_, outcome) in sorted(self._edge_runs.items()) if not outcome]
        if missing:
            raise RuntimeError(f"edge run(s) {missing} did not end within {timeout_s:.0f} s")
        return [self._edge_runs[e][1][0] for e in range(self.edges)]

    def run(  # type: ignore[override]
        self, run_config: str = "", app: Path | None = None, name: str = ""
    ) -> HierarchyOutcome:
        """Every edge's run, then the cloud's; wait for all and check that each finished.
        `name`: the run's folder under results/."""
        record = Provenance.start(shlex.join(["python", "scripts/lab.py", *sys.argv[1:]]),
                                  app_folder(app))  # fmt: skip
        for e in range(self.edges):
            self.start_edge(e, run_config, app, name)
        cloud = self.run_cloud(run_config, app, name=name)
        # A cloud run that failed sends no more requests: the edges would wait for them until
        # finish_edges' timeout, so the run ends here (the caller stops every process by PID).
        outcome = HierarchyOutcome(cloud, self.finish_edges() if cloud.ok else [])
        record.run_config = {"tls": self.tls, "edges": self.edges, "run-config": run_config}
        record.write(cloud.results)
        return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "up", "down"))
    parser.add_argument("--dir", type=Path, default=Path("outputs") / "lab")
    parser.add_argument("--clusters", type=int, default=2, help="clusters (per edge with --edges)")
    parser.add_argument(
        "--edges", type=int, default=0,
        help="the hierarchy as processes: a cloud and this many edge servers, each with its own "
        "SuperLink over --clusters clusters (0: one SuperLink, the hierarchy in its ServerApp)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads of every process (1 makes the modules equal bit for bit to the "
        "one-ServerApp hierarchy's)",
    )  # fmt: skip
    parser.add_argument("--peers-per-cluster", type=int, default=1)
    parser.add_argument(
        "--cold", action="store_true",
        help="every ClientApp process imports torch itself, as a plain SuperNode's does (the "
        "default starts them warm: gaisnet_flwr/deploy/warm_clientapp.py)",
    )  # fmt: skip
    parser.add_argument(
        "--tls", action="store_true",
        help="TLS everywhere, mutual between start points and peers (a throwaway lab CA)",
    )  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.command != "down":
        try:
            flwr_local.check_flower_install()
        except ValueError as err:
            sys.exit(f"error: {err}")
    if args.command == "down":
        pids_file = args.dir / "pids.json"
        if not pids_file.is_file():
            sys.exit(f"error: no {pids_file}: nothing was brought up there")
        pids = set(json.loads(pids_file.read_text()).values())
        stopped = flwr_local.stop_processes(pids)
        pids_file.write_text("{}")
        print(f"[lab] stopped {len(stopped)} processes")
        return 0

    run_config = ""
    if extra:
        if extra[0] != "--run-config" or len(extra) != 2:
            sys.exit('error: extra arguments must be: -- --run-config "key=value ..."')
        run_config = extra[1]
    given = parse_overrides(run_config) if run_config else {}
    if args.edges:
        return run_hierarchy(args, run_config)
    if str(given.get("population", "")).strip() or given.get("edge-offload", "never") != "never":
        # the ServerApp decides the clusters' chains (edge members included)
        lab = Lab.for_run_config(args.dir, run_config, args.tls, clusters=args.clusters)
    else:
        lab = Lab(args.dir, args.clusters, args.peers_per_cluster, args.tls)
    lab.warm = not args.cold
    mode = "TLS" if args.tls else "insecure"
    hint = (
        f"[lab] FLWR_HOME={lab.home} flwr run . lab --stream --run-config "
        f"'min-clusters={lab.clusters} peers-per-cluster={lab.peers_per_cluster}'"
    )

    def run(started: float) -> int:
        def say(text: str) -> None:  # a long wait shows where it is (the whole stream: the log)
            print(f"[lab {time.monotonic() - started:5.0f} s] {text}", flush=True)

        say(f"flwr run . lab (the whole stream: {lab.logs / 'flwr-run.log'})")
        outcome = lab.run(run_config, progress=say)
        if outcome.ok:  # (its FINAL line was among the progress lines)
            print(f"[lab] run {outcome.run_id} completed in {time.monotonic() - started:.0f} s "
                  f"({outcome.cluster_failures}); results in {outcome.results}")  # fmt: skip
            return 0
        print(f"[lab] RUN FAILED: {outcome.why}. See {outcome.log} and "
              f"{lab.logs}", file=sys.stderr)  # fmt: skip
        return 1

    return drive(
        lab, args, lambda: f"SuperLink on port {lab.superlink_port}, {lab.clusters} SuperNodes, "
        f"{len(lab.peer_ports)} peers ({mode})", hint, run,
    )  # fmt: skip


def drive(
    lab: Lab,
    args: argparse.Namespace,
    describe: Callable[[], str],
    hint: str,
    run: Callable[[float], int],
) -> int:
    """Bring `lab` up; with `up`, leave it running (`hint`: what to submit); with `run`,
    `run(started)`; stop every process it started, by PID, however it ends."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        started = time.monotonic()
        print(f"[lab] starting the lab's processes in {args.dir}", flush=True)
        lab.up()
        print(f"[lab] up in {time.monotonic() - started:.0f} s: {describe()}; logs in {lab.logs}")
        if args.command == "up":
            print(f"{hint}\n[lab] stop with: python scripts/lab.py down --dir {args.dir}")
            lab.procs.clear()  # leave them running
            return 0
        return run(started)
    finally:
        if lab.procs:
            # A second Ctrl-C (or a SIGTERM) during the stop would end it half way and leave
            # the rest running: the stop finishes first (SIGKILL after 20 s at most).
            before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (SIGINT, SIGTERM)}
            try:
                print(f"[lab] stopped {len(lab.down())} processes")
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)


def run_hierarchy(args: argparse.Namespace, run_config: str) -> int:
    """`--edges E`: the cloud, E edge servers, their SuperNodes and peers (`HierarchyLab`)."""
    edges = args.edges
    domains = parse_overrides(run_config).get("edge-domains") if run_config else None
    if domains is None:  # one domain per edge: the default run-config names one
        run_config = f"edge-domains={json.dumps(','.join(['none'] * edges))} {run_config}"
    elif len(str(domains).split(",")) != edges:
        sys.exit(f"error: --edges {edges} but edge-domains={domains!r} names "
                 f"{len(str(domains).split(','))}: name one domain per edge server")  # fmt: skip
    lab = HierarchyLab(args.dir, edges, args.clusters, args.peers_per_cluster, args.tls,
                       args.threads)  # fmt: skip
    lab.warm = not args.cold
    mode = "TLS" if args.tls else "insecure"
    hint = (
        f"[lab] submit each edge's run, then the cloud's (docs/deploy.md):\n"
        f"[lab] FLWR_HOME={lab.home} flwr run . edge0 --run-config \"tier='edge' "
        f"edge-id=0 edge-dir='{lab.edge_dir(0)}'\"  ...\n"
        f"[lab] FLWR_HOME={lab.home} flwr run . cloud --run-config \"tier='cloud'\""
    )

    def run(started: float) -> int:
        outcome = lab.run(run_config)
        took = time.monotonic() - started
        if not outcome.ok:
            print(f"[lab] RUN FAILED: {outcome.why}. See {lab.logs}", file=sys.stderr)
            return 1
        rows = json.loads((outcome.cloud.results / "metrics.json").read_text())
        for row in rows:  # the cloud's time per cloud round: its edges' rounds and its own
            print(f"[lab] cloud round {row['round']} (edge rounds {row['edge-rounds']}): "
                  f"{row[ROUND_TIME]:.0f} s, {row[EDGES_CONTRIBUTED]} edge(s) "
                  f"contributed, accuracy {row.get(ACCURACY, float('nan')):.4f}")  # fmt: skip
        print(f"[lab] cloud run {outcome.cloud.run_id} and {edges} edge runs completed in "
              f"{took:.0f} s\n{outcome.cloud.final}")  # fmt: skip
        return 0

    return drive(
        lab, args, lambda: f"the cloud's SuperLink on port {lab.link_ports['cloud']}, {edges} "
        f"edge SuperLinks, {lab.clusters} cluster SuperNodes, {len(lab.peer_ports)} peers "
        f"({mode})", hint, run,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
