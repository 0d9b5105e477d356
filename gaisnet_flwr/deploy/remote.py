"""D2D hops over the network: the calling side of a lab deployment's split chain (gRPC).

Flower's SuperNodes never talk to each other, so a cluster's members use a direct transport:
the start point (the SuperNode's ClientApp) calls peer 1, peer 1 calls peer 2, ..., the end
point computes the loss, and each response carries the gradient back one hop (paper Fig. 4).
Every node runs the same `chain.ChainNode`; only its hop is a `GrpcHop` instead of an
in-process one. The serving side is `peer.py` (the `gaisnet-peer` process).

Methods of the `gaisnet.Peer` service (unary calls, framed payloads from `link.pack_message`):
  Ping     -> the peer's protocol version, nothing else
  Open     one round's session: the peer's segment, its tunable modules, optimizer, next hop
           (one of the next members the peer was started with, never the peer itself; and the
           token of the next member's session); replies `need-weights` and an upload token when
           it lacks the frozen weights of that segment, else `ready` and the session's token
  Weights  the segment's frozen weights, keyed by their SHA-256, under that upload token (kept
           in the peer's memory)
  Train    smashed data + labels in, gradient of the smashed data out (the rest of the chain
           runs inside the call)
  Infer    smashed data in, logits out
  Close    the trained tunable modules and the session's counts out
Train, Infer and Close carry the session id and its token; the start point opens the members
from the end point backwards, so each member learns the token of the session it calls.

A peer that is down, too slow or refuses a message raises `PeerError` naming it; the cluster's
ClientApp turns that into an error reply, so only that cluster's contribution is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from gaisnet_flwr.deploy.addresses import check_address
from gaisnet_flwr.split.chain import Hop, OptimizerSpec, RemoteStats, StepResult
from gaisnet_flwr.split.link import (
    LinkError,
    LinkStats,
    pack_message,
    unpack_message,
    wire_bytes,
)
from gaisnet_flwr.split.plan import SplitPlan, node_names
from gaisnet_flwr.split.precision import FP32, Precision, to_wire
from gaisnet_flwr.split.segments import segment_parameters
from gaisnet_flwr.vit.model import PromptedViT

SERVICE = "gaisnet.Peer"
# 2: tensors keep their memory layout on the wire (split/link.py); 3: sessions have tokens;
# 4: a session has a precision and a smashed-data dtype (smashed data may travel as bf16 / fp16);
# 5: a peer dials only the next members it was configured with (`gaisnet-peer --next`); frozen
#    weights arrive under the upload token of the `Open` that asked for them; Ping tells only
#    the version
PROTOCOL_VERSION = 5
PROXIMAL_MU = "proximal-mu"  # an Open's FedProx mu (the peer reads it: deploy/peer.py)
MB = 2**20
# Trailing metadata on every refusal a gaisnet-peer answers itself: a failure without it came
# from the transport (nothing listening, a closed socket, a TLS mismatch, another server).
REFUSAL_KEY = "gaisnet-refusal"


class PeerError(RuntimeError):
    """A peer that could not be reached, timed out, or refused what it was sent. `where` names
    the member ("peer1 at host:port"); `transport` is true when no gaisnet-peer answered (the
    connection failed, or whatever listens there is not a peer)."""

    def __init__(self, message: str, where: str = "", transport: bool = False) -> None:
        super().__init__(message)
        self.where = where
        self.transport = transport


@dataclass(frozen=True)
class TransportSettings:
    """How a node talks to the next one: deadline, message-size limit and TLS.

    TLS: with `ca_certfile` the channel is encrypted and the peer's certificate is checked
    against that CA; `certfile` + `keyfile` add this node's own certificate (mutual TLS, for
    peers started with `--require-client-cert`). With none of them the channel is plaintext.
    """

    timeout_s: float = 60.0
    max_message_mb: float = 256.0
    ca_certfile: str = ""
    certfile: str = ""
    keyfile: str = ""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"peer timeout must be > 0 seconds, got {self.timeout_s}")
        if self.max_message_mb <= 0:
            raise ValueError(f"peer max message size must be > 0 MB, got {self.max_message_mb}")
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("a client certificate needs both certfile and keyfile")
        if self.certfile and not self.ca_certfile:
            raise ValueError("a client certificate (mutual TLS) needs ca_certfile as well")
        for path in (self.ca_certfile, self.certfile, self.keyfile):
            if path and not Path(path).is_file():
                raise ValueError(f"TLS file {path!r} does not exist")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * MB)

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]

    def channel(self, address: str) -> grpc.Channel:
        if not self.ca_certfile:
            return grpc.insecure_channel(address, options=self.options())
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_certfile).read_bytes(),
            private_key=Path(self.keyfile).read_bytes() if self.keyfile else None,
            certificate_chain=Path(self.certfile).read_bytes() if self.certfile else None,
        )
        return grpc.secure_channel(address, credentials, options=self.options())


@dataclass(frozen=True)
class PeerSettings:
    """A cluster's D2D members from the SuperNode's node-config, in chain order: the K peers
    and then the end point, e.g.

        flower-supernode ... --node-config 'partition-id=0 num-partitions=2
            peers="10.0.0.11:50051,10.0.0.12:50051,10.0.0.13:50051" peer-ca-certfile="ca.pem"'

    Keys: `peers` (required for a deployed cluster), `peer-timeout-s`, `peer-max-message-mb`,
    `peer-ca-certfile`, `peer-certfile`, `peer-keyfile`.
    """

    addresses: tuple[str, ...]
    transport: TransportSettings = field(default_factory=TransportSettings)

    KEYS = (
        "peers",
        "peer-timeout-s",
        "peer-max-message-mb",
        "peer-ca-certfile",
        "peer-certfile",
        "peer-keyfile",
    )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> PeerSettings | None:
        """None when the node has no `peers` (simulation: in-process peers)."""
        extra = sorted(k for k in node_config if k.startswith("peer") and k not in cls.KEYS)
        if extra:
            raise ValueError(f"unknown node-config key(s) {extra}; valid: {', '.join(cls.KEYS)}")
        text = str(node_config.get("peers", "")).strip()
        if not text:
            if len([k for k in node_config if k in cls.KEYS]):
                raise ValueError("peer-* node-config keys are set but 'peers' is empty")
            return None
        addresses = tuple(check_address(a.strip()) for a in text.split(","))
        repeated = sorted({a for a in addresses if addresses.count(a) > 1})
        if repeated:
            raise ValueError(
                f"peers={text!r} names {repeated} more than once: every member of the chain "
                "is its own gaisnet-peer process"
            )
        if len(addresses) < 2:
            raise ValueError(
                f"peers={text!r} names {len(addresses)} address; a cluster needs at least one "
                "peer and the end point, in chain order"
            )
        transport = TransportSettings(
            timeout_s=float(node_config.get("peer-timeout-s", 60.0)),
            max_message_mb=float(node_config.get("peer-max-message-mb", 256.0)),
            ca_certfile=str(node_config.get("peer-ca-certfile", "")),
            certfile=str(node_config.get("peer-certfile", "")),
            keyfile=str(node_config.get("peer-keyfile", "")),
        )
        return cls(addresses, transport)


class PeerClient:
    """Calls one peer: framed payloads, a deadline per call, gRPC errors as `PeerError`."""

    def __init__(self, name: str, address: str, transport: TransportSettings) -> None:
        self.name = name
        self.address = address
        self.transport = transport
        self._channel = transport.channel(address)

    def call(
        self,
        method: str,
        header: dict[str, Any],
        tensors: dict[str, torch.Tensor] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
        timeout = self.transport.timeout_s if timeout_s is None else timeout_s
        try:
            payload = stub(pack_message(header, tensors), timeout=max(timeout, 0.001))
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else str(err)
            trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
            refused = any(item[0] == REFUSAL_KEY for item in trailing or ())
            hint = ""
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                hint = f" (no answer within {timeout:.1f} s; see peer-timeout-s)"
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                hint = " (message too large; see peer-max-message-mb / --max-message-mb)"
            name = code.name if code else "ERROR"
            raise PeerError(
                f"{self.where}: {method} failed: {name}: {details}{hint}",
                self.where,
                transport=not refused,
            ) from err
        try:
            return unpack_message(payload)
        except LinkError as err:
            raise PeerError(f"{self.where}: malformed reply: {err}", self.where) from err

    @property
    def where(self) -> str:
        return f"{self.name} at {self.address}"

    def close(self) -> None:
        self._channel.close()


class GrpcHop:
    """The hop to the next device: one `Train` call per step carries the smashed data there
    (in `wire_dtype`, the session's smashed-data dtype) and brings the gradient back (in the
    same dtype, restored here to the smashed data's own). Counts what a link counts: the wire
    bytes of each serialized tensor, per direction. `on_failure` runs when a call fails (the
    start point releases its sessions on every member).
    """

    def __init__(
        self,
        client: PeerClient,
        session: str,
        token: str = "",
        on_failure: Callable[[], None] | None = None,
        wire_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.client = client
        self.session = session
        self.token = token
        self.on_failure = on_failure
        self.wire_dtype = wire_dtype
        self.stats = LinkStats()
        self.timeout_s: float | None = None  # a peer narrows it to its own caller's deadline

    @property
    def _ids(self) -> dict[str, str]:
        return {"session": self.session, "token": self.token}

    def _failed(self, err: PeerError) -> PeerError:
        if self.on_failure is not None:
            self.on_failure()
        return err

    def train(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, StepResult]:
        sent = to_wire(h.detach(), self.wire_dtype)
        self.stats.add("forward", wire_bytes(sent))
        where = f"{self.client.name} at {self.client.address}"
        try:
            header, tensors = self.client.call(
                "Train", self._ids, {"h": sent, "y": y}, self.timeout_s
            )
            grad = tensors.get("grad")
            if grad is not None:
                if grad.shape != h.shape or grad.dtype != sent.dtype:
                    raise PeerError(
                        f"{where} sent a gradient of shape {tuple(grad.shape)} {grad.dtype} for "
                        f"smashed data {tuple(h.shape)} {sent.dtype}"
                    )
                if not bool(torch.isfinite(grad).all()):
                    raise PeerError(f"{where} sent a gradient holding NaN or inf")
                self.stats.add("backward", wire_bytes(grad))
                grad = grad.to(device=h.device, dtype=h.dtype)
            try:
                loss, correct, n = float(header["loss"]), int(header["correct"]), int(header["n"])
            except (KeyError, TypeError, ValueError) as err:
                raise PeerError(f"{where}: malformed Train reply: {err!r}") from err
        except PeerError as err:
            raise self._failed(err) from err
        return grad, StepResult(loss, correct, n)

    def infer(self, h: torch.Tensor) -> torch.Tensor:
        sent = to_wire(h.detach(), self.wire_dtype)
        self.stats.add("forward", wire_bytes(sent))
        try:
            _, tensors = self.client.call("Infer", self._ids, {"h": sent}, self.timeout_s)
            if "logits" not in tensors or tensors["logits"].shape[0] != h.shape[0]:
                raise PeerError(f"{self.client.name} at {self.client.address} sent no logits for h")
        except PeerError as err:
            raise self._failed(err) from err
        return tensors["logits"].to(h.device)


def model_spec(model_kwargs: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """What a peer needs to build the architecture (never weights: those come separately)."""
    spec = {k: v for k, v in model_kwargs.items() if k not in ("pretrained", "checkpoint_path")}
    return {**spec, "num_classes": num_classes}


def segment_weights(model: PromptedViT, plan: SplitPlan, index: int) -> dict[str, torch.Tensor]:
    """Every parameter of segment `index`, under `model.state_dict()` names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p.detach() for p in segment_parameters(model, plan)[index]}


