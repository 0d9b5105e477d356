"""`gaisnet-peer`: a cluster member on its own device, holding one segment of the split chain.

A peer is a middle member (a range of Transformer blocks and their prompts) or the end point
(the head), as the start point's split plan says when it opens a session (paper Fig. 4). It
serves the `gaisnet.Peer` gRPC service described in `remote.py` and runs the same
`chain.ChainNode` the simulation runs; its hop to the next member is a `GrpcHop`.

    gaisnet-peer --listen 0.0.0.0:50051 --insecure                  # a lab on a trusted network
    gaisnet-peer --listen 0.0.0.0:50051 --certfile peer.pem --keyfile peer.key --ca-certfile ca.pem

What it checks before doing any work with a message: the frame, the session, the dtype and
shape of the smashed data ([B, tokens, dim] float32 for its first block), labels in range, and
that the modules it is given are exactly its segment's. It keeps only its own segment's
weights in memory: the architecture is built on the meta device and only its slice is filled.
One cluster uses a peer at a time; a new session replaces a stale one (its start point died).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from gaisnet_flwr.deploy.remote import (
    PROTOCOL_VERSION,
    SERVICE,
    GrpcHop,
    PeerClient,
    PeerError,
    TransportSettings,
    check_address,
    segment_tunable_keys,
)
from gaisnet_flwr.split.chain import ChainNode, OptimizerSpec, Segment, build_segments
from gaisnet_flwr.split.link import LinkError, pack_message, unpack_message
from gaisnet_flwr.split.plan import SplitPlan, node_names
from gaisnet_flwr.vit.model import ModelError, PromptedViT, build_prompted_vit

log = logging.getLogger("gaisnet.peer")
WEIGHTS_KEPT = 2  # frozen-weight sets kept in memory (a restart of the run reuses them)


class Refused(Exception):
    """A request this peer will not serve: `code` and a message that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    """One cluster's round (or inference request) on this peer."""

    id: str
    name: str
    model: PromptedViT
    plan: SplitPlan
    index: int
    node: ChainNode
    hop: GrpcHop | None  # None at the end point
    tunable_keys: list[str]
    tokens: tuple[int, int]  # expected [tokens, dim] of what arrives
    train: bool
    steps: int = 0

    @property
    def segment(self) -> Segment:
        return self.node.segment


