"""D2D peers over gRPC: the network chain trains and infers exactly like the in-process one, and
a peer refuses what does not fit before doing any work.

The peers here are real gRPC servers (`peer.serve`) on loopback, in this process's threads; the
lab test (tests/test_lab.py) runs them as `gaisnet-peer` processes under Flower's deployment.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import cluster_datasets, edge_image_data, load_image_data
from gaisnet_flwr.deploy.peer import PeerService, parse_args, serve, server_credentials
from gaisnet_flwr.deploy.pki import make_lab_pki
from gaisnet_flwr.deploy.remote import (
    PROTOCOL_VERSION,
    GrpcHop,
    NetworkPeers,
    PeerClient,
    PeerError,
    PeerSettings,
    TransportSettings,
    chunks,
    model_spec,
    segment_weights,
)
from gaisnet_flwr.derived import data_spec, derive, edge_shares
from gaisnet_flwr.split.chain import SplitChain
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.split.precision import Precision
from gaisnet_flwr.training.loops import build_model, model_kwargs, optimizer_spec, train_cluster
from gaisnet_flwr.vit.model import PromptedViT

CFG = RunConfig.from_run_config(
    {"foundation": "none", "peers-per-cluster": 2, "embed-dim": 32, "num-heads": 2}
)


@pytest.fixture(scope="module")
def cluster_data():
    data = load_image_data(data_spec(CFG))
    edge = edge_image_data(
        data, 0, list(edge_shares(CFG.hierarchy)), CFG.hierarchy.edge_domains[0], seed=CFG.run.seed
    )
    train, val = cluster_datasets(edge, 0, 4, data_spec(CFG))
    return data.num_classes, train, val


class Lab:
    """K + 1 peer servers on loopback ports; `services[k]` is member k + 1's state."""

    def __init__(self, n: int, transport: TransportSettings, credentials=None) -> None:
        self.services = [PeerService(transport) for _ in range(n)]
        self.servers, self.addresses = [], []
        for service in self.services:
            server, port = serve(service, "127.0.0.1:0", credentials)
            self.servers.append(server)
            self.addresses.append(f"127.0.0.1:{port}")
        for service, successor in zip(self.services, self.addresses[1:], strict=False):
            service.allow_next((successor,))  # each dials only the next member (--next)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(0)


@pytest.fixture
def lab() -> Iterator[Lab]:
    running = Lab(3, TransportSettings(timeout_s=30))
    yield running
    running.stop()


def network(
    lab: Lab,
    num_classes: int,
    transport: TransportSettings | None = None,
    cfg: RunConfig = CFG,
):
    settings = PeerSettings(tuple(lab.addresses), transport or TransportSettings(timeout_s=30))
    return NetworkPeers(
        settings,
        model_spec(model_kwargs(cfg.model, cfg.cloud), num_classes),
        optimizer_spec(cfg.training),
        precision=Precision(cfg.run.precision, cfg.run.smashed_dtype),
    )


def model_pair(num_classes: int) -> tuple[PromptedViT, PromptedViT]:
    model = build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed)
    return model, copy.deepcopy(model)


def test_network_training_equals_in_process_training(lab: Lab, cluster_data) -> None:
    num_classes, train, _ = cluster_data
    local, remote = model_pair(num_classes)
    plan = derive(CFG).plan
    expected = train_cluster(local, plan, train, CFG.training, seed=3)
    got = train_cluster(remote, plan, train, CFG.training, seed=3, remote=network(lab, num_classes))
    # The same ChainNode code on every member: the same float ops in the same order.
    for key, value in local.tunable_state().items():
        torch.testing.assert_close(remote.tunable_state()[key], value, rtol=1e-6, atol=1e-7)
    assert (got.loss, got.accuracy, got.num_examples) == pytest.approx(
        (expected.loss, expected.accuracy, expected.num_examples)
    )
    # The bytes and FLOPs the peers report are the ones the in-process links counted.
    assert got.chain == expected.chain
    assert got.chain.hop_bytes_backward[0] == 0  # nothing goes back to the frozen start point
    assert all(s.session is None for s in lab.services)  # every session closed


