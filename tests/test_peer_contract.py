"""A `gaisnet-peer` refuses by contract (issue 17): every malformed request gets a status code
that says what is wrong (INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED,
RESOURCE_EXHAUSTED, ALREADY_EXISTS) and a message naming the problem, never UNKNOWN; sessions
belong to the start point that opened them; uploads are bounded; model specs carry no paths.

The peers are real gRPC servers (`peer.serve`) on loopback in this process's threads, driven
with raw framed payloads where a well-behaved client could not even send the request. The last
test is a seeded fuzz run over every method.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from gaisnet_flwr.deploy.peer import (
    PeerLimits,
    PeerService,
    parse_args,
    serve,
    server_credentials,
)
from gaisnet_flwr.deploy.pki import make_lab_pki
from gaisnet_flwr.deploy.remote import (
    PROTOCOL_VERSION,
    SERVICE,
    NetworkPeers,
    PeerClient,
    PeerError,
    PeerSettings,
    TransportSettings,
    model_spec,
    segment_tunable_keys,
    segment_weights,
    weights_key,
)
from gaisnet_flwr.experiments import lab as lab_script
from gaisnet_flwr.split.chain import OptimizerSpec, SplitChain
from gaisnet_flwr.split.link import pack_message
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.vit.model import PromptedViT, build_prompted_vit

# A small ViT: 32 px, patch 8 (16 patches + class token), width 32, 2 blocks; one peer holds
# both blocks, the end point the head.
KWARGS: dict[str, Any] = dict(
    model_name="vit_tiny_patch16_224",
    mode="vpt-deep",
    num_prompts=2,
    img_size=32,
    patch_size=8,
    depth=2,
    embed_dim=32,
    num_heads=2,
)
CLASSES = 10
PLAN = SplitPlan(2, ((0, 2),))
TOKENS = 17
SPEC = model_spec(KWARGS, CLASSES)
OPTIMIZER = OptimizerSpec("sgd", lr=0.1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
# What a refusal must never carry: a traceback or a path into the libraries.
LEAK = re.compile(r'Traceback|File "|site-packages|\.py", line|torch/|timm/|numpy/')


def tiny_model(seed: int = 0) -> PromptedViT:
    torch.manual_seed(seed)
    return build_prompted_vit(num_classes=CLASSES, **KWARGS)


@dataclass
class Peers:
    """A peer (blocks 0-1) and an end point on loopback, with their services."""

    services: list[PeerService]
    servers: list[grpc.Server]
    addresses: list[str]

    def network(self, timeout_s: float = 20) -> NetworkPeers:
        settings = PeerSettings(tuple(self.addresses), TransportSettings(timeout_s=timeout_s))
        return NetworkPeers(settings, SPEC, OPTIMIZER)

    def raw(self, member: int, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
        """One call with `payload` as it is; (status code, details)."""
        with grpc.insecure_channel(self.addresses[member]) as channel:
            try:
                channel.unary_unary(f"/{SERVICE}/{method}")(payload, timeout=20)
            except grpc.RpcError as err:
                return err.code(), err.details()  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, ""

    def call(
        self, member: int, method: str, header: dict[str, Any], tensors: dict | None = None
    ) -> tuple[grpc.StatusCode, str]:
        return self.raw(member, method, pack_message(header, tensors))


def start_peers(limits: PeerLimits | None = None, n: int = 2) -> Peers:
    services = [PeerService(TransportSettings(timeout_s=20), limits=limits) for _ in range(n)]
    servers, addresses = [], []
    for service in services:
        server, port = serve(service, "127.0.0.1:0", None)
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    for service, successor in zip(services, addresses[1:], strict=False):
        service.allow_next((successor,))  # each dials only the next member (--next)
    return Peers(services, servers, addresses)


@pytest.fixture
def peers() -> Iterator[Peers]:
    running = start_peers()
    yield running
    for server in running.servers:
        server.stop(0)


def open_header(source: PromptedViT, index: int = 1, /, **changes: Any) -> dict[str, Any]:
    """A valid `Open` header for member `index` (1: the peer, 2: the end point)."""
    header = {
        "version": PROTOCOL_VERSION,
        "session": "s-" + str(index),
        "index": index,
        "name": "peer1" if index == 1 else "end",
        "ranges": [list(r) for r in PLAN.ranges],
        "model": SPEC,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
        "train": True,
        "proximal-mu": 0.0,
        "next": None,
        "next-token": None,
        "weights-key": weights_key(segment_weights(source, PLAN, index)),
    }
    return {**header, **changes}


def modules(model: PromptedViT, index: int) -> dict[str, torch.Tensor]:
    state = model.tunable_state()
    return {k: state[k] for k in segment_tunable_keys(model, PLAN, index)}


def ask_upload(peers: Peers, member: int, header: dict[str, Any], tensors: dict) -> str:
    """`Open` on weights the peer lacks: the upload token it answers."""
    client = PeerClient(f"m{member}", peers.addresses[member], TransportSettings(timeout_s=20))
    reply, _ = client.call("Open", header, tensors)
    client.close()
    assert reply == {"need-weights": True, "ready": False, "upload": reply["upload"]}, reply
    return str(reply["upload"])


def ship(peers: Peers, model: PromptedViT, index: int, session: str = "s-2") -> None:
    """The segment's frozen weights to member `index` in one part, as the start point does:
    an `Open` that lacks them answers an upload token, the part carries it (nothing to do
    when the peer holds them already)."""
    if weights_key(segment_weights(model, PLAN, index)) in peers.services[index - 1]._weights:
        return
    header = open_header(model, index, session=session)
    if index == 1:
        header.update({"next": peers.addresses[1], "next-token": "t"})
    token = ask_upload(peers, index - 1, header, modules(model, index))
    weights = segment_weights(model, PLAN, index)
    key = {"weights-key": weights_key(weights), "upload": token, "part": 0, "parts": 1}
    assert peers.call(index - 1, "Weights", key, weights) == (grpc.StatusCode.OK, "")


def open_end(peers: Peers, model: PromptedViT, session: str = "s-2") -> dict[str, str]:
    """Open a training session on the end point; its ids (session and token)."""
    ship(peers, model, 2, session)
    client = PeerClient("end", peers.addresses[1], TransportSettings(timeout_s=20))
    reply, _ = client.call("Open", open_header(model, 2, session=session), modules(model, 2))
    client.close()
    assert reply["ready"] and reply["token"]
    return {"session": session, "token": reply["token"]}


def smashed(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"h": torch.randn(batch, TOKENS, 32), "y": torch.zeros(batch, dtype=torch.int64)}


def frame(header: bytes, *blobs: bytes) -> bytes:
    """A framed message from a raw JSON header (which must list the blobs)."""
    return struct.pack("<I", len(header)) + header + b"".join(blobs)


def tensor_blob(code: int, ndim_byte: int, shape: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack("<BB", code, ndim_byte) + struct.pack(f"<{len(shape)}q", *shape) + data


def assert_refused(got: tuple[grpc.StatusCode, str], code: grpc.StatusCode, fragment: str) -> None:
    status, details = got
    assert status == code and fragment in details, got
    assert not LEAK.search(details), details


# -- the eight cases of the issue ---------------------------------------------------------------
def test_a_json_header_nested_200000_deep_is_invalid(peers: Peers) -> None:
    head = b"[" * 200_000 + b"]" * 200_000
    assert_refused(peers.raw(0, "Open", frame(head)), INVALID, "JSON nested too deeply")


def test_a_tensor_shape_of_minus_one_is_invalid(peers: Peers) -> None:
    blob = tensor_blob(0, 2, (-1, -1), b"\0\0\0\0")
    head = json.dumps({"session": "x", "tensors": [["h", len(blob)]]}).encode()
    assert_refused(peers.raw(0, "Train", frame(head, blob)), INVALID, "has a negative size")


def test_a_tensor_header_claiming_255_dims_is_invalid(peers: Peers) -> None:
    blob = struct.pack("<BB", 0, 255) + b"\1" * 4096
    head = json.dumps({"session": "x", "tensors": [["h", len(blob)]]}).encode()
    assert_refused(
        peers.raw(0, "Train", frame(head, blob)), INVALID, "claims 127 dimensions; at most 16"
    )


def test_an_empty_tensor_of_overflowing_size_is_invalid(peers: Peers) -> None:
    blob = tensor_blob(0, 2, (0, 2**62), b"")
    head = json.dumps({"session": "x", "tensors": [["h", len(blob)]]}).encode()
    assert_refused(peers.raw(0, "Train", frame(head, blob)), INVALID, "is too large")


def test_open_without_a_weights_key_is_invalid(peers: Peers) -> None:
    header = open_header(tiny_model())
    del header["weights-key"]
    assert_refused(peers.call(1, "Open", header), INVALID, "Open: the header lacks 'weights-key'")


def test_weights_with_part_abc_is_invalid(peers: Peers) -> None:
    key = {"weights-key": "0" * 64, "upload": "u", "part": "abc", "parts": 2}
    assert_refused(
        peers.call(0, "Weights", key, {"w": torch.zeros(2)}),
        INVALID,
        "Weights: 'part' must be an integer in [0, 1], got 'abc'",
    )


def test_a_model_spec_never_carries_a_path_or_a_download_flag(peers: Peers, tmp_path: Path) -> None:
    model = tiny_model()
    existing = tmp_path / "weights.pt"
    existing.write_bytes(b"x")
    answers = []
    for extra in (
        {"checkpoint_path": "/nonexistent/weights.pt"},
        {"checkpoint_path": str(existing)},  # answered exactly like a missing file
    ):
        got = peers.call(1, "Open", open_header(model, 2, model={**SPEC, **extra}))
        assert_refused(got, INVALID, "model spec key(s) ['checkpoint_path'] are not accepted")
        answers.append(got)
    assert answers[0] == answers[1]
    got = peers.call(1, "Open", open_header(model, 2, model={**SPEC, "pretrained": True}))
    assert_refused(got, INVALID, "model spec key(s) ['pretrained'] are not accepted")


def test_open_with_next_not_an_address_is_invalid(peers: Peers) -> None:
    header = open_header(tiny_model(), 1, next="not-an-address", **{"next-token": "t"})
    assert_refused(
        peers.call(0, "Open", header), INVALID, "'next' peer address 'not-an-address' is not"
    )


def test_an_empty_batch_is_invalid(peers: Peers) -> None:
    ids = open_end(peers, tiny_model())
    empty = {"h": torch.zeros(0, TOKENS, 32), "y": torch.zeros(0, dtype=torch.int64)}
    assert_refused(peers.call(1, "Train", ids, empty), INVALID, "smashed data holds no samples")
    assert_refused(
        peers.call(1, "Infer", ids, {"h": torch.zeros(0, TOKENS, 32)}), INVALID, "no samples"
    )


# -- accepted before, refused now ---------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_smashed_data_holding_nan_or_inf_is_refused(peers: Peers, value: float) -> None:
    ids = open_end(peers, tiny_model())
    data = smashed()
    data["h"][1, 3, 5] = value
    assert_refused(peers.call(1, "Train", ids, data), INVALID, "smashed data holds NaN or inf")
    assert_refused(
        peers.call(1, "Infer", ids, {"h": data["h"]}), INVALID, "smashed data holds NaN or inf"
    )
    # Nothing was trained on it: a clean step still works.
    assert peers.call(1, "Train", ids, smashed())[0] == grpc.StatusCode.OK


def test_a_non_finite_gradient_is_refused_by_the_caller(peers: Peers, monkeypatch) -> None:
    model = tiny_model()
    net = peers.network()
    chain = SplitChain(model, PLAN, OPTIMIZER.factory(), remote=net)
    end = peers.services[1]
    real = end.train_step

    def poisoned(header: dict, tensors: dict, time_left: float | None) -> tuple[dict, dict]:
        out_header, out = real(header, tensors, time_left)
        return out_header, {"grad": torch.full_like(out["grad"], math.nan)}

    monkeypatch.setattr(end, "train_step", poisoned)
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(PeerError, match="UNAVAILABLE: end at .* sent a gradient holding NaN"):
        chain.train_step(x, y)
    # The failed step released the cluster's sessions on both members.
    assert [s.session for s in peers.services] == [None, None]


def test_an_upload_missing_some_of_the_segments_tensors_names_them(peers: Peers) -> None:
    model = tiny_model()
    weights = segment_weights(model, PLAN, 1)
    dropped = [k for k in weights if ".blocks.1.mlp." in k]  # in the segment's order
    partial = {k: t for k, t in weights.items() if k not in dropped}
    header = open_header(model, 1, next=peers.addresses[1], **{"next-token": "t"})
    token = ask_upload(peers, 0, header, modules(model, 1))
    key = {"weights-key": header["weights-key"], "upload": token, "part": 0, "parts": 1}
    got = peers.call(0, "Weights", key, partial)
    assert_refused(got, INVALID, f"ended without {len(dropped)} of the segment's tensors: ")
    assert dropped[0] in got[1] and peers.services[0]._weights == {}


def test_weights_that_do_not_hash_to_their_key_or_hold_nan_are_refused(peers: Peers) -> None:
    model = tiny_model()
    weights = segment_weights(model, PLAN, 2)
    header = open_header(model, 2, **{"weights-key": "a" * 64})  # not these weights' key
    token = ask_upload(peers, 1, header, modules(model, 2))
    key = {"weights-key": "a" * 64, "upload": token, "part": 0, "parts": 1}
    assert_refused(peers.call(1, "Weights", key, weights), INVALID, "do not hash to their key")
    bad = {k: v.clone() for k, v in weights.items()}
    next(iter(bad.values())).view(-1)[0] = math.nan
    token = ask_upload(peers, 1, open_header(model, 2), modules(model, 2))
    key = {"weights-key": weights_key(weights), "upload": token, "part": 0, "parts": 1}
    assert_refused(peers.call(1, "Weights", key, bad), INVALID, "hold NaN or inf; upload dropped")
    assert peers.services[1]._weights == {} and peers.services[1]._uploads == {}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"depth": 1500}, "model depth must be an integer in [1, 48], got 1500"),
        ({"img_size": 10**9}, "model img_size must be an integer in [1, 1024]"),
        ({"embed_dim": 10**9}, "model embed_dim must be an integer in [1, 4096]"),
        ({"num_prompts": 10**9}, "model num_prompts must be an integer in [0, 1024]"),
        ({"num_classes": 0}, "model num_classes must be an integer in [1, 100000]"),
        ({"depth": 2.5}, "model depth must be an integer"),
        ({"num_heads": 5}, "num_heads=5 does not divide embed_dim=32"),
        ({"patch_size": 7}, "patch_size=7 does not divide img_size=32"),
        ({"img_size": 1024, "patch_size": 2}, "gives 262144 patches; at most 4096"),
        ({"model_name": "resnet18"}, "model_name 'resnet18' is not a timm ViT"),
        ({"model_name": "vit_nope"}, "model_name 'vit_nope' is not a timm ViT"),
        ({"mode": "nope"}, "model mode 'nope' is not one of"),
        ({"class_token": False}, "model spec key(s) ['class_token'] are not accepted"),
    ],
)
def test_model_specs_are_bounded(peers: Peers, change: dict, fragment: str) -> None:
    started = time.monotonic()
    got = peers.call(1, "Open", open_header(tiny_model(), 2, model={**SPEC, **change}))
    assert_refused(got, INVALID, fragment)
    assert time.monotonic() - started < 2.0  # refused before building anything


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"version": 3}, f"protocol version 3 != this peer's {PROTOCOL_VERSION}"),
        ({"precision": "fp8"}, "'precision' 'fp8' is not one of fp32, tf32, bf16"),
        ({"smashed-dtype": "int8"}, "'smashed-dtype' 'int8' is not one of fp32, bf16, fp16"),
        ({"index": 3}, "'index' must be an integer in [1, 2], got 3"),
        ({"ranges": [[0, 1], [2, 3]]}, "'ranges' is not a split plan"),
        ({"ranges": "all"}, "'ranges' must be a list of [start, stop] integer pairs"),
        ({"train": "yes"}, "'train' must be true or false"),
        ({"proximal-mu": math.nan}, "'proximal-mu' must be a finite number"),
        ({"optimizer": {"name": "sgd", "lr": math.inf}}, "'lr' must be a finite number"),
        ({"optimizer": {"name": "lion", "lr": 0.1}}, "optimizer 'lion' is not one of"),
        ({"session": ""}, "'session' must be a string of 1 to 128 characters"),
        ({"weights-key": "../../etc/passwd"}, "'weights-key' must be a SHA-256 hex digest"),
        ({"next": "127.0.0.1:1"}, "is the end point: 'next' must be null"),
    ],
)
def test_open_headers_are_checked_field_by_field(peers: Peers, change: dict, fragment: str) -> None:
    code = PRECONDITION if "version" in change else INVALID
    assert_refused(peers.call(1, "Open", open_header(tiny_model(), 2, **change)), code, fragment)


def test_non_finite_modules_in_open_are_refused(peers: Peers) -> None:
    model = tiny_model()
    ship(peers, model, 2)
    poisoned = {k: torch.full_like(v, math.inf) for k, v in modules(model, 2).items()}
    got = peers.call(1, "Open", open_header(model, 2), poisoned)
    assert_refused(got, INVALID, "hold NaN or inf")


# -- sessions belong to whoever opened them -----------------------------------------------------
def test_a_session_needs_its_token_and_cannot_be_taken_over(peers: Peers) -> None:
    model = tiny_model()
    ids = open_end(peers, model, session="owner")
    for method in ("Train", "Infer", "Close"):
        got = peers.call(1, method, {"session": "owner", "token": "guess"}, smashed())
        assert_refused(got, grpc.StatusCode.PERMISSION_DENIED, "missing or wrong token")
        got = peers.call(1, method, {"session": "owner"}, smashed())
        assert_refused(got, grpc.StatusCode.PERMISSION_DENIED, "belongs to the start point")
        got = peers.call(1, method, {"session": "owner", "token": "\udc80"}, smashed())
        assert_refused(got, grpc.StatusCode.PERMISSION_DENIED, "wrong token")
    # Another start point's Open does not replace it; the same session id cannot open twice.
    got = peers.call(1, "Open", open_header(model, 2, session="intruder"), modules(model, 2))
    assert_refused(got, PRECONDITION, "busy with session owner (end)")
    got = peers.call(1, "Open", open_header(model, 2, session="owner"), modules(model, 2))
    assert_refused(got, grpc.StatusCode.ALREADY_EXISTS, "session owner is already open")
    # The owner still trains and closes.
    assert peers.call(1, "Train", ids, smashed())[0] == grpc.StatusCode.OK
    assert peers.call(1, "Close", ids)[0] == grpc.StatusCode.OK


def test_an_idle_session_expires_and_can_then_be_replaced() -> None:
    running = start_peers(PeerLimits(session_idle_s=0.3))
    try:
        model = tiny_model()
        stale = open_end(running, model, session="crashed")
        time.sleep(0.5)
        fresh = open_end(running, model, session="next-round")
        assert running.services[1].session is not None
        assert running.services[1].session.id == "next-round"
        assert_refused(running.call(1, "Train", stale, smashed()), PRECONDITION, "no open session")
        assert running.call(1, "Train", fresh, smashed())[0] == grpc.StatusCode.OK
    finally:
        for server in running.servers:
            server.stop(0)


def test_a_failed_step_releases_the_clusters_sessions(peers: Peers) -> None:
    model = tiny_model()
    chain = SplitChain(model, PLAN, OPTIMIZER.factory(), remote=peers.network())
    assert all(s.session is not None for s in peers.services)
    with pytest.raises(PeerError, match="labels must be in"):
        chain.train_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 99]))
    assert [s.session for s in peers.services] == [None, None]
    # So the next round opens at once.
    chain = SplitChain(model, PLAN, OPTIMIZER.factory(), remote=peers.network())
    chain.train_step(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
    chain.close()


# -- uploads are bounded ------------------------------------------------------------------------
def test_uploads_are_bounded_per_session_and_expire_by_a_timer() -> None:
    limits = PeerLimits(max_upload_mb=1.0, max_upload_parts=4, upload_timeout_s=0.3)
    running = start_peers(limits, n=2)
    service = running.services[1]
    model = tiny_model()
    weights = segment_weights(model, PLAN, 2)
    try:
        # A segment larger than --max-upload-mb is refused at Open: nothing is reserved.
        big = open_header(model, 2, model={**SPEC, "num_classes": 10_000})
        head = {"head.weight": torch.zeros(10_000, 32), "head.bias": torch.zeros(10_000)}
        got = running.call(1, "Open", big, head)
        assert_refused(got, grpc.StatusCode.RESOURCE_EXHAUSTED, "over this peer's --max-upload-mb")
        assert service._uploads == {}
        token = ask_upload(running, 1, open_header(model, 2), modules(model, 2))
        (upload,) = service._uploads.values()
        assert upload.nbytes == sum(t.numel() * t.element_size() for t in weights.values())
        key = {"weights-key": weights_key(weights), "upload": token}
        got = running.call(1, "Weights", {**key, "part": 0, "parts": 5}, weights)
        assert_refused(got, INVALID, "'parts' must be an integer in [1, 4], got 5")
        got = running.call(1, "Weights", {**key, "part": 1, "parts": 2}, weights)
        assert_refused(got, PRECONDITION, "expected part 0 of 2")
        got = running.call(1, "Weights", {**key, "upload": "guess", "part": 0}, weights)
        assert_refused(got, PRECONDITION, "no upload under way for this token")
        assert list(service._uploads) == [token]  # nobody else's call touched it
        # Only the segment's own tensors, in their shape and dtype.
        for odd, fragment in (
            ({"w": torch.zeros(2)}, "tensor 'w' is not one of this segment's frozen weights"),
            ({"backbone.head.bias": torch.zeros(10, dtype=torch.float64)},
             "tensor 'backbone.head.bias' is float64 (10,), the segment's float32 (10,); "
             "upload dropped"),
        ):  # fmt: skip
            token = ask_upload(running, 1, open_header(model, 2), modules(model, 2))
            got = running.call(1, "Weights", {**key, "upload": token, "part": 0}, odd)
            assert_refused(got, INVALID, fragment)
            assert token not in service._uploads
        # An unfinished upload is dropped by the timer, with no further call at all.
        token = ask_upload(running, 1, open_header(model, 2), modules(model, 2))
        first = dict(list(weights.items())[:1])
        got = running.call(1, "Weights", {**key, "upload": token, "part": 0, "parts": 2}, first)
        assert got[0] == grpc.StatusCode.OK, got
        time.sleep(0.8)
        assert service._uploads == {} and service._timer is None
        rest = dict(list(weights.items())[1:])
        got = running.call(1, "Weights", {**key, "upload": token, "part": 1, "parts": 2}, rest)
        assert_refused(got, PRECONDITION, "unfinished uploads are dropped after 0.3 s")
    finally:
        for server in running.servers:
            server.stop(0)


def test_two_callers_uploads_never_drop_each_other() -> None:
    running = start_peers(n=2)
    service = running.services[1]
    a, b = tiny_model(0), tiny_model(1)
    try:
        token_a = ask_upload(running, 1, open_header(a, 2, session="a"), modules(a, 2))
        token_b = ask_upload(running, 1, open_header(b, 2, session="b"), modules(b, 2))
        assert token_a != token_b and len(service._uploads) == 2
        for model, token in ((b, token_b), (a, token_a)):  # b's part 0 leaves a's upload be
            weights = segment_weights(model, PLAN, 2)
            key = {"weights-key": weights_key(weights), "upload": token, "part": 0}
            assert running.call(1, "Weights", key, weights) == (grpc.StatusCode.OK, "")
        assert len(service._weights) == 2 and service._uploads == {}
    finally:
        for server in running.servers:
            server.stop(0)


def test_held_bytes_never_evict_the_open_sessions_weights() -> None:
    a, b = tiny_model(0), tiny_model(1)
    size = sum(t.numel() * t.element_size() for t in segment_weights(a, PLAN, 2).values())
    running = start_peers(PeerLimits(max_held_mb=1.5 * size / 2**20, session_idle_s=0.2), n=2)
    try:
        ids = open_end(running, a, session="a")
        time.sleep(0.3)  # idle: b may replace it, but not evict its weights to make room
        got = running.call(1, "Open", open_header(b, 2, session="b"), modules(b, 2))
        assert_refused(got, grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-held-mb")
        assert running.call(1, "Train", ids, smashed())[0] == grpc.StatusCode.OK
        assert running.call(1, "Close", ids)[0] == grpc.StatusCode.OK
        # Once the session is closed its weights may make room.
        open_end(running, b, session="b")
        assert list(running.services[1]._weights) == [weights_key(segment_weights(b, PLAN, 2))]
    finally:
        for server in running.servers:
            server.stop(0)


# -- a peer dials only its chain (issue 29) ---------------------------------------------------
def test_a_next_outside_the_chain_is_refused_at_open_and_never_dialled(peers: Peers) -> None:
    model = tiny_model()
    with socket.create_server(("127.0.0.1", 0)) as bait:  # a port someone wants probed
        bait.settimeout(0.5)
        outside = f"127.0.0.1:{bait.getsockname()[1]}"
        header = open_header(model, 1, next=outside, **{"next-token": "t"})
        got = peers.call(0, "Open", header, modules(model, 1))
        assert_refused(
            got,
            grpc.StatusCode.PERMISSION_DENIED,
            f"'next' {outside} is not a next member of this peer; it dials only its chain's "
            f"({peers.addresses[1]}, from its --next)",
        )
        with pytest.raises(TimeoutError):
            bait.accept()  # nothing connected
    # The end point was started without --next: it serves as an end point only.
    ranges = {"ranges": [[0, 1], [1, 2]], "index": 2}
    header = open_header(model, 2, next=peers.addresses[0], **{"next-token": "t", **ranges})
    got = peers.call(1, "Open", header, {})
    assert_refused(got, grpc.StatusCode.PERMISSION_DENIED, "started without --next")


@pytest.mark.parametrize("spelling", ["127.0.0.1:{port}", "localhost:{port}", "127.0.0.2:{port}"])
def test_a_next_that_is_the_peer_itself_is_refused_at_open(peers: Peers, spelling: str) -> None:
    model = tiny_model()
    itself = spelling.format(port=peers.addresses[0].rpartition(":")[2])
    peers.services[0].allow_next((peers.addresses[1],))
    started = time.monotonic()
    header = open_header(model, 1, next=itself, **{"next-token": "t"})
    got = peers.call(0, "Open", header, modules(model, 1))
    assert_refused(got, INVALID, f"'next' {itself} is this peer itself: a chain cannot loop")
    assert time.monotonic() - started < 2.0  # refused, not a 20 s wait on its own lock
    # Nor can it be configured so.
    with pytest.raises(ValueError, match="is this peer itself: a chain cannot loop"):
        peers.services[0].allow_next((itself,))


def test_the_command_line_refuses_a_next_that_loops(capsys: pytest.CaptureFixture) -> None:
    for argv, message in [
        (["--listen", "127.0.0.1:5000", "--next", "localhost:5000"],
         "--next localhost:5000 is this peer's own --listen: a chain cannot loop"),
        (["--listen", "0.0.0.0:5000", "--next", "127.0.0.1:5000"], "a chain cannot loop"),
        (["--listen", "127.0.0.1:5000", "--next", "nohost"], "'nohost' is not host:port"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args([*argv, "--insecure"])
        assert message in capsys.readouterr().err
    args = parse_args(["--listen", "127.0.0.1:5000", "--next", "10.0.0.2:1,10.0.0.3:1",
                       "--next", "10.0.0.4:1", "--insecure"])  # fmt: skip
    assert args.next == ("10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1")


def _closed_port() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"127.0.0.1:{s.getsockname()[1]}"


class Listener:
    """Something at a port that is not a gaisnet-peer: it accepts and closes, or accepts and
    stays silent, or answers garbage."""

    def __init__(self, behaviour: str) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.behaviour = behaviour
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                if self.behaviour == "close":
                    conn.close()
                elif self.behaviour == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\x00" * 64)
                    conn.close()
                else:
                    self.held.append(conn)  # silent

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_dial_failures_look_the_same_whatever_is_at_the_port(tmp_path: Path) -> None:
    pki = make_lab_pki(tmp_path)
    tls_peer = PeerService(TransportSettings(timeout_s=5))
    tls_server, tls_port = serve(
        tls_peer, "127.0.0.1:0", server_credentials(str(pki.certfile), str(pki.keyfile), "", False)
    )
    listeners = [Listener("close"), Listener("garbage"), Listener("silent")]
    targets = [_closed_port(), f"127.0.0.1:{tls_port}", *(x.address for x in listeners)]
    answers = []
    try:
        for target in targets:
            running = start_peers(n=1)
            service = running.services[0]
            service.transport = TransportSettings(timeout_s=1.5)
            service.allow_next((target,))
            model = tiny_model()
            header = open_header(model, 1, next=target, **{"next-token": "t"})
            ship_to = ask_upload(running, 0, header, modules(model, 1))
            weights = segment_weights(model, PLAN, 1)
            key = {"weights-key": weights_key(weights), "upload": ship_to, "part": 0}
            assert running.call(0, "Weights", key, weights)[0] == grpc.StatusCode.OK
            client = PeerClient("peer1", running.addresses[0], TransportSettings(timeout_s=20))
            reply, _ = client.call("Open", header, modules(model, 1))
            ids = {"session": header["session"], "token": reply["token"]}
            status, details = running.call(0, "Train", ids, smashed())
            answers.append((status, details.replace(target, "NEXT")))
            client.close()
            running.servers[0].stop(0)
    finally:
        tls_server.stop(0)
        for listener in listeners:
            listener.close()
    assert answers[0][0] == grpc.StatusCode.UNAVAILABLE
    assert answers[0][1] == (
        "end at NEXT: Train failed: no answer from a gaisnet-peer there (not running, "
        "unreachable, or too slow); see this peer's log"
    )
    assert len(set(answers)) == 1, answers  # closed, TLS-only, closing, garbage, silent


def test_ping_tells_the_version_only_and_refuses_garbage(peers: Peers) -> None:
    open_end(peers, tiny_model(), session="secret-session")
    client = PeerClient("end", peers.addresses[1], TransportSettings(timeout_s=5))
    assert client.call("Ping", {}) == ({"version": PROTOCOL_VERSION}, {})
    assert client.call("Ping", {"version": PROTOCOL_VERSION})[0] == {"version": PROTOCOL_VERSION}
    client.close()
    assert_refused(peers.raw(1, "Ping", b"\x05\x00garbage"), INVALID, "malformed message")
    assert_refused(peers.raw(1, "Ping", b""), INVALID, "malformed message")
    assert_refused(peers.call(1, "Ping", {"session": "x"}), INVALID, "Ping: takes an empty header")
    assert_refused(peers.call(1, "Ping", {}, {"h": torch.zeros(2)}), INVALID, "no tensors")


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float64, 1.0), (torch.float64, 1e300), (torch.int64, 1.0)]
)
def test_modules_must_arrive_in_the_sessions_dtype(
    peers: Peers, dtype: torch.dtype, scale: float
) -> None:
    model = tiny_model()
    ship(peers, model, 2)
    wrong = {k: (v.double() * scale).to(dtype) for k, v in modules(model, 2).items()}
    got = peers.call(1, "Open", open_header(model, 2), wrong)
    name = str(dtype).removeprefix("torch.")
    assert_refused(got, INVALID, f"is {name} (10, 32); this session's modules are float32 (10, 32)")
    assert peers.services[1].session is None  # nothing opened, nothing trained


def test_peer_limits_are_command_line_options(capsys: pytest.CaptureFixture) -> None:
    args = parse_args(["--listen", "127.0.0.1:0", "--insecure", "--max-upload-mb", "64",
                       "--max-upload-parts", "9", "--max-held-mb", "128",
                       "--upload-timeout-s", "5", "--session-idle-s", "7"])  # fmt: skip
    assert args.limits == PeerLimits(64.0, 9, 128.0, 5.0, 7.0)
    with pytest.raises(SystemExit):
        parse_args(["--listen", "127.0.0.1:0", "--insecure", "--session-idle-s", "nan"])
    assert "session_idle_s must be a finite number > 0" in capsys.readouterr().err


# -- nothing escapes as UNKNOWN -------------------------------------------------------------------
def test_an_unexpected_error_is_internal_with_a_short_reason(peers: Peers, monkeypatch) -> None:
    def broken(header: dict, tensors: dict) -> tuple[dict, dict]:
        return torch.zeros(2) @ torch.zeros(3), {}  # type: ignore[return-value]

    monkeypatch.setattr(peers.services[0], "close", broken)
    status, details = peers.call(0, "Close", {"session": "x"})
    assert status == grpc.StatusCode.INTERNAL, details
    assert details.startswith("Close failed inside the peer: RuntimeError:"), details
    assert "see the peer's log" in details and not LEAK.search(details)
    assert peers.call(0, "Ping", {})[0] == grpc.StatusCode.OK


# -- mutual TLS ---------------------------------------------------------------------------------
def test_mutual_tls_chain_trains_and_refuses_callers_without_a_certificate(
    tmp_path: Path,
) -> None:
    pki = make_lab_pki(tmp_path)
    creds = server_credentials(str(pki.certfile), str(pki.keyfile), str(pki.ca_certfile), True)
    # Each peer calls the next one with its own (server) certificate, as `gaisnet-peer` does.
    as_peer = TransportSettings(timeout_s=20, ca_certfile=str(pki.ca_certfile),
                                certfile=str(pki.certfile), keyfile=str(pki.keyfile))  # fmt: skip
    services = [PeerService(as_peer) for _ in range(2)]
    servers, addresses = [], []
    for service in services:
        server, port = serve(service, "127.0.0.1:0", creds)
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    services[0].allow_next((addresses[1],))
    try:
        start = TransportSettings(timeout_s=20, ca_certfile=str(pki.ca_certfile),
                                  certfile=str(pki.client_certfile),
                                  keyfile=str(pki.client_keyfile))  # fmt: skip
        net = NetworkPeers(PeerSettings(tuple(addresses), start), SPEC, OPTIMIZER)
        chain = SplitChain(tiny_model(), PLAN, OPTIMIZER.factory(), remote=net)
        result = chain.train_step(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
        chain.close()
        assert math.isfinite(result.loss)
        server_only = TransportSettings(timeout_s=5, ca_certfile=str(pki.ca_certfile))
        no_cert = PeerClient("peer1", addresses[0], server_only)
        with pytest.raises(PeerError, match="UNAVAILABLE"):
            no_cert.call("Ping", {})
    finally:
        for server in servers:
            server.stop(0)


def test_lab_tls_means_mutual_tls(tmp_path: Path, monkeypatch) -> None:
    lab = lab_script.Lab(tmp_path, clusters=1, peers_per_cluster=1, tls=True)
    spawned: dict[str, list[str]] = {}
    monkeypatch.setattr(lab, "_spawn", lambda name, cmd: spawned.setdefault(name, cmd))
    lab.start_peer(0, 1)
    lab.start_peer(0, 2)
    pki = lab.pki()
    for cmd in spawned.values():
        assert "--require-client-cert" in cmd and str(pki.ca_certfile) in cmd
    config = lab.node_config(0)
    assert f'peer-certfile="{pki.client_certfile}"' in config
    assert f'peer-keyfile="{pki.client_keyfile}"' in config
    settings = PeerSettings.from_node_config(dict(re.findall(r'([\w-]+)="?([^" ]*)"?', config)))
    assert settings is not None and settings.transport.certfile == str(pki.client_certfile)


# -- fuzz -----------------------------------------------------------------------------------------
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAVAILABLE,  # a fuzzed Open that names a next member nobody serves
}
FUZZ_CALLS = 1500


class Fuzzer:
    """Seeded generator of malformed (and some well-formed) requests for every method."""

    def __init__(
        self, seed: int, model: PromptedViT, ids: dict[str, str], upload: str = "", nexts=()
    ) -> None:
        self.rng = random.Random(seed)
        self.model = model
        self.ids = ids
        self.weights = segment_weights(model, PLAN, 2)
        self.upload = upload  # a real upload token, for weights of another model
        self.nexts = list(nexts)  # what a fuzzed Open on the peer names as its next member

    def value(self, depth: int = 0) -> Any:
        """A JSON value of any type (nested at most 3 deep), odd ones often."""
        r = self.rng
        kind = r.randrange(12 if depth < 3 else 9)
        if kind == 9:
            return [self.value(depth + 1) for _ in range(r.randrange(3))]
        if kind == 10:
            return {str(r.randrange(5)): self.value(depth + 1) for _ in range(r.randrange(3))}
        return [
            None, True, r.randint(-(2**63), 2**63), r.randint(-3, 3),
            r.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5]), "",
            "x" * r.choice([1, 200, 5000]), "0" * 64,
            r.choice(["sgd", "vit_tiny_patch16_224", "../etc/passwd", "127.0.0.1:1", "\udc80"]),
            None, None, [[0, r.randint(-2, 4)]],
        ][kind]  # fmt: skip

    def tensor(self) -> torch.Tensor:
        r = self.rng
        dtype = r.choice([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool,
                          torch.uint8, torch.bfloat16, torch.int32])  # fmt: skip
        shape = r.choice([(), (0,), (2,), (2, TOKENS, 32), (0, TOKENS, 32), (1, TOKENS, 31),
                          (3, TOKENS, 32), (2, 2, TOKENS, 32), (4, 1)])  # fmt: skip
        t = (torch.randn(shape) * r.choice([1, 1e30])).to(dtype)
        if t.is_floating_point() and t.numel() and r.random() < 0.5:
            t.view(-1)[r.randrange(t.numel())] = r.choice([math.nan, math.inf, -math.inf])
        return t.permute(*reversed(range(t.dim()))) if t.dim() > 1 and r.random() < 0.2 else t

    def header(self, method: str) -> dict[str, Any]:
        r = self.rng
        if method == "Open":
            base = open_header(self.model, 2, session=f"fuzz-{r.randrange(3)}")
            base["model"] = dict(SPEC)
        elif method == "Weights":
            base = {"weights-key": weights_key(self.weights), "part": 0, "parts": 1,
                    "upload": self.upload if r.random() < 0.7 else "x"}  # fmt: skip
        else:
            base = dict(self.ids) if r.random() < 0.6 else {"session": "x", "token": "y"}
        for _ in range(r.randrange(4)):
            nested = method == "Open" and isinstance(base.get("model"), dict)
            target = base["model"] if nested and r.random() < 0.3 else base
            key = r.choice([*target, "tensors", "checkpoint_path", "pretrained", "depth"])
            if r.random() < 0.2:
                target.pop(key, None)
            else:
                target[key] = self.value()
        return base

    def tensors(self, method: str) -> dict[str, torch.Tensor]:
        r = self.rng
        if method == "Weights" and r.random() < 0.5:
            return dict(self.weights)
        if method == "Open" and r.random() < 0.5:
            return modules(self.model, 2)
        names = ["h", "y", "grad", "head.weight", "prompt.0", "w"]
        if r.random() < 0.4:
            base = smashed(r.choice([1, 2]))
            for name in r.sample(list(base), r.randrange(3)):
                base[name] = self.tensor()
            return base
        return {r.choice(names): self.tensor() for _ in range(r.randrange(4))}

    def open_on_peer(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """An `Open` on the middle peer naming any next member: its own, another port, itself
        in several spellings, or no address at all."""
        header = open_header(self.model, 1, session=f"fuzz-peer-{self.rng.randrange(3)}")
        header.update({"next": self.rng.choice(self.nexts), "next-token": "t"})
        return header, modules(self.model, 1)

    def payload(self, method: str) -> bytes:
        r = self.rng
        try:
            good = pack_message(self.header(method), self.tensors(method))
        except (ValueError, TypeError, UnicodeEncodeError):  # a header json.dumps refuses
            good = pack_message({"session": "x"})
        mutation = r.randrange(10)
        if mutation == 0:  # random bytes
            return bytes(r.randrange(256) for _ in range(r.randrange(64)))
        if mutation == 1:  # truncated
            return good[: r.randrange(len(good))]
        if mutation == 2:  # a flipped byte
            i = r.randrange(len(good))
            return good[:i] + bytes([good[i] ^ (1 << r.randrange(8))]) + good[i + 1 :]
        if mutation == 3:  # a raw tensor header: any dtype code, ndim byte and sizes
            ndim = r.randrange(256)
            sizes = [r.randint(-(2**63), 2**63 - 1) for _ in range(min(ndim & 0x7F, 8))]
            blob = struct.pack("<BB", r.randrange(12), ndim) + struct.pack(
                f"<{len(sizes)}q", *sizes
            )
            blob += bytes(r.randrange(256) for _ in range(r.randrange(40)))
            head = json.dumps({**self.ids, "tensors": [["h", len(blob)]]}).encode()
            return frame(head, blob)
        if mutation == 4:  # a frame whose header is not an object or lists odd tensors
            head = json.dumps(
                r.choice(
                    [
                        [],
                        3,
                        "x",
                        {"tensors": [["h", -5]]},
                        {"tensors": [["h", 1], ["h", 1]]},
                        {"tensors": {}},
                    ]
                )
            )
            return frame(head.encode(), b"\0\0")  # fmt: skip
        return good


@pytest.mark.fuzz
def test_fuzzing_the_peer_never_answers_unknown_and_never_leaks_a_traceback() -> None:
    """The peer-calls fuzzer: FUZZ_CALLS seeded requests (every method, malformed and
    well-formed) to the end point, and `Open`s naming any next member to the middle peer.
    Every answer is a refusal by contract or OK; no refusal leaks a traceback; the peer never
    dials an address outside its chain; nothing non-finite is ever trained on; the bytes held
    (stored and reserved for uploads) stay within --max-held-mb; and the peer still serves a
    round after it. Its time is printed (`pytest -s`) and bounded."""
    limits = PeerLimits(max_upload_mb=1.0, max_upload_parts=8, max_held_mb=4.0,
                        upload_timeout_s=60, session_idle_s=0.2)  # fmt: skip
    running = start_peers(limits)
    bait = socket.create_server(("127.0.0.1", 0))  # a port outside the chain
    bait.setblocking(False)
    try:
        model, other = tiny_model(), tiny_model(5)
        token = ask_upload(running, 1, open_header(other, 2, session="up"), modules(other, 2))
        ids = open_end(running, model, session="owner")
        port = running.addresses[0].rpartition(":")[2]
        nexts = [running.addresses[1], f"127.0.0.1:{bait.getsockname()[1]}",
                 f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "10.255.255.1:9",
                 "x", ":1", "127.0.0.1:99999"]  # fmt: skip
        fuzzer = Fuzzer(seed=17, model=model, ids=ids, upload=token, nexts=nexts)
        fuzzer.weights = segment_weights(other, PLAN, 2)  # what the upload token is for
        methods = ["Ping", "Open", "Weights", "Train", "Infer", "Close"]
        seen: dict[str, int] = {}
        held_limit = limits.max_held_mb * 2**20
        started = time.monotonic()
        for i in range(FUZZ_CALLS):
            method = fuzzer.rng.choice(methods)
            if i % 6 == 5:
                status, details = running.call(0, "Open", *fuzzer.open_on_peer())
            else:
                status, details = running.raw(1, method, fuzzer.payload(method))
            seen[status.name] = seen.get(status.name, 0) + 1
            live = running.services[1].session
            if method == "Open" and status == grpc.StatusCode.OK and live is not None:
                fuzzer.ids = {"session": live.id, "token": live.token}  # what its owner knows
            assert status in ALLOWED, (i, method, status, details)
            assert not LEAK.search(details), (i, method, details)
            for service in running.services:
                assert service._held_bytes(list(service._weights)) <= held_limit, i
                if service.session is not None:  # nothing non-finite trained on
                    state = service.session.model.tunable_state()
                    own = [state[k] for k in service.session.tunable_keys]
                    assert all(bool(torch.isfinite(v).all()) for v in own), i
        elapsed = time.monotonic() - started
        print(f"fuzz: {FUZZ_CALLS} calls in {elapsed:.2f} s: {seen}")  # with pytest -s
        with pytest.raises(BlockingIOError):
            bait.accept()  # the peer never dialled outside its chain
        assert running.call(1, "Ping", {})[0] == grpc.StatusCode.OK
        assert seen.get("INVALID_ARGUMENT", 0) > FUZZ_CALLS // 4, seen
        assert seen.get("PERMISSION_DENIED", 0) > 0, seen
        assert elapsed < 60, elapsed
        # The peer still serves a whole round (any fuzz session has expired by now).
        time.sleep(0.3)
        chain = SplitChain(tiny_model(), PLAN, OPTIMIZER.factory(), remote=running.network())
        chain.train_step(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
        chain.close()
    finally:
        bait.close()
        for server in running.servers:
            server.stop(0)
