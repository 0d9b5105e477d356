"""`gaisnet-peer`: a cluster member on its own device, holding one segment of the split chain.

A peer is a middle member (a range of Transformer blocks and their prompts) or the end point
(the head), as the start point's split plan says when it opens a session (paper Fig. 4). It
serves the `gaisnet.Peer` gRPC service described in `remote.py` and runs the same
`chain.ChainNode` the simulation runs; its hop to the next member is a `GrpcHop`.

    gaisnet-peer --listen 0.0.0.0:50051 --next 10.0.0.12:50051 --insecure   # a trusted LAN
    gaisnet-peer --listen 0.0.0.0:50051 --next 10.0.0.12:50051 --certfile peer.pem \
                 --keyfile peer.key --ca-certfile ca.pem --require-client-cert  # mutual TLS
    gaisnet-peer --listen 0.0.0.0:50051 --insecure        # an end point: it dials no one

A peer dials only its chain: the next members it may call come from its own `--next`, never
from a caller. An `Open` whose `next` is not one of them is refused (PERMISSION_DENIED), as is
one whose `next` is the peer itself (a loop would wait on its own lock); a peer without `--next`
serves as an end point only. When the next member fails, the caller is told so in one message
whatever the reason (nothing listening, a closed socket, a TLS mismatch, another server): the
details stay in this peer's log, so a caller cannot probe the network through it.

It refuses by contract: every request is checked before any work is done with it, and a
refusal is INVALID_ARGUMENT (malformed: the frame, a header field, a shape, a dtype, a
non-finite number, a model spec out of bounds), FAILED_PRECONDITION (the peer's state does not
allow it: no such session, busy with another one, weights it lacks), PERMISSION_DENIED (a
session's token does not match) or RESOURCE_EXHAUSTED (an upload over its limits), each with a
message that names the problem. Anything unexpected is logged here and answered INTERNAL with a
short reason; nothing reaches the caller as UNKNOWN.

A session belongs to the start point that opened it: `Open` returns a token that every later
call of that session must carry, and nobody else's `Open` replaces a live session until it has
been idle for `--session-idle-s`. Model specs name a timm ViT and its shape within stated
bounds (`SPEC_BOUNDS`), never files or downloads: the frozen weights always come from the start
point. An `Open` on weights the peer lacks reserves room for exactly that segment's tensors and
answers an upload token; `Weights` parts must carry it, and each tensor must be one of the
segment's, in its shape and dtype, finite; the whole must hash to its SHA-256 key. Nobody else
can touch an upload, and a timer drops it once no part has come for `--upload-timeout-s`. The
tunable modules an `Open` brings must be the model's dtype (float32) and finite. The peer keeps
only its own segment's weights in memory: the architecture is built on the meta device and only
its slice is filled. `Ping` answers the protocol version and nothing about sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import math
import re
import secrets
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from timm.models import is_model_in_modules

from gaisnet_flwr.config import option_of
from gaisnet_flwr.deploy import peer_cli
from gaisnet_flwr.deploy.addresses import check_address, endpoint, loops_back, own_endpoints
from gaisnet_flwr.deploy.peer_cli import PeerLimits
from gaisnet_flwr.deploy.remote import (
    MB,
    PROTOCOL_VERSION,
    PROXIMAL_MU,
    REFUSAL_KEY,
    SERVICE,
    GrpcHop,
    PeerClient,
    PeerError,
    TransportSettings,
    segment_tunable_keys,
    segment_weights,
    weights_key,
)
from gaisnet_flwr.split.chain import OPTIMIZERS, ChainNode, OptimizerSpec, Segment, build_segments
from gaisnet_flwr.split.link import LinkError, pack_message, unpack_message
from gaisnet_flwr.split.plan import SplitPlan, node_names
from gaisnet_flwr.split.precision import PRECISIONS, SMASHED_DTYPES, Precision, non_finite, to_wire
from gaisnet_flwr.split.segments import segment_parameters
from gaisnet_flwr.vit.families import TIMM_MODULES
from gaisnet_flwr.vit.model import (
    MAX_PATCHES,
    MODES,
    SHAPE_LIMITS,
    PromptedViT,
    build_prompted_vit,
)

log = logging.getLogger("gaisnet.peer")
WEIGHTS_KEPT = 2  # frozen-weight sets kept in memory (a restart of the run reuses them)

# What a model spec may hold, and its bounds (inclusive). No paths, no download flags: the
# frozen weights come from the start point. A spec without a shape key takes the registered
# model's own, which is checked against the same bounds once built (on the meta device).
SPEC_BOUNDS: dict[str, tuple[int, int]] = {
    "num_classes": (1, 100_000),
    "num_prompts": (0, SHAPE_LIMITS["num_prompts"]),
    "img_size": (1, SHAPE_LIMITS["img_size"]),
    "patch_size": (1, SHAPE_LIMITS["img_size"]),
    "depth": (1, SHAPE_LIMITS["depth"]),
    "embed_dim": (1, SHAPE_LIMITS["embed_dim"]),
    "num_heads": (1, SHAPE_LIMITS["num_heads"]),
}
SPEC_KEYS = ("model_name", "mode", *SPEC_BOUNDS)
VIT_MODULES = list(TIMM_MODULES)  # timm modules whose models PromptedViT runs
MAX_ID_CHARS = 128  # session ids and names
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Refused(Exception):
    """A request this peer will not serve: `code` and a message that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class Session:
    """One cluster's round (or inference request) on this peer."""

    id: str
    token: str  # from `Open`; every later call of the session carries it
    weights: str  # the key of the frozen weights it runs on (never evicted while it lives)
    name: str
    model: PromptedViT
    plan: SplitPlan
    index: int
    node: ChainNode
    hop: GrpcHop | None  # None at the end point
    tunable_keys: list[str]
    tokens: tuple[int, int]  # expected [tokens, dim] of what arrives
    train: bool
    precision: Precision = field(default_factory=Precision)
    steps: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def segment(self) -> Segment:
        return self.node.segment