@pytest.mark.parametrize(
    ("model_name", "mode"),
    [("vit_small_patch16_dinov3", "vpt-deep"), ("eva02_tiny_patch14_224", "full")],
)
def test_an_eva_model_trains_over_the_network_bit_for_bit(
    lab: Lab, cluster_data, model_name: str, mode: str
) -> None:
    # RoPE: each peer computes the rotary embedding (a buffer it is never sent) for its blocks.
    cfg = CFG.replace(model_name=model_name, mode=mode, num_prompts=4 if mode == "vpt-deep" else 0)
    num_classes, train, _ = cluster_data
    local = build_model(cfg.model, cfg.cloud, num_classes, cfg.run.seed)
    remote = copy.deepcopy(local)
    plan = derive(cfg).plan
    expected = train_cluster(local, plan, train, cfg.training, seed=3)
    got = train_cluster(
        remote, plan, train, cfg.training, seed=3, remote=network(lab, num_classes, cfg=cfg)
    )
    for key, value in local.tunable_state().items():
        assert torch.equal(remote.tunable_state()[key], value), key
    assert got.loss == expected.loss and got.chain == expected.chain


@pytest.mark.parametrize("mode", ["vpt-deep", "full"])
def test_an_attention_pooled_model_trains_over_the_network_bit_for_bit(
    lab: Lab, cluster_data, mode: str
) -> None:
    # SigLIP (no prefix tokens, MAP head): the end point peer holds and trains the attention
    # pool with the head and hands it back; every hop keeps the tokens' memory layout.
    cfg = CFG.replace(
        model_name="vit_base_patch16_siglip_224",
        mode=mode,
        num_prompts=4 if mode == "vpt-deep" else 0,
        optimizer="adamw",
    )
    num_classes, train, _ = cluster_data
    local = build_model(cfg.model, cfg.cloud, num_classes, cfg.run.seed)
    remote = copy.deepcopy(local)
    plan = derive(cfg).plan
    pool_keys = [k for k in local.tunable_state() if k.startswith("attn_pool.")]
    assert "attn_pool.latent" in pool_keys
    net = network(lab, num_classes, cfg=cfg)
    expected = train_cluster(local, plan, train, cfg.training, seed=3)
    got = train_cluster(remote, plan, train, cfg.training, seed=3, remote=net)
    for key, value in local.tunable_state().items():
        assert torch.equal(remote.tunable_state()[key], value), key
    assert got.loss == expected.loss and got.chain == expected.chain
    end = lab.services[-1]
    assert end.session is None  # closed, the pool handed back with the head


def test_bf16_smashed_data_over_the_network_equal_the_in_process_chain(
    lab: Lab, cluster_data
) -> None:
    # The session carries the precision and the smashed-data dtype: bf16 on the wire both ways
    # (half the D2D bytes), bf16 autocast on every member; the same ops as in process.
    cfg = CFG.replace(precision="bf16", smashed_dtype="bf16")
    num_classes, train, _ = cluster_data
    small = torch.utils.data.Subset(train, range(40))
    local, remote = model_pair(num_classes)
    plan, precision = derive(cfg).plan, Precision(cfg.run.precision, cfg.run.smashed_dtype)
    expected = train_cluster(local, plan, small, cfg.training, seed=3, precision=precision)
    net = network(lab, num_classes, cfg=cfg)
    got = train_cluster(remote, plan, small, cfg.training, seed=3, remote=net, precision=precision)
    for key, value in local.tunable_state().items():
        assert torch.equal(remote.tunable_state()[key], value), key
    assert got.loss == expected.loss and got.chain == expected.chain
    full = train_cluster(copy.deepcopy(local), plan, small, cfg.training, seed=3).chain
    assert got.chain.d2d_bytes_forward < 0.51 * full.d2d_bytes_forward


def test_network_inference_equals_in_process_inference(lab: Lab, cluster_data) -> None:
    num_classes, _, val = cluster_data
    model = build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed)
    x = torch.stack([val[i][0] for i in range(8)])
    plan = derive(CFG).plan
    expected = SplitChain(model, plan).infer(x)
    chain = SplitChain(model, plan, remote=network(lab, num_classes), train=False)
    torch.testing.assert_close(chain.infer(x), expected, rtol=1e-6, atol=1e-6)
    assert chain.stats().hop_bytes_forward[0] > 0


def test_frozen_weights_are_shipped_once_per_peer(lab: Lab, cluster_data) -> None:
    num_classes, train, _ = cluster_data
    small = torch.utils.data.Subset(train, range(10))
    plan = derive(CFG).plan
    for _ in range(2):
        model = build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed)
        train_cluster(model, plan, small, CFG.training, seed=0, remote=network(lab, num_classes))
    assert [len(s._weights) for s in lab.services] == [1, 1, 1]
    # Only the peer's own slice: blocks 0-2 of 6 are not on the first peer's model.
    held = set(next(iter(lab.services[0]._weights.values())))
    assert any(".blocks.0." in k for k in held) and not any(".blocks.5." in k for k in held)