class PeerService:
    """The peer's state and request handlers (transport-free, so tests can call them)."""

    def __init__(self, transport: TransportSettings, device: str = "cpu") -> None:
        self.transport = transport
        self.device = torch.device(device)
        self.session: Session | None = None
        self._weights: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._pending: tuple[str, dict[str, torch.Tensor]] = ("", {})  # weights arriving in parts
        self._lock = threading.Lock()

    # -- handlers: header + tensors in, header + tensors out -------------------------------------
    def ping(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        return {"version": PROTOCOL_VERSION, "session": self.session.id if self.session else ""}, {}

    def weights(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        """One part of a segment's frozen weights (large segments come in several parts, each
        under the message-size limit); stored under their key once the last part is in."""
        key = str(header.get("weights-key", ""))
        part, parts = int(header.get("part", 0)), int(header.get("parts", 1))
        if not key or not tensors or not 0 <= part < parts:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "Weights needs a key, tensors and part < parts"
            )
        if part == 0:
            self._pending = (key, {})
        pending_key, received = self._pending
        if pending_key != key:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"part {part} of unknown weights")
        received.update({k: t.to(self.device) for k, t in tensors.items()})
        if part == parts - 1:
            self._weights[key] = received
            self._pending = ("", {})
            while len(self._weights) > WEIGHTS_KEPT:
                self._weights.popitem(last=False)
        return {"stored": key if part == parts - 1 else ""}, {}

    def open(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        if header.get("version") != PROTOCOL_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {header.get('version')} != this peer's {PROTOCOL_VERSION}",
            )
        key = str(header["weights-key"])
        if key not in self._weights:
            return {"need-weights": True, "ready": False}, {}
        try:
            plan = SplitPlan(
                int(sum(hi - lo for lo, hi in header["ranges"])),
                tuple((int(lo), int(hi)) for lo, hi in header["ranges"]),
            )
            index = int(header["index"])
            if not 1 <= index <= plan.num_peers + 1:
                raise ValueError(f"segment index {index} is not a peer or the end point")
            model = self._segment_model(header["model"], self._weights[key])
            optimizer = OptimizerSpec(**header["optimizer"]) if header["train"] else None
            factory = optimizer.factory() if optimizer else None
            (segment,) = build_segments(model, plan, factory, only=index)
            keys = segment_tunable_keys(model, plan, index)
            if sorted(tensors) != sorted(keys):
                raise ValueError(f"modules {sorted(tensors)} are not this segment's {keys}")
            model.load_tunable_state(tensors, strict=False)
            segment.set_proximal(float(header.get("proximal-mu", 0.0)))
        except (KeyError, TypeError, ValueError, ModelError) as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"cannot open session: {err}") from err
        hop = None
        if header.get("next"):
            name = node_names(plan.num_peers)[index + 1]
            client = PeerClient(name, check_address(str(header["next"])), self.transport)
            hop = GrpcHop(client, str(header["session"]))
        if self.session is not None:
            log.warning("session %s replaced by %s", self.session.id[:8], header["session"][:8])
            self._close_hop(self.session)
        self.session = Session(
            id=str(header["session"]),
            name=str(header.get("name", f"segment {index}")),
            model=model,
            plan=plan,
            index=index,
            node=ChainNode(segment, hop),
            hop=hop,
            tunable_keys=keys,
            tokens=(segment.spec.in_shape[0], segment.spec.in_shape[1]),
            train=bool(header["train"]),
        )
        role = "end point" if hop is None else f"blocks {plan.ranges[index - 1]}"
        log.info("session %s opened: %s, %s", self.session.id[:8], self.session.name, role)
        return {"ready": True}, {}

    def train_step(self, header: dict, tensors: dict, time_left: float | None) -> tuple[dict, dict]:
        session = self._session(header, train=True)
        h = self._smashed(session, tensors)
        y = tensors.get("y")
        classes = int(session.model.backbone.num_classes)
        if y is None or y.dtype != torch.int64 or tuple(y.shape) != (h.shape[0],):
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"labels must be int64 of shape ({h.shape[0]},), got "
                f"{None if y is None else (y.dtype, tuple(y.shape))}",
            )
        if y.numel() and not (int(y.min()) >= 0 and int(y.max()) < classes):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"labels must be in [0, {classes})")
        self._narrow_deadline(session, time_left)
        if session.steps == 0:
            log.info("session %s: first training step", session.id[:8])
        session.model.train()
        grad, result = session.node.train(h, y.to(self.device))
        session.steps += 1
        out = {"grad": grad} if grad is not None else {}
        return {"loss": result.loss, "correct": result.correct, "n": result.num_examples}, out

    def infer(self, header: dict, tensors: dict, time_left: float | None) -> tuple[dict, dict]:
        session = self._session(header, train=False)
        h = self._smashed(session, tensors)
        self._narrow_deadline(session, time_left)
        session.model.eval()
        with torch.no_grad():
            logits = session.node.infer(h)
        return {}, {"logits": logits}

    def close(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        session = self._session(header, train=None)
        state = session.model.tunable_state()
        modules = {k: state[k] for k in session.tunable_keys} if session.train else {}
        stats = session.hop.stats if session.hop else None
        reply = {
            "flops": session.segment.flops_done,
            "steps": session.steps,
            "bytes-forward": stats.bytes_forward if stats else 0,
            "bytes-backward": stats.bytes_backward if stats else 0,
        }
        log.info("session %s closed after %d steps", session.id[:8], session.steps)
        self._close_hop(session)
        self.session = None
        return reply, modules

    # -- helpers --------------------------------------------------------------------------------
    def _segment_model(self, spec: dict[str, Any], weights: dict[str, torch.Tensor]) -> PromptedViT:
        """The architecture on the meta device, with only this segment's weights filled in."""
        with torch.device("meta"):
            model = build_prompted_vit(**spec)
        # Frozen weights are shared by every session that uses them; trainable ones are copied,
        # since training writes into them.
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {k: t.clone() if k in trainable else t for k, t in weights.items()}
        unexpected = model.load_state_dict(weights, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise ValueError(f"weights {unexpected[:3]}... do not belong to model {spec}")
        return model

    def _session(self, header: dict, train: bool | None) -> Session:
        session = self.session
        if session is None or header.get("session") != session.id:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no open session {str(header.get('session'))[:8]} on this peer (it may have "
                "restarted or been taken by another cluster)",
            )
        if train is not None and train and not session.train:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "session was opened for inference")
        return session

    def _smashed(self, session: Session, tensors: dict) -> torch.Tensor:
        h = tensors.get("h")
        tokens, dim = session.tokens
        if (
            h is None
            or h.dtype != torch.float32
            or h.dim() != 3
            or tuple(h.shape[1:])
            != (
                tokens,
                dim,
            )
        ):
            got = None if h is None else f"{h.dtype} {tuple(h.shape)}"
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"smashed data must be float32 [B, {tokens}, {dim}], got {got}",
            )
        if h.shape[0] < 1:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "smashed data holds no samples")
        return h.to(self.device)

    def _narrow_deadline(self, session: Session, time_left: float | None) -> None:
        """The next hop must answer before our own caller gives up on us."""
        if session.hop is not None:
            limit = self.transport.timeout_s
            session.hop.timeout_s = limit if time_left is None else min(limit, time_left - 0.2)

    def _close_hop(self, session: Session) -> None:
        if session.hop is not None:
            session.hop.client.close()

    # -- gRPC glue ------------------------------------------------------------------------------
    def handler(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:  # one chain at a time: a step's calls are sequential anyway
                try:
                    header, tensors = unpack_message(request)
                    if method in ("Train", "Infer"):
                        fn = self.train_step if method == "Train" else self.infer
                        out_header, out = fn(header, tensors, context.time_remaining())
                    else:
                        out_header, out = getattr(self, method.lower())(header, tensors)
                except LinkError as err:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}")
                except Refused as err:
                    context.abort(err.code, str(err))
                except PeerError as err:  # the next hop failed: say which one
                    context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
                return pack_message(out_header, out)

        return handle