@dataclass
class Upload:
    """A segment's frozen weights arriving in parts, for the `Open` that asked for them."""

    token: str  # answered by that `Open`; every part carries it
    key: str  # the SHA-256 key the tensors must hash to
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]  # the segment's tensors
    nbytes: int  # what they take: reserved in --max-held-mb from the start
    parts: int | None = None  # set by part 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    done: int = 0  # parts received
    last: float = field(default_factory=time.monotonic)


# -- header fields: each checked for type and range, refusals name the method and the key --------
def _get(header: dict, key: str, method: str) -> Any:
    if key not in header:
        raise invalid(f"{method}: the header lacks {key!r}")
    return header[key]


def _int(header: dict, key: str, method: str, lo: int, hi: int, default: int | None = None) -> int:
    value = header.get(key, default) if default is not None else _get(header, key, method)
    if type(value) is not int or not lo <= value <= hi:
        raise invalid(f"{method}: {key!r} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _float(header: dict, key: str, method: str, lo: float, hi: float, default: float) -> float:
    value = header.get(key, default)
    if type(value) not in (int, float) or not (math.isfinite(value) and lo <= value <= hi):
        raise invalid(
            f"{method}: {key!r} must be a finite number in [{lo}, {hi}], got {value!r:.80}"
        )
    return float(value)


def _str(header: dict, key: str, method: str, default: str | None = None) -> str:
    value = header.get(key, default) if default is not None else _get(header, key, method)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise invalid(
            f"{method}: {key!r} must be a string of 1 to {MAX_ID_CHARS} characters, "
            f"got {value!r:.80}"
        )
    return value


def _weights_key(header: dict, method: str) -> str:
    key = _get(header, "weights-key", method)
    if not isinstance(key, str) or not _HEX64.fullmatch(key):
        raise invalid(f"{method}: 'weights-key' must be a SHA-256 hex digest, got {key!r:.80}")
    return key


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_model_spec(spec: Any) -> dict[str, Any]:
    """A model spec a peer builds: known keys only (no paths, no download flags), a timm ViT,
    integer shapes within `SPEC_BOUNDS` that timm can build (heads divide the width, the patch
    divides the image)."""
    if not isinstance(spec, dict):
        raise invalid(f"Open: 'model' must be an object, got {type(spec).__name__}")
    extra = sorted(str(k) for k in spec if k not in SPEC_KEYS)
    if extra:
        raise invalid(
            f"Open: model spec key(s) {extra} are not accepted (a peer builds only the "
            f"architecture; its frozen weights come from the start point); valid: "
            f"{', '.join(SPEC_KEYS)}"
        )
    name = spec.get("model_name")
    if (
        not isinstance(name, str)
        or len(name) > MAX_ID_CHARS
        or not is_model_in_modules(name, VIT_MODULES)
    ):
        raise invalid(f"Open: model_name {name!r:.80} is not a timm ViT (modules {VIT_MODULES})")
    mode = spec.get("mode", "vpt-deep")
    if mode not in MODES:
        raise invalid(f"Open: model mode {mode!r:.80} is not one of {', '.join(MODES)}")
    for key, (lo, hi) in SPEC_BOUNDS.items():
        if key in spec:
            value = spec[key]
            if type(value) is not int or not lo <= value <= hi:
                raise invalid(
                    f"Open: model {key} must be an integer in [{lo}, {hi}], got {value!r:.80}"
                )
    if "num_classes" not in spec:
        raise invalid("Open: the model spec lacks num_classes")
    if "embed_dim" in spec and "num_heads" in spec and spec["embed_dim"] % spec["num_heads"]:
        raise invalid(
            f"Open: model num_heads={spec['num_heads']} does not divide "
            f"embed_dim={spec['embed_dim']}"
        )
    if "img_size" in spec and "patch_size" in spec:
        img, patch = spec["img_size"], spec["patch_size"]
        if img % patch:
            raise invalid(f"Open: model patch_size={patch} does not divide img_size={img}")
        if (img // patch) ** 2 > MAX_PATCHES:
            raise invalid(
                f"Open: model img_size={img} / patch_size={patch} gives "
                f"{(img // patch) ** 2} patches; at most {MAX_PATCHES}"
            )
    return {"mode": mode, **spec}


def compute_buffers(model: PromptedViT, device: torch.device) -> None:
    """Make the model's non-persistent buffers on `device`: rotary-embedding tables, relative-
    position indices, EVA's zero key bias. They follow from the architecture alone, so the start
    point never sends them; timm computes them in `init_non_persistent_buffers`."""
    persistent = set(model.state_dict())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name not in persistent:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            module.register_buffer(leaf, torch.empty_like(buffer, device=device), persistent=False)
    for module in model.modules():
        init = getattr(module, "init_non_persistent_buffers", None)
        if callable(init):
            init()


def check_built(model: PromptedViT) -> None:
    """The bounds again on what was built (a spec may leave shapes to the registered model)."""
    backbone = model.backbone
    got = {
        "depth": model.depth,
        "embed_dim": int(backbone.embed_dim),
        "num_patches": model.num_patches,
    }
    bounds = {
        "depth": SPEC_BOUNDS["depth"][1],
        "embed_dim": SPEC_BOUNDS["embed_dim"][1],
        "num_patches": MAX_PATCHES,
    }
    over = [f"{k}={v} > {bounds[k]}" for k, v in got.items() if v > bounds[k]]
    if over:
        raise invalid(f"Open: the model is too large for a peer: {', '.join(over)}")


def _bounds(name: str) -> tuple[float, float]:
    option = option_of(name)
    assert option.low is not None and option.high is not None
    return float(option.low), float(option.high)


def check_optimizer(spec: Any) -> OptimizerSpec:
    if (
        not isinstance(spec, dict)
        or not {"name", "lr"} <= set(spec)
        or not set(spec) <= {"name", "lr", "momentum", "weight_decay"}
    ):
        raise invalid("Open: 'optimizer' must be {name, lr[, momentum, weight_decay]}")
    if spec["name"] not in OPTIMIZERS:
        raise invalid(f"Open: optimizer {spec['name']!r:.80} is not one of {', '.join(OPTIMIZERS)}")
    # The run-config's bounds (config.py declares them once): a peer takes what a run can send.
    lr = _float(spec, "lr", "Open: optimizer", *_bounds("lr"), 0.0)
    momentum = _float(spec, "momentum", "Open: optimizer", *_bounds("momentum"), 0.0)
    decay = _float(spec, "weight_decay", "Open: optimizer", *_bounds("weight_decay"), 0.0)
    if lr <= 0 or momentum >= 1:
        raise invalid(
            f"Open: optimizer needs lr > 0 and momentum < 1, got lr={lr}, momentum={momentum}"
        )
    return OptimizerSpec(spec["name"], lr, momentum, decay)


def check_precision(header: dict) -> Precision:
    """The session's compute precision and smashed-data dtype (fp32 when not given)."""
    compute = header.get("precision", "fp32")
    smashed = header.get("smashed-dtype", "fp32")
    if compute not in PRECISIONS:
        raise invalid(f"Open: 'precision' {compute!r:.40} is not one of {', '.join(PRECISIONS)}")
    if smashed not in SMASHED_DTYPES:
        raise invalid(
            f"Open: 'smashed-dtype' {smashed!r:.40} is not one of {', '.join(SMASHED_DTYPES)}"
        )
    return Precision(compute, smashed)


def check_device(text: str) -> torch.device:
    """A `--device` this machine has: cpu, cuda or cuda:N (N below the GPU count)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {text!r} is not a torch device (e.g. cpu, cuda:0)") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: a peer runs on cpu or cuda[:N], not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text!r} but no CUDA device is available here (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {text!r} but this machine has {count} CUDA device(s): "
                f"cuda:0..cuda:{count - 1}"
            )
    return device


def check_ranges(value: Any) -> SplitPlan:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= SPEC_BOUNDS["depth"][1]
        or not all(
            isinstance(r, list) and len(r) == 2 and all(type(b) is int for b in r) for r in value
        )
    ):
        raise invalid("Open: 'ranges' must be a list of [start, stop] integer pairs (one per peer)")
    try:
        return SplitPlan(int(value[-1][1]), tuple((lo, hi) for lo, hi in value))
    except ValueError as err:
        raise invalid(f"Open: 'ranges' is not a split plan: {err}") from err


class PeerService:
    """The peer's state and request handlers (transport-free, so tests can call them).

    `next_members` are the addresses this peer may call as the next member of a chain (its
    `--next`); `serve` tells it its own address, so that a loop back to itself is refused too.
    """

    def __init__(
        self,
        transport: TransportSettings,
        device: str | torch.device = "cpu",
        limits: PeerLimits | None = None,
        next_members: tuple[str, ...] = (),
    ) -> None:
        self.transport = transport
        self.device = check_device(device) if isinstance(device, str) else device
        self.limits = limits or PeerLimits()
        self.session: Session | None = None
        self._weights: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._uploads: dict[str, Upload] = {}  # by upload token: frozen weights arriving
        self._timer: threading.Timer | None = None  # drops uploads that stopped arriving
        self._lock = threading.Lock()
        self._own: set[tuple[str, int]] = set()  # this peer's own endpoints, once serving
        self.next_members: dict[tuple[str, int], str] = {}
        self.allow_next(next_members)

    # -- its place in the chain ------------------------------------------------------------------
    def allow_next(self, addresses: tuple[str, ...]) -> None:
        """The next members this peer may call (its own configuration, never a caller's)."""
        members = {endpoint(a): a for a in addresses}
        looped = [a for a in members.values() if loops_back(a, self._own)]
        if looped:
            raise ValueError(f"--next {looped[0]} is this peer itself: a chain cannot loop")
        self.next_members = members

    def serving_at(self, address: str, port: int) -> None:
        """Learn this peer's own endpoints (`own_endpoints`), once it listens on `port`."""
        self._own = own_endpoints(address, port)
        self.allow_next(tuple(self.next_members.values()))

    def is_self(self, address: str) -> bool:
        return loops_back(address, self._own)

    def close_service(self) -> None:
        """Stop the upload timer (the process is ending)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # -- handlers: header + tensors in, header + tensors out -------------------------------------
    def ping(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        """The protocol version, and nothing else (no session, no state)."""
        extra = sorted(str(k) for k in header if k != "version")
        if extra or tensors:
            raise invalid(
                f"Ping: takes an empty header (or 'version') and no tensors, got key(s) "
                f"{extra[:5]} and {len(tensors)} tensor(s)"
            )
        return {"version": PROTOCOL_VERSION}, {}

    def weights(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        """One part of a segment's frozen weights, under the upload token its `Open` answered
        (large segments come in several parts, each under the message-size limit, in order);
        stored under their key once the last part is in and they hash to it."""
        limits = self.limits
        token = _str(header, "upload", "Weights")
        key = _weights_key(header, "Weights")
        parts = _int(header, "parts", "Weights", 1, limits.max_upload_parts, default=1)
        part = _int(header, "part", "Weights", 0, parts - 1, default=0)
        upload = self._uploads.get(token)
        if upload is None or not hmac.compare_digest(token.encode(), upload.token.encode()):
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Weights: no upload under way for this token ({key[:12]}): an Open that lacks "
                f"the weights answers one; unfinished uploads are dropped after "
                f"{limits.upload_timeout_s:g} s",
            )
        if upload.key != key:
            raise invalid(f"Weights: this upload is of weights {upload.key[:12]}, not {key[:12]}")
        if upload.parts is None and part == 0:
            upload.parts = parts
        if parts != upload.parts or part != upload.done:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Weights: expected part {upload.done} of {upload.parts or parts} for "
                f"{key[:12]}, got part {part} of {parts}",
            )
        if not tensors:
            raise invalid("Weights: the message carries no tensors")
        try:
            self._check_part(upload, tensors)
        except Refused:
            self._drop(upload)  # a malformed part spoils the whole upload
            raise
        upload.tensors.update({k: t.to(self.device) for k, t in tensors.items()})
        upload.last = time.monotonic()
        upload.done = part + 1
        if part < parts - 1:
            return {"stored": ""}, {}
        self._drop(upload)
        missing = sorted(set(upload.expected) - set(upload.tensors))
        if missing:
            raise invalid(
                f"Weights: the upload of {key[:12]} ended without {len(missing)} of the "
                f"segment's tensors: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
            )
        if weights_key(upload.tensors) != key:
            raise invalid(
                f"Weights: the {len(upload.tensors)} tensors do not hash to their key {key[:12]}"
            )
        self._weights[key] = upload.tensors
        self._weights.move_to_end(key)
        pinned = self.session.weights if self.session else ""
        while len(self._weights) > WEIGHTS_KEPT:
            evictable = [k for k in self._weights if k not in (key, pinned)]
            if not evictable:
                break
            del self._weights[evictable[0]]
        return {"stored": key}, {}

    def _check_part(self, upload: Upload, tensors: dict[str, torch.Tensor]) -> None:
        """Each tensor one of the segment's, not sent before, in its shape and dtype, finite."""
        for name, tensor in tensors.items():
            if name not in upload.expected:
                raise invalid(
                    f"Weights: tensor {name[:80]!r} is not one of this segment's frozen weights; "
                    "upload dropped"
                )
            if name in upload.tensors:
                raise invalid(f"Weights: tensor {name!r} arrived twice; upload dropped")
            shape, dtype = upload.expected[name]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise invalid(
                    f"Weights: tensor {name!r} is {_dtype_name(tensor.dtype)} "
                    f"{tuple(tensor.shape)}, the segment's {_dtype_name(dtype)} {shape}; "
                    "upload dropped"
                )
        bad = non_finite(tensors)
        if bad:
            raise invalid(f"Weights: tensor(s) {bad[:3]} hold NaN or inf; upload dropped")

    def open(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        if header.get("version") != PROTOCOL_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Open: protocol version {header.get('version')!r:.20} != this peer's "
                f"{PROTOCOL_VERSION} (update gaisnet-flwr on the start point or the peer)",
            )
        session_id = _str(header, "session", "Open")
        name = _str(header, "name", "Open", default="peer")
        key = _weights_key(header, "Open")
        plan = check_ranges(_get(header, "ranges", "Open"))
        index = _int(header, "index", "Open", 1, plan.num_peers + 1)
        spec = check_model_spec(_get(header, "model", "Open"))
        train = _get(header, "train", "Open")
        if not isinstance(train, bool):
            raise invalid(f"Open: 'train' must be true or false, got {train!r:.80}")
        optimizer = check_optimizer(_get(header, "optimizer", "Open")) if train else None
        precision = check_precision(header)
        mu = _float(header, PROXIMAL_MU, "Open", 0.0, 1e6, 0.0)
        last = index == plan.num_peers + 1
        next_address, next_token = header.get("next"), header.get("next-token")
        if last != (next_address is None):
            raise invalid(
                f"Open: segment {index} of {plan.num_peers + 1} "
                + (
                    "is the end point: 'next' must be null"
                    if last
                    else "needs the 'next' member's address"
                )
            )
        if not last:
            self._check_next(str(next_address)[:300])
            _str(header, "next-token", "Open")
        bad = non_finite(tensors)
        if bad:
            raise invalid(f"Open: module(s) {bad[:3]} hold NaN or inf")
        self._check_free(session_id)
        model = self._meta_model(spec)
        if plan.num_blocks != model.depth:
            raise invalid(
                f"Open: 'ranges' cover {plan.num_blocks} blocks, the model has {model.depth}"
            )
        keys = segment_tunable_keys(model, plan, index)
        if sorted(tensors) != sorted(keys):
            raise invalid(f"Open: modules {sorted(tensors)[:8]} are not this segment's {keys}")
        self._check_modules(model, tensors)
        if key not in self._weights:
            return self._start_upload(key, segment_weights(model, plan, index))
        self._fill(model, spec, self._weights[key])
        self._check_complete(model, plan, index, key)
        try:
            model.load_tunable_state(tensors, strict=False)
            (segment,) = build_segments(
                model,
                plan,
                optimizer.factory() if optimizer else None,
                only=index,
                precision=precision,
            )
        except (ValueError, RuntimeError) as err:  # ModelError: shapes; torch: size mismatch
            raise invalid(f"Open: cannot open session: {str(err).splitlines()[0][:300]}") from err
        segment.set_proximal(mu)
        hop = None
        if not last:
            client = PeerClient(
                node_names(plan.num_peers)[index + 1], str(next_address), self.transport
            )
            hop = GrpcHop(client, session_id, str(next_token), wire_dtype=precision.wire_dtype)
        if self.session is not None:
            log.warning("session %s (idle) replaced by %s", self.session.id[:8], session_id[:8])
            self._close_hop(self.session)
        self.session = Session(
            id=session_id,
            token=secrets.token_hex(16),
            weights=key,
            name=name,
            model=model,
            plan=plan,
            index=index,
            node=ChainNode(segment, hop),
            hop=hop,
            tunable_keys=keys,
            tokens=(segment.spec.in_shape[0], segment.spec.in_shape[1]),
            train=train,
            precision=precision,
        )
        self._weights.move_to_end(key)
        role = "end point" if hop is None else f"blocks {plan.ranges[index - 1]}"
        log.info("session %s opened: %s, %s", session_id[:8], name, role)
        return {"ready": True, "token": self.session.token}, {}

    def train_step(self, header: dict, tensors: dict, time_left: float | None) -> tuple[dict, dict]:
        session = self._session(header, "Train")
        if not session.train:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, "Train: session was opened for inference"
            )
        h = self._smashed(session, tensors, "Train")
        y = tensors.get("y")
        classes = int(session.model.backbone.num_classes)
        if y is None or y.dtype != torch.int64 or tuple(y.shape) != (h.shape[0],):
            raise invalid(
                f"Train: labels must be int64 of shape ({h.shape[0]},), got "
                f"{None if y is None else (y.dtype, tuple(y.shape))}"
            )
        if not (int(y.min()) >= 0 and int(y.max()) < classes):
            raise invalid(f"Train: labels must be in [0, {classes})")
        self._narrow_deadline(session, time_left)
        if session.steps == 0:
            log.info("session %s: first training step", session.id[:8])
        session.model.train()
        grad, result = session.node.train(h, y.to(self.device))
        session.steps += 1
        session.last_used = time.monotonic()
        if not math.isfinite(result.loss) or (grad is not None and non_finite({"grad": grad})):
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Train: step {session.steps} of session {session.id[:8]} diverged (loss "
                f"{result.loss}, or a non-finite gradient); lower the learning rate",
            )
        # The gradient travels back in the session's smashed-data dtype, as the data came.
        out = {"grad": to_wire(grad, session.precision.wire_dtype)} if grad is not None else {}
        return {"loss": result.loss, "correct": result.correct, "n": result.num_examples}, out

    def infer(self, header: dict, tensors: dict, time_left: float | None) -> tuple[dict, dict]:
        session = self._session(header, "Infer")
        h = self._smashed(session, tensors, "Infer")
        self._narrow_deadline(session, time_left)
        session.model.eval()
        with torch.no_grad():
            logits = session.node.infer(h)
        session.last_used = time.monotonic()
        return {}, {"logits": logits}

    def close(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        session = self._session(header, "Close")
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
        bad = non_finite(modules)
        if bad:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Close: trained module(s) {bad[:3]} hold NaN or inf; session closed without them",
            )
        return reply, modules

    # -- helpers --------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> None:
        """Drop every unfinished upload that stopped arriving (a live session stays until
        another `Open` finds it idle for `session_idle_s`). The upload timer calls it."""
        now = time.monotonic() if now is None else now
        for upload in list(self._uploads.values()):
            if now - upload.last >= self.limits.upload_timeout_s:
                log.warning(
                    "unfinished upload of %s dropped after %.0f s",
                    upload.key[:12],
                    now - upload.last,
                )
                self._drop(upload)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self.expire()
            self._schedule()

    def _schedule(self) -> None:
        """Arm the timer for the upload that will time out first (the caller holds the lock)."""
        if self._timer is not None or not self._uploads:
            return
        first = min(u.last for u in self._uploads.values())
        due = first + self.limits.upload_timeout_s - time.monotonic()
        self._timer = threading.Timer(max(due, 0.0) + 0.01, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _drop(self, upload: Upload) -> None:
        self._uploads.pop(upload.token, None)

    def _start_upload(
        self, key: str, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict]:
        """Reserve room for exactly the segment's frozen tensors and answer an upload token."""
        limits = self.limits
        expected = {k: (tuple(t.shape), t.dtype) for k, t in weights.items()}
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        if nbytes > limits.max_upload_mb * MB:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Open: the segment's frozen weights take {nbytes / MB:.1f} MB, over this peer's "
                f"--max-upload-mb {limits.max_upload_mb:g}",
            )
        if not self._make_room(nbytes):
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Open: the segment's frozen weights ({nbytes / MB:.1f} MB) do not fit in this "
                f"peer's --max-held-mb {limits.max_held_mb:g} next to the open session's and "
                f"the uploads under way",
            )
        upload = Upload(secrets.token_hex(16), key, expected, nbytes)
        self._uploads[upload.token] = upload
        self._schedule()
        return {"need-weights": True, "ready": False, "upload": upload.token}, {}

    def _held_bytes(self, keys: list[str]) -> int:
        stored = sum(t.numel() * t.element_size() for k in keys for t in self._weights[k].values())
        return stored + sum(u.nbytes for u in self._uploads.values())

    def _make_room(self, arriving: int) -> bool:
        """Evict stored weights (oldest first, never the open session's) until `arriving`
        more bytes fit in `max_held_mb` next to the uploads under way (never dropped here)."""
        limit = self.limits.max_held_mb * MB
        pinned = self.session.weights if self.session else ""
        while self._held_bytes(list(self._weights)) + arriving > limit:
            evictable = [k for k in self._weights if k != pinned]
            if not evictable:
                return False
            del self._weights[evictable[0]]
        return True

    def _check_next(self, address: str) -> None:
        """`next` is one of this peer's own next members, and not the peer itself."""
        try:
            check_address(address)
        except ValueError as err:
            raise invalid(f"Open: 'next' {err}") from err
        if self.is_self(address):
            raise invalid(
                f"Open: 'next' {address} is this peer itself: a chain cannot loop back to its "
                "own member"
            )
        if endpoint(address) not in self.next_members:
            allowed = ", ".join(self.next_members.values())
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Open: 'next' {address} is not a next member of this peer; it dials only its "
                + (
                    f"chain's ({allowed}, from its --next)"
                    if allowed
                    else "chain, and was started without --next: it serves as an end point only"
                ),
            )

    def _check_free(self, session_id: str) -> None:
        """A live session belongs to whoever opened it until it has been idle too long."""
        live = self.session
        if live is None:
            return
        if live.id == session_id:
            raise Refused(
                grpc.StatusCode.ALREADY_EXISTS, f"Open: session {session_id[:8]} is already open"
            )
        idle = time.monotonic() - live.last_used
        if idle <= self.limits.session_idle_s:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Open: this peer is busy with session {live.id[:8]} ({live.name}), idle "
                f"{idle:.0f} s; it can be replaced after {self.limits.session_idle_s:.0f} s idle",
            )

    def _meta_model(self, spec: dict[str, Any]) -> PromptedViT:
        """The architecture on the meta device (no memory), its size checked."""
        try:
            with torch.device("meta"):
                model = build_prompted_vit(**spec)
        except Exception as err:  # timm's assertions and errors: the spec is what is wrong
            reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise invalid(f"Open: timm cannot build model spec {spec}: {reason}") from err
        check_built(model)
        return model

    def _check_modules(self, model: PromptedViT, tensors: dict[str, torch.Tensor]) -> None:
        """The tunable modules an `Open` brings are the model's own dtype (float32): a float64
        module would be rounded (1e300 becomes inf) and an integer one is not a module."""
        own = dict(model.named_tunable_parameters())
        for key, tensor in tensors.items():
            want = own[key]
            if tensor.dtype != want.dtype or tuple(tensor.shape) != tuple(want.shape):
                raise invalid(
                    f"Open: module {key!r} is {_dtype_name(tensor.dtype)} "
                    f"{tuple(tensor.shape)}; this session's modules are "
                    f"{_dtype_name(want.dtype)} {tuple(want.shape)}"
                )

    def _fill(
        self, model: PromptedViT, spec: dict[str, Any], weights: dict[str, torch.Tensor]
    ) -> None:
        """Fill only this segment's weights into the meta-device model."""
        expected = model.state_dict(keep_vars=True)
        unexpected = sorted(k for k in weights if k not in expected)
        if unexpected:
            raise invalid(f"Open: weights {unexpected[:3]} do not belong to model {spec}")
        wrong = [
            f"{k}: {tuple(t.shape)} {t.dtype}, the model's "
            f"{tuple(expected[k].shape)} {expected[k].dtype}"
            for k, t in weights.items()
            if t.shape != expected[k].shape or t.dtype != expected[k].dtype
        ]
        if wrong:
            raise invalid(f"Open: weights do not fit the model: {'; '.join(wrong[:3])}")
        # Frozen weights are shared by every session that uses them; trainable ones are copied,
        # since training writes into them.
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {k: t.clone() if k in trainable else t for k, t in weights.items()}
        model.load_state_dict(weights, strict=False, assign=True)
        compute_buffers(model, self.device)

    def _check_complete(self, model: PromptedViT, plan: SplitPlan, index: int, key: str) -> None:
        """Every parameter of the segment came with its weights (none left on the meta device)."""
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [names[id(p)] for p in segment_parameters(model, plan)[index] if p.is_meta]
        if missing:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Open: weights {key[:12]} lack {len(missing)} of segment {index}'s tensors: "
                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
                "(send them with Weights)",
            )

    def _session(self, header: dict, method: str) -> Session:
        session = self.session
        given = header.get("session")
        if session is None or given != session.id:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no open session {str(given)[:8]} on this peer for {method} (it may have "
                "restarted, or the session expired and was replaced)",
            )
        token = header.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), session.token.encode()
        ):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method}: session {session.id[:8]} belongs to the start point that opened it "
                "(missing or wrong token)",
            )
        session.last_used = time.monotonic()
        return session

    def _smashed(self, session: Session, tensors: dict, method: str) -> torch.Tensor:
        h = tensors.get("h")
        tokens, dim = session.tokens
        wire = session.precision.wire_dtype
        if h is None or h.dtype != wire or h.dim() != 3 or tuple(h.shape[1:]) != (tokens, dim):
            got = None if h is None else f"{h.dtype} {tuple(h.shape)}"
            raise invalid(
                f"{method}: smashed data must be {str(wire).removeprefix('torch.')} "
                f"[B, {tokens}, {dim}] (the session's smashed-dtype), got {got}"
            )
        if h.shape[0] < 1:
            raise invalid(f"{method}: smashed data holds no samples (an empty batch)")
        if not bool(torch.isfinite(h).all()):
            raise invalid(f"{method}: smashed data holds NaN or inf")
        # On this peer's device, back in float32 (the residual stream's dtype) to compute on.
        return h.to(device=self.device, dtype=torch.float32)

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
            try:
                if method == "Ping":  # answers while a long step holds the lock
                    return pack_message(*self.ping(*unpack_message(request)))
                with self._lock:  # one chain at a time: a step's calls are sequential anyway
                    header, tensors = unpack_message(request)
                    if method in ("Train", "Infer"):
                        fn = self.train_step if method == "Train" else self.infer
                        out_header, out = fn(header, tensors, context.time_remaining())
                    else:
                        out_header, out = getattr(self, method.lower())(header, tensors)
                    return pack_message(out_header, out)
            except LinkError as err:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}"
            except Refused as err:
                code, message = err.code, str(err)
            except PeerError as err:  # the next hop failed: say which one
                code, message = grpc.StatusCode.UNAVAILABLE, str(err)
                if err.transport:  # the same words whatever is (or is not) at that port
                    log.warning("%s: the next member failed: %s", method, err)
                    message = (
                        f"{err.where}: {method} failed: no answer from a gaisnet-peer there "
                        "(not running, unreachable, or too slow); see this peer's log"
                    )
            except Exception as err:  # a bug, or a case no check foresaw: never UNKNOWN
                log.exception("%s failed", method)
                first = str(err).splitlines()[0][:200] if str(err) else ""
                code = grpc.StatusCode.INTERNAL
                message = (
                    f"{method} failed inside the peer: {type(err).__name__}: {first} "
                    "(see the peer's log)"
                )
            # ASCII and bounded: header strings a caller sent may hold anything. The metadata
            # tells the caller that a gaisnet-peer, not the transport, answered.
            context.set_trailing_metadata(((REFUSAL_KEY, code.name.lower()),))
            context.abort(code, message[:2000].encode("ascii", "backslashreplace").decode())
            raise AssertionError("unreachable: context.abort raises")

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
    service.serving_at(address, port)  # refuses a --next that is this peer itself
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
    """`gaisnet-peer`'s flags, `--device` checked against this machine too."""
    return peer_cli.parse_args(argv, check_device)