def segment_tunable_keys(model: PromptedViT, plan: SplitPlan, index: int) -> list[str]:
    """The tunable-state keys (`prompt.i`, `head.*`, ...) that segment `index` holds."""
    keys = {id(p): k for k, p in model.named_tunable_parameters()}
    return [keys[id(p)] for p in segment_parameters(model, plan)[index] if id(p) in keys]


def chunks(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict into parts of at most `max_bytes` of tensor data (a single larger
    tensor gets a part of its own and the size limit will say so)."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if parts[-1] and size + n > max_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = t
        size += n
    return parts


def weights_key(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes: a peer reuses weights only if identical."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class NetworkPeers:
    """The cluster's K peers and end point as remote processes (`chain.RemotePeers`).

    Args:
        settings: the members' addresses (chain order) and the transport.
        model_spec: how to build the architecture (`model_spec(model_kwargs(...), classes)`).
        optimizer: the segments' optimizer (each remote segment builds its own).
        precision: how each member computes and what dtype its hop carries smashed data in.
        members: the members' names in chain order (e.g. peer1, edge, end: the cluster's
            profile, where the edge server holds a segment and runs it as a `gaisnet-peer`);
            by default peer1 .. peerK, end.
    """

    def __init__(
        self,
        settings: PeerSettings,
        model_spec: dict[str, Any],
        optimizer: OptimizerSpec,
        precision: Precision = FP32,
        members: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.model_spec = model_spec
        self.optimizer = optimizer
        self.precision = precision
        self.members = tuple(members)
        self.session = ""
        self._clients: list[PeerClient] = []
        self._tokens: list[str] = []  # each member's session token ("" once released)
        self._plan: SplitPlan | None = None

    def open(self, model: PromptedViT, plan: SplitPlan, train: bool, proximal_mu: float) -> Hop:
        addresses = self.settings.addresses
        names = list(self.members) or node_names(plan.num_peers)[1:]
        if len(names) != plan.num_peers + 1:
            raise ValueError(f"{len(names)} member names for a plan of {plan.num_peers} peers")
        if len(addresses) != plan.num_peers + 1:
            fix = (
                " (the edge server's gaisnet-peer at its place)"
                if "edge" in names
                else f", or set peers-per-cluster={len(addresses) - 1}"
            )
            raise PeerError(
                f"node-config names {len(addresses)} D2D members (peers + end point) but the "
                f"cluster's chain after the start point is {' -> '.join(names)}: give "
                f"{len(names)} addresses in 'peers', in that order{fix}"
            )
        self.session = uuid.uuid4().hex
        self._plan = plan
        self._clients = [
            PeerClient(name, a, self.settings.transport)
            for name, a in zip(names, addresses, strict=True)
        ]
        self._tokens = [""] * len(self._clients)
        tunable = model.tunable_state()
        try:
            # From the end point backwards: each member is told the token of the next one's
            # session, which its hop must carry.
            for k in reversed(range(len(self._clients))):
                self._open_member(k, model, plan, tunable, train, proximal_mu)
        except BaseException:
            self.release()
            raise
        return GrpcHop(
            self._clients[0],
            self.session,
            self._tokens[0],
            on_failure=self.release,
            wire_dtype=self.precision.wire_dtype,
        )

    def _open_member(
        self,
        k: int,
        model: PromptedViT,
        plan: SplitPlan,
        tunable: dict[str, torch.Tensor],
        train: bool,
        proximal_mu: float,
    ) -> None:
        client, index = self._clients[k], k + 1  # segment 0 is the start point, here
        last = k + 1 == len(self._clients)
        weights = segment_weights(model, plan, index)
        header = {
            "version": PROTOCOL_VERSION,
            "session": self.session,
            "index": index,
            "name": client.name,
            "ranges": [list(r) for r in plan.ranges],
            "model": self.model_spec,
            "optimizer": asdict(self.optimizer),
            "train": train,
            PROXIMAL_MU: proximal_mu,
            "precision": self.precision.compute,
            "smashed-dtype": self.precision.smashed,
            "next": None if last else self.settings.addresses[k + 1],
            "next-token": None if last else self._tokens[k + 1],
            "weights-key": weights_key(weights),
        }
        modules = {key: tunable[key] for key in segment_tunable_keys(model, plan, index)}
        reply, _ = client.call("Open", header, modules)
        if reply.get("need-weights"):  # first session on this peer (or it restarted)
            parts = chunks(weights, self.settings.transport.max_message_bytes // 2)
            for i, part in enumerate(parts):
                key = {"weights-key": header["weights-key"], "upload": reply.get("upload"),
                       "part": i, "parts": len(parts)}  # fmt: skip
                client.call("Weights", key, part)
            reply, _ = client.call("Open", header, modules)
        token = reply.get("token")
        if not reply.get("ready") or not isinstance(token, str) or not token:
            raise PeerError(f"{client.name} at {client.address} did not open the session")
        self._tokens[k] = token

    def release(self) -> None:
        """Best effort, after a failure: close this cluster's session on every member that
        still holds it (so the next round can open one at once) and drop the channels."""
        for k, client in enumerate(self._clients):
            if self._tokens[k]:
                ids = {"session": self.session, "token": self._tokens[k]}
                with contextlib.suppress(PeerError):
                    client.call("Close", ids, timeout_s=min(self.settings.transport.timeout_s, 10))
                self._tokens[k] = ""
            client.close()

    def close(self, model: PromptedViT) -> RemoteStats:
        """Take every remote segment's trained modules back into `model`; collect counts."""
        assert self._plan is not None, "close() before open()"
        forward, backward, flops = [], [], {}
        try:
            for k, client in enumerate(self._clients):
                ids = {"session": self.session, "token": self._tokens[k]}
                header, modules = client.call("Close", ids)
                self._tokens[k] = ""
                try:
                    model.load_tunable_state(modules, strict=False)
                    flops[client.name] = int(header["flops"])
                    if client is not self._clients[-1]:  # the end point sends nothing onward
                        forward.append(int(header["bytes-forward"]))
                        backward.append(int(header["bytes-backward"]))
                except (KeyError, TypeError, ValueError) as err:  # ModelError is a ValueError
                    raise PeerError(f"{client.name} at {client.address} returned {err}") from err
                client.close()
        except BaseException:
            self.release()
            raise
        return RemoteStats(forward, backward, flops)
