"""The bridge between an edge server and its cloud-facing SuperNode: a folder on the edge machine.

A deployed edge server is two Flower parts on one machine (docs/deploy.md): its own SuperLink
with a long-lived ServerApp (tier 'edge') over its clusters' SuperNodes, and a SuperNode of the
cloud's SuperLink, whose ClientApp runs as a fresh process per cloud message
(`apps/edge_relay.py`). The two meet in the edge's folder (run-config and node-config
`edge-dir`):

    edge-dir/server.json          the edge ServerApp serving now: its pid (and process start)
    edge-dir/requests/ID.json     what the cloud asked (+ ID.npz: the modules it sent)
    edge-dir/accepted/ID.json     which edge ServerApp took request ID (its pid)
    edge-dir/replies/ID.json      the answer (+ ID.npz: the edge's modules)
    edge-dir/foundation/          the foundation checkpoint the cloud shipped

The relay writes a request, then waits for its reply; the edge server takes requests oldest
first, answers each, and marks what it took. Each file is written whole and renamed into place,
so neither side reads half of one. What the relay can tell the cloud without waiting to the
deadline: the edge ServerApp that took its request has stopped (a dead edge costs only its
contribution, at once). A request nobody takes is answered "missed" at its deadline.

No torch here (the relay is a fresh process per message): numpy and json only.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gaisnet_flwr.deploy.shipping import write_atomic

POLL_S = 0.2  # how often either side looks for the other's files
KINDS = ("train", "evaluate")


class EdgeUnavailable(RuntimeError):
    """The edge server did not answer: it stopped while serving, or missed the deadline."""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None (not Linux, or no
    such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_start(pid: int) -> str:
    """A token that tells a process from a later one reusing its pid (Linux: its start time in
    clock ticks, /proc/PID/stat field 22); "" where that cannot be read."""
    fields = _stat(pid)
    return fields[19] if fields else ""


def alive(pid: int, start: str = "") -> bool:
    """Whether process `pid` (started at `start`, if given) still runs; a zombie does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat(pid)
    if fields is None:
        return True  # no /proc: kill(0) is all there is to know
    return fields[0] != "Z" and (not start or fields[19] == start)


@dataclass(frozen=True)
class BridgeRequest:
    """A cloud message as the edge server reads it."""

    id: str
    kind: str  # one of KINDS
    cloud_round: int
    first: int  # the hierarchy's rounds this request covers (train: first..last)
    last: int
    final: bool  # the last cloud round: after its delivery the edge finishes
    deadline: float  # time.time() after which the relay no longer waits
    modules: dict[str, np.ndarray]
    shared: dict[str, Any] = field(default_factory=dict)  # the cloud's shared run-config