def main(argv: list[str] | None = None) -> int:
    return peer_cli.main(argv)  # one entry point: flags checked, then serve_args


def serve_args(args: argparse.Namespace) -> int:
    """Serve as the parsed flags say, until SIGTERM or SIGINT."""
    try:
        check_device(args.device)
    except ValueError as err:
        print(f"gaisnet-peer: error: {err}", file=sys.stderr)
        return 2
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
    service = PeerService(transport, device=args.device, limits=args.limits, next_members=args.next)
    credentials = (
        server_credentials(args.certfile, args.keyfile, args.ca_certfile, args.require_client_cert)
        if args.certfile
        else None
    )
    try:
        server, port = serve(service, args.listen, credentials)
    except (OSError, RuntimeError, ValueError) as err:  # ValueError: --next loops back
        print(f"gaisnet-peer: error: {err}", file=sys.stderr)
        return 1
    host = args.listen.rpartition(":")[0]
    dials = f"dials {', '.join(args.next)}" if args.next else "an end point: dials no one"
    print(
        f"gaisnet-peer listening on {host}:{port} ({'TLS' if credentials else 'insecure'}; {dials})"
    )
    sys.stdout.flush()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    service.close_service()
    with contextlib.suppress(Exception):
        server.stop(grace=1.0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
