"""Warm ClientApp processes for a deployed SuperNode: torch and timm imported once, not per message.

A Flower 1.42 SuperNode runs every message in a fresh `flwr-clientapp` process (its SuperExec
starts one per task, found on PATH; `flwr/supercore/superexec/executor/subprocess_executor.py`),
and a fine-tuning message's first work is importing torch, torchvision and timm: about 3.5 s of
CPU on this project's machine, more on a small device, paid again for every message. The lab's
rounds spent most of their time there (docs/deploy.md, "Warm ClientApp processes").

Two parts, a fork server in the spirit of Python's `multiprocessing` forkserver:

* `serve`: one long-lived process per machine imports the heavy *dependencies* (`PRELOAD`:
  installed packages, never the app's own code) and waits on a Unix socket.
* `shim`: a `flwr-clientapp` placed first on the SuperNode's PATH (`write_shim`). It hands its
  arguments, environment, working folder and standard streams (as file descriptors, over the
  socket) to the server, which forks a child that runs Flower's own `flwr-clientapp` main with
  them; the shim waits for the child's exit status and exits with it. If the server cannot be
  reached, the shim becomes the real `flwr-clientapp` (exec), so a SuperNode never depends on it.

The child then is the process Flower would have started, minus the import: Flower loads the app
from the FAB it installed (the app's code is not preloaded, so the FAB's version runs), the
child's `random` and NumPy global generators are reseeded from the OS as a fresh process's are,
and torch's generator is as a fresh process's after the same imports (importing consumes none
of it). Forking is safe because the server imports but computes nothing: no torch thread pool,
no gRPC channel, no thread of its own exists before a fork.

    gaisnet-warm-clientapp server --socket /run/gaisnet/clientapp.sock
    gaisnet-warm-clientapp shim --socket /run/gaisnet/clientapp.sock --dir ~/gaisnet-bin
    PATH=~/gaisnet-bin:$PATH flower-supernode ...   # its ClientApps now start warm
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path

# The dependencies a fine-tuning message imports (apps/cluster_node.py): ~95 % of its import time.
PRELOAD = ("numpy", "torch", "torchvision", "timm", "flwr.supernode.cli")
REQUEST_LIMIT = 1 << 20  # arguments and environment of one request, in bytes
STREAMS = 3  # stdin, stdout, stderr


# -- the server ---------------------------------------------------------------------------------
def serve(socket_path: Path, preload: tuple[str, ...] = PRELOAD) -> None:
    """Import `preload`, then fork one child per request on `socket_path` until SIGTERM."""
    for name in preload:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # only this user may have processes forked from it, from the start
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(umask)
    listener.listen(64)
    print(f"warm clientapp server: {', '.join(preload)} imported; on {socket_path}", flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            try:
                request, fds = receive_request(conn)
            except (OSError, ValueError) as err:  # a bad or vanished caller costs only itself
                print(f"warm clientapp server: request refused: {err}", flush=True)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                if os.fork() == 0:
                    listener.close()
                    run_child(conn, request, fds)  # never returns
            except OSError as err:  # no fork now: the caller sees its child die, the server goes on
                print(f"warm clientapp server: fork failed: {err}", flush=True)
            conn.close()
            for fd in fds:
                os.close(fd)
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)


def receive_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    """One request: a 4-byte length, that much JSON (argv, env, cwd), and the caller's three
    standard streams as file descriptors."""
    header, fds, _, _ = socket.recv_fds(conn, 4, STREAMS)
    try:
        if len(header) != 4 or len(fds) != STREAMS:
            raise ValueError("a request starts with its length and the caller's 3 standard streams")
        (size,) = struct.unpack("!I", header)
        if size > REQUEST_LIMIT:
            raise ValueError(f"request of {size} bytes (at most {REQUEST_LIMIT})")
        body = recv_exactly(conn, size)
        if body is None:
            raise ValueError("the caller left mid-request")
        request = json.loads(body)
        if not isinstance(request, dict) or not {"argv", "env", "cwd"} <= request.keys():
            raise ValueError("a request is a JSON object with argv, env and cwd")
    except (OSError, ValueError):
        for fd in fds:  # the caller's streams, which no child will take
            os.close(fd)
        raise
    return request, fds


def recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    """`size` bytes from `conn`; None if the other side closed it first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def run_child(conn: socket.socket, request: dict[str, object], fds: list[int]) -> None:
    """In the forked child: become the `flwr-clientapp` the shim was started as, report the exit
    status on `conn`, and exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a child of its own may be waited for
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})  # type: ignore[call-overload]
        os.chdir(str(request["cwd"]))
        reseed()
        sys.argv = ["flwr-clientapp", *map(str, request["argv"])]  # type: ignore[call-overload]
        from flwr.supernode.cli import flwr_clientapp

        flwr_clientapp()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # as an uncaught exception ends a process: its traceback, status 1
        traceback.print_exc()
    finally:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(struct.pack("!i", code))
        os._exit(code)


def reseed() -> None:
    """The global generators a fresh process seeds from the OS, seeded from the OS again (a
    forked child would otherwise share the server's draws with every sibling)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


# -- the shim -----------------------------------------------------------------------------------
def shim(socket_path: str, fallback: str, argv: list[str]) -> int:
    """Run `flwr-clientapp argv` in a child of the server at `socket_path`; exit as it does.
    Without a server there, exec `fallback` (the real `flwr-clientapp`) instead."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
    except OSError:
        conn.close()
        os.execv(fallback, [fallback, *argv])
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(body))], [0, 1, 2])
    conn.sendall(body)
    status = recv_exactly(conn, 4)
    if status is None:  # the child died without a word (killed): as a killed process would
        return 1
    return int(struct.unpack("!i", status)[0])


SHIM = """#!{python}
# flwr-clientapp, started warm (gaisnet_flwr/deploy/warm_clientapp.py); without the server at
# {socket}, the real one: {fallback}
import sys

from gaisnet_flwr.deploy.warm_clientapp import shim

sys.exit(shim({socket!r}, {fallback!r}, sys.argv[1:]))
"""


def write_shim(directory: Path, socket_path: Path, fallback: Path | None = None) -> Path:
    """`directory/flwr-clientapp`, the shim; put `directory` first on the SuperNode's PATH."""
    real = fallback or Path(sys.executable).parent / "flwr-clientapp"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "flwr-clientapp"
    text = SHIM.format(python=sys.executable, socket=str(socket_path), fallback=str(real))
    path.write_text(text)
    path.chmod(0o755)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gaisnet-warm-clientapp",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("what", choices=("server", "shim"), help="run the server; write the shim")
    parser.add_argument("--socket", type=Path, required=True, help="the server's Unix socket")
    parser.add_argument("--dir", type=Path, help="shim: the folder to write flwr-clientapp into")
    parser.add_argument(
        "--preload", default=",".join(PRELOAD), help="server: the modules to import once"
    )
    args = parser.parse_args(argv)
    if args.what == "shim":
        if args.dir is None:
            parser.error("shim needs --dir (the folder to put first on the SuperNode's PATH)")
        print(write_shim(args.dir, args.socket.resolve()))
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve(args.socket.resolve(), tuple(m for m in args.preload.split(",") if m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