@dataclass
class BridgeReply:
    """The edge server's answer: its modules (train), its weight in the cloud's average (the
    training examples of the clusters that trained in its last round), metrics and failures; or
    an error that stopped it from answering."""

    modules: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0
    metrics: dict[str, float | int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


def _npz(modules: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **modules)  # type: ignore[arg-type]
    return buffer.getvalue()


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


class EdgeBridge:
    """The edge's folder (module docstring), from either side."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory).expanduser().resolve()
        self.requests, self.accepted, self.replies = (
            self.dir / "requests",
            self.dir / "accepted",
            self.dir / "replies",
        )

    @property
    def foundation_dir(self) -> Path:
        """Where the cloud's foundation lands (and the edge ServerApp reads it)."""
        return self.dir / "foundation"

    # -- the edge ServerApp's side ------------------------------------------------------------
    def open(self) -> None:
        """Announce this process as the edge server now serving (server.json)."""
        for d in (self.requests, self.accepted, self.replies, self.foundation_dir):
            d.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "start": process_start(os.getpid()), "since": time.time()}
        write_atomic(self.dir / "server.json", json.dumps(me).encode())

    def next_request(self, timeout_s: float | None = None) -> BridgeRequest | None:
        """Take the oldest request no live server took and whose deadline has not passed;
        wait for one (up to `timeout_s`; None: for ever). Returns None at the timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for meta in sorted(self.requests.glob("*.json")):
                request = self._take(meta)
                if request is not None:
                    return request
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

    def _take(self, meta: Path) -> BridgeRequest | None:
        rid = meta.stem
        if (self.replies / f"{rid}.json").exists():
            return None
        taken = self.accepted / f"{rid}.json"
        if taken.exists():
            return None  # another server took it: if it died, the relay answers for it
        info = json.loads(meta.read_text())
        if info["deadline"] <= time.time():
            return None  # the relay has given up on it
        me = {"pid": os.getpid(), "start": process_start(os.getpid())}
        write_atomic(taken, json.dumps(me).encode())
        modules = _load(self.requests / f"{rid}.npz")
        return BridgeRequest(
            rid,
            info["kind"],
            info["cloud_round"],
            info["first"],
            info["last"],
            info["final"],
            info["deadline"],
            modules,
            info.get("shared", {}),
        )

    def reply(self, request: BridgeRequest, reply: BridgeReply) -> None:
        if reply.modules:
            write_atomic(self.replies / f"{request.id}.npz", _npz(reply.modules))
        info = {
            "weight": reply.weight,
            "metrics": reply.metrics,
            "failures": reply.failures,
            "error": reply.error,
            "modules": bool(reply.modules),
        }
        write_atomic(self.replies / f"{request.id}.json", json.dumps(info).encode())

    # -- the relay's side -----------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        cloud_round: int,
        first: int,
        last: int,
        final: bool,
        modules: Mapping[str, np.ndarray],
        deadline: float,
        shared: Mapping[str, Any] | None = None,
    ) -> str:
        """Hand the edge server a request; returns its id (they sort oldest first)."""
        if kind not in KINDS:
            raise ValueError(f"request kind {kind!r}; valid: {', '.join(KINDS)}")
        for d in (self.requests, self.accepted, self.replies):
            d.mkdir(parents=True, exist_ok=True)
        rid = f"{time.time_ns():020d}-c{cloud_round}-{kind}"
        write_atomic(self.requests / f"{rid}.npz", _npz(modules))
        info = {
            "kind": kind,
            "cloud_round": cloud_round,
            "first": first,
            "last": last,
            "final": final,
            "deadline": deadline,
            "shared": dict(shared or {}),
        }
        write_atomic(self.requests / f"{rid}.json", json.dumps(info).encode())
        return rid

    def wait(self, rid: str, deadline: float, what: str) -> BridgeReply:
        """The reply to request `rid`, waiting until `deadline` (time.time()). Raises
        EdgeUnavailable, naming `what` (e.g. "edge 1"), when the edge ServerApp that took it
        stopped, or when nobody answered in time."""
        while True:
            answer = self.replies / f"{rid}.json"
            if answer.exists():
                info = json.loads(answer.read_text())
                modules = _load(self.replies / f"{rid}.npz") if info["modules"] else {}
                return BridgeReply(
                    modules, info["weight"], info["metrics"], info["failures"], info["error"]
                )
            taken = self.accepted / f"{rid}.json"
            if taken.exists():
                server = json.loads(taken.read_text())
                if not alive(server["pid"], server.get("start", "")) and not answer.exists():
                    raise EdgeUnavailable(
                        f"{what}'s server (pid {server['pid']}) stopped while serving this request"
                    )
            if time.time() >= deadline:
                self._withdraw(rid)
                running = self.server_running()
                raise EdgeUnavailable(
                    f"{what} did not answer within the cloud round's deadline ("
                    + (
                        "its server is running but did not finish"
                        if running
                        else "no edge server is running: start the edge's run"
                    )  # fmt: skip
                    + ")"
                )
            time.sleep(POLL_S)

    def _withdraw(self, rid: str) -> None:
        """A request given up on is withdrawn (unless a server took it meanwhile)."""
        if not (self.accepted / f"{rid}.json").exists():
            for suffix in (".json", ".npz"):
                (self.requests / f"{rid}{suffix}").unlink(missing_ok=True)

    def server_running(self) -> bool:
        try:
            server = json.loads((self.dir / "server.json").read_text())
        except (OSError, ValueError):
            return False
        return alive(server["pid"], server.get("start", ""))