def open_session(lab: Lab, num_classes: int) -> tuple[PeerClient, dict[str, str]]:
    peers = network(lab, num_classes)
    hop = peers.open(
        build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed), derive(CFG).plan, True, 0.0
    )
    assert isinstance(hop, GrpcHop)
    return hop.client, {"session": hop.session, "token": hop.token}


def test_a_peer_refuses_smashed_data_of_the_wrong_shape_or_dtype(lab: Lab, cluster_data) -> None:
    num_classes = cluster_data[0]
    client, ids = open_session(lab, num_classes)
    y = torch.zeros(2, dtype=torch.int64)
    tokens = 1 + (32 // 8) ** 2  # class token + 16 patches; vpt-deep sends no prompt slots
    with pytest.raises(PeerError, match=rf"smashed data must be float32 \[B, {tokens}, 32\]"):
        client.call("Train", ids, {"h": torch.zeros(2, 5, 32), "y": y})
    with pytest.raises(PeerError, match="INVALID_ARGUMENT.*float32"):
        client.call("Train", ids, {"h": torch.zeros(2, tokens, 32).double(),
                                                     "y": y})  # fmt: skip
    with pytest.raises(PeerError, match=rf"labels must be in \[0, {num_classes}\)"):
        client.call("Train", ids,
                    {"h": torch.zeros(2, tokens, 32), "y": torch.tensor([0, 99])})  # fmt: skip
    with pytest.raises(PeerError, match="FAILED_PRECONDITION: no open session"):
        client.call("Train", {**ids, "session": "stale"}, {"h": torch.zeros(2, tokens, 32), "y": y})
    with pytest.raises(grpc.RpcError, match="malformed message: message of 2 bytes"):
        client._channel.unary_unary("/gaisnet.Peer/Train")(b"\x05\x00", timeout=5)
    # The session survives the refusals: a valid step still works.
    header, _ = client.call("Train", ids, {"h": torch.zeros(2, tokens, 32), "y": y})
    assert header["n"] == 2


def test_modules_that_are_not_the_segments_own_are_refused(lab: Lab, cluster_data) -> None:
    num_classes = cluster_data[0]
    peers = network(lab, num_classes)
    model = build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed)
    peers.open(model, derive(CFG).plan, True, 0.0)  # ships the weights
    peers.close(model)  # the peer is free for another session
    client = PeerClient("peer1", lab.addresses[0], TransportSettings())
    header = {"version": PROTOCOL_VERSION, "session": "x", "index": 1, "ranges": [[0, 3], [3, 6]],
              "model": peers.model_spec, "optimizer": {"name": "sgd", "lr": 0.1}, "train": True,
              "next": lab.addresses[1], "next-token": "t",
              "weights-key": next(iter(lab.services[0]._weights))}  # fmt: skip
    with pytest.raises(PeerError, match=r"modules \['prompt.5'\] are not this segment's"):
        client.call("Open", header, {"prompt.5": torch.zeros(10, 32)})


def test_a_dead_peer_names_itself(cluster_data) -> None:
    num_classes, train, _ = cluster_data
    lab = Lab(3, TransportSettings(timeout_s=5))
    lab.servers[2].stop(0)  # the end point is gone
    try:
        with pytest.raises(PeerError, match=rf"end at {lab.addresses[2]}.*UNAVAILABLE"):
            model = build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed)
            remote = network(lab, num_classes)
            train_cluster(model, derive(CFG).plan, train, CFG.training, seed=0, remote=remote)
    finally:
        lab.stop()


def test_timeouts_and_size_limits_are_reported_with_their_setting(lab: Lab, cluster_data) -> None:
    num_classes = cluster_data[0]
    model, plan = build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed), derive(CFG).plan
    too_slow = TransportSettings(timeout_s=1e-4)
    with pytest.raises(PeerError, match="DEADLINE_EXCEEDED.*peer-timeout-s"):
        network(lab, num_classes, too_slow).open(model, plan, True, 0.0)
    tiny = TransportSettings(max_message_mb=0.001)  # 1 kB: the weights do not fit
    with pytest.raises(PeerError, match="RESOURCE_EXHAUSTED.*max-message-mb"):
        network(lab, num_classes, tiny).open(model, plan, True, 0.0)


