"""The `gaisnet-peer` command line, parsed and checked without torch, gRPC or timm: `--help`
and a bad flag answer at once; only a peer that will serve loads them (`peer.py`)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gaisnet_flwr.deploy.addresses import check_address, loops_back, own_endpoints

DESCRIPTION = (
    "`gaisnet-peer`: a cluster member on its own device, holding one segment of the split chain."
)


@dataclass(frozen=True)
class PeerLimits:
    """What one peer holds for its callers at most (`gaisnet-peer --help` lists the flags)."""

    max_upload_mb: float = 2048.0  # one set of frozen weights (all its parts)
    max_upload_parts: int = 4096
    max_held_mb: float = 4096.0  # every stored and arriving set of frozen weights together
    upload_timeout_s: float = 120.0  # an unfinished upload with no part for this long is dropped
    session_idle_s: float = 300.0  # a session with no call for this long may be replaced

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_held_mb", "upload_timeout_s", "session_idle_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"peer limit {name} must be a finite number > 0, got {value}")
        if self.max_upload_parts < 1:
            raise ValueError(
                f"peer limit max_upload_parts must be >= 1, got {self.max_upload_parts}"
            )


def parse_args(
    argv: list[str] | None, check_device: Callable[[str], object] | None = None
) -> argparse.Namespace:
    """The flags, checked; `check_device` (torch's, from peer.py) also checks `--device`
    against this machine, which `main` leaves to the peer once torch is loaded."""
    parser = argparse.ArgumentParser(prog="gaisnet-peer", description=DESCRIPTION)
    parser.add_argument("--listen", required=True, help="host:port to serve on (port 0: any)")
    parser.add_argument(
        "--next", action="append", default=[], metavar="HOST:PORT[,HOST:PORT...]",
        help="the next member(s) of the chain this peer may call; none: an end point only",
    )  # fmt: skip
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC (trusted LAN)")
    parser.add_argument("--certfile", default="", help="TLS: this peer's certificate (PEM)")
    parser.add_argument("--keyfile", default="", help="TLS: this peer's private key (PEM)")
    parser.add_argument(
        "--ca-certfile", default="", help="TLS: CA that signed the other members' certificates"
    )
    parser.add_argument(
        "--require-client-cert", action="store_true", help="mutual TLS: callers must present one"
    )
    parser.add_argument("--max-message-mb", type=float, default=256.0)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="deadline of calls it makes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda or cuda:N (checked at start)"
    )
    defaults = PeerLimits()
    parser.add_argument(
        "--max-upload-mb", type=float, default=defaults.max_upload_mb,
        help="largest set of frozen weights one upload may bring (MB)",
    )  # fmt: skip
    parser.add_argument(
        "--max-upload-parts", type=int, default=defaults.max_upload_parts,
        help="most parts one upload of frozen weights may come in",
    )  # fmt: skip
    parser.add_argument(
        "--max-held-mb", type=float, default=defaults.max_held_mb,
        help="frozen weights held in memory at most, stored and arriving together (MB)",
    )  # fmt: skip
    parser.add_argument(
        "--upload-timeout-s", type=float, default=defaults.upload_timeout_s,
        help="an unfinished upload with no new part for this long is dropped",
    )  # fmt: skip
    parser.add_argument(
        "--session-idle-s", type=float, default=defaults.session_idle_s,
        help="a session with no call for this long may be replaced by another start point's",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.limits = PeerLimits(
            args.max_upload_mb, args.max_upload_parts, args.max_held_mb,
            args.upload_timeout_s, args.session_idle_s,
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    try:
        check_address(args.listen, listen=True)
        args.next = tuple(
            check_address(a.strip()) for text in args.next for a in text.split(",") if a.strip()
        )
        port = int(args.listen.rpartition(":")[2])
        looped = [a for a in args.next if port and loops_back(a, own_endpoints(args.listen, port))]
        if looped:
            raise ValueError(f"--next {looped[0]} is this peer's own --listen: a chain cannot loop")
    except ValueError as err:
        parser.error(str(err))
    tls = bool(args.certfile or args.keyfile)
    if tls == args.insecure:
        parser.error("choose TLS (--certfile and --keyfile) or --insecure")
    if tls and not (args.certfile and args.keyfile):
        parser.error("TLS needs both --certfile and --keyfile")
    if args.require_client_cert and not (tls and args.ca_certfile):
        parser.error("--require-client-cert needs TLS and --ca-certfile")
    for path in (args.certfile, args.keyfile, args.ca_certfile):
        if path and not Path(path).is_file():
            parser.error(f"file {path!r} does not exist")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if check_device is not None:
        try:
            check_device(args.device)
        except ValueError as err:
            parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gaisnet_flwr.deploy import peer  # torch, gRPC, timm: only for a peer that serves

    return peer.serve_args(args)


if __name__ == "__main__":
    sys.exit(main())