def serve(
    service: PeerService,
    address: str,
    credentials: grpc.ServerCredentials | None,
    max_workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (0 in `address` picks a free one)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=service.transport.options()
    )
    methods = ("Ping", "Open", "Weights", "Train", "Infer", "Close")
    handlers = {m: grpc.unary_unary_rpc_method_handler(service.handler(m)) for m in methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address} (address in use or not local)")
    server.start()
    return server, port


def server_credentials(
    certfile: str, keyfile: str, ca_certfile: str, require_client_cert: bool
) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(Path(keyfile).read_bytes(), Path(certfile).read_bytes())],
        root_certificates=Path(ca_certfile).read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gaisnet-peer", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--listen", required=True, help="host:port to serve on (port 0: any)")
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
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    args = parser.parse_args(argv)
    try:
        check_address(args.listen, listen=True)
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    transport = TransportSettings(
        timeout_s=args.timeout_s,
        max_message_mb=args.max_message_mb,
        ca_certfile=args.ca_certfile,
        # Mutual TLS: the same certificate identifies this peer when it calls the next one.
        certfile=args.certfile if args.ca_certfile else "",
        keyfile=args.keyfile if args.ca_certfile else "",
    )
    service = PeerService(transport, device=args.device)
    credentials = (
        server_credentials(args.certfile, args.keyfile, args.ca_certfile, args.require_client_cert)
        if args.certfile
        else None
    )
    try:
        server, port = serve(service, args.listen, credentials)
    except (OSError, RuntimeError) as err:
        print(f"gaisnet-peer: error: {err}", file=sys.stderr)
        return 1
    host = args.listen.rpartition(":")[0]
    print(f"gaisnet-peer listening on {host}:{port} ({'TLS' if credentials else 'insecure'})")
    sys.stdout.flush()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    with contextlib.suppress(Exception):
        server.stop(grace=1.0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