def test_tls_chain_trains_and_plaintext_callers_are_refused(tmp_path: Path, cluster_data) -> None:
    num_classes, train, _ = cluster_data
    pki = make_lab_pki(tmp_path)
    tls = TransportSettings(timeout_s=30, ca_certfile=str(pki.ca_certfile))
    creds = server_credentials(str(pki.certfile), str(pki.keyfile), "", False)
    lab = Lab(3, tls, creds)
    try:
        small = torch.utils.data.Subset(train, range(20))
        local, remote = model_pair(num_classes)
        plan = derive(CFG).plan
        train_cluster(local, plan, small, CFG.training, seed=1)
        train_cluster(
            remote, plan, small, CFG.training, seed=1, remote=network(lab, num_classes, tls)
        )
        for key, value in local.tunable_state().items():
            torch.testing.assert_close(remote.tunable_state()[key], value, rtol=1e-6, atol=1e-7)
        plaintext = PeerClient("peer1", lab.addresses[0], TransportSettings(timeout_s=5))
        with pytest.raises(PeerError, match="UNAVAILABLE"):
            plaintext.call("Ping", {})
    finally:
        lab.stop()


def test_node_config_gives_the_members_and_rejects_bad_settings() -> None:
    assert PeerSettings.from_node_config({"partition-id": 0, "num-partitions": 2}) is None
    got = PeerSettings.from_node_config({"peers": "10.0.0.1:5001, 10.0.0.2:5001",
                                          "peer-timeout-s": 7})  # fmt: skip
    assert got is not None
    assert got.addresses == ("10.0.0.1:5001", "10.0.0.2:5001") and got.transport.timeout_s == 7
    with pytest.raises(ValueError, match="'10.0.0.1' is not host:port"):
        PeerSettings.from_node_config({"peers": "10.0.0.1,10.0.0.2:1"})
    with pytest.raises(ValueError, match=r"names \['a:1'\] more than once"):
        PeerSettings.from_node_config({"peers": "a:1,b:2,a:1"})
    with pytest.raises(ValueError, match="at least one peer and the end point"):
        PeerSettings.from_node_config({"peers": "10.0.0.1:1"})
    with pytest.raises(ValueError, match=r"unknown node-config key\(s\) \['peer-timeout'\]"):
        PeerSettings.from_node_config({"peers": "a:1,b:2", "peer-timeout": 3})
    with pytest.raises(ValueError, match="TLS file 'missing.pem' does not exist"):
        PeerSettings.from_node_config({"peers": "a:1,b:2", "peer-ca-certfile": "missing.pem"})


def test_member_count_must_match_the_split_plan(lab: Lab, cluster_data) -> None:
    num_classes = cluster_data[0]
    plan = SplitPlan.from_sizes([2, 2, 2])  # 3 peers + end point: 4 members, the lab has 3
    with pytest.raises(PeerError, match="names 3 D2D members .* is peer1 -> peer2 -> peer3 -> end"):
        network(lab, num_classes).open(
            build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed), plan, True, 0.0
        )


def test_peer_command_line_is_checked_before_serving(capsys: pytest.CaptureFixture) -> None:
    for argv, message in [
        (["--listen", "127.0.0.1:5000"], "choose TLS (--certfile and --keyfile) or --insecure"),
        (["--listen", "nohost", "--insecure"], "'nohost' is not host:port"),
        (["--listen", "127.0.0.1:1", "--certfile", "x.pem", "--keyfile", "x.key"],
         "file 'x.pem' does not exist"),
        (["--listen", "127.0.0.1:1", "--insecure", "--require-client-cert"],
         "--require-client-cert needs TLS"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_an_unreachable_peer_is_a_peer_error() -> None:
    # Nothing listens on port 9 (discard): the caller gets a PeerError, never a half reply.
    client = PeerClient("peer1", "127.0.0.1:9", TransportSettings(timeout_s=2))
    with pytest.raises(PeerError, match="peer1 at 127.0.0.1:9: Ping failed"):
        client.call("Ping", {})


def test_large_segments_ship_their_weights_in_parts(lab: Lab, cluster_data) -> None:
    num_classes = cluster_data[0]
    model, plan = build_model(CFG.model, CFG.cloud, num_classes, CFG.run.seed), derive(CFG).plan
    limit = TransportSettings(timeout_s=30, max_message_mb=0.05)  # 52 kB: a block is ~50 kB
    weights = segment_weights(model, plan, 1)
    assert len(chunks(weights, limit.max_message_bytes // 2)) > 2
    network(lab, num_classes, limit).open(model, plan, True, 0.0)
    stored = next(iter(lab.services[0]._weights.values()))
    assert sorted(stored) == sorted(weights)
    for name, value in weights.items():
        assert torch.equal(stored[name], value), name
