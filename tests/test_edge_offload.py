"""The edge server as a cooperative node of a chain (paper Sec. III-C, III-D; run-config
`edge-offload`): how it is priced (its own profile, its share of the edge, the client-edge hops,
reported apart from the devices), how the planner places it (the same min-max split, the least
busiest node; shared per round), and that a run with it trains exactly and completes, in
process and in a lab whose edge member is a `gaisnet-peer`."""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.contract import ClusterTask, NodeIdentity
from gaisnet_flwr.costs.pricing import fine_tuning_round_cost, inference_cost
from gaisnet_flwr.costs.profiles import (
    ClusterProfile,
    CostConfigError,
    DeviceProfile,
    LinkProfile,
    load_profiles,
)
from gaisnet_flwr.data.images import load_image_data
from gaisnet_flwr.derived import Derived, derive
from gaisnet_flwr.population.edge_offload import (
    EdgeServer,
    faster,
    place_cluster,
    plan_round,
    price,
    with_edge,
)
from gaisnet_flwr.population.planning import RangeCosts, Workload
from gaisnet_flwr.split.flops import SegmentFlops
from gaisnet_flwr.split.plan import PlanError, SplitPlan
from gaisnet_flwr.training.loops import build_model, train_centralised, train_cluster
from gaisnet_flwr.vit.model import PromptedViT, build_prompted_vit

pytestmark = pytest.mark.usefixtures("one_thread")

PROFILES = load_profiles()


def meta_model(depth: int = 6) -> PromptedViT:
    with torch.device("meta"):
        return build_prompted_vit(
            "vit_tiny_patch16_224", mode="vpt-deep", num_prompts=4, num_classes=10,
            img_size=32, patch_size=8, depth=depth, embed_dim=32, num_heads=2,
        )  # fmt: skip


def wired(name: str, kind: str, rate_bps: float) -> LinkProfile:
    return LinkProfile(name, kind, wired_rate_bps=rate_bps)


def device(name: str, flops: float, memory: int = 2**30) -> DeviceProfile:
    return DeviceProfile(name, flops, 1, memory_bytes=memory)  # no sensing: compute decides


def chain(peers: list[DeviceProfile], rates: list[float]) -> ClusterProfile:
    """start, `peers`, end (1e9 FLOP/s each end), hop k a wired D2D link of rates[k]."""
    ends = device("end", 1e9)
    hops = [wired(f"h{k}", "d2d", r) for k, r in enumerate(rates)]
    return ClusterProfile([ends, *peers, ends], hops, wired("up", "client-edge", 1e8))


# -- pricing ------------------------------------------------------------------------------------
def test_the_edge_node_is_priced_at_its_share_and_reported_apart() -> None:
    """Start -> peer -> edge -> end, by hand: the edge's compute takes `share` times as long
    (its energy per FLOP its own), its hops are client-edge (cs bytes, not D2D), and the
    cluster's compute and energy are its devices' alone."""
    phone = DeviceProfile("phone", 1e9, 10, tx_power_w=0.2)
    server = DeviceProfile("server", 2e9, 50, tx_power_w=1.0)
    d2d = wired("d2d", "d2d", 8e6)  # 1 byte = 1 microsecond
    # Into the edge the phone sends at most 0.2 W, out of it the server 0.5 W (one link per hop,
    # both directions: the gradient back to peer 1 goes at the phone's 0.2 W).
    up_in = LinkProfile("up-in", "client-edge", wired_rate_bps=4e6, tx_power_w=0.2)
    up_out = LinkProfile("up-out", "client-edge", wired_rate_bps=4e6, tx_power_w=0.5)
    cluster = ClusterProfile(
        [phone, phone, server, phone], [d2d, up_in, up_out], up_in, d2d, edge=2, edge_share=3
    )
    assert cluster.names == ["start", "peer1", "edge", "end"] and cluster.edge_hops == (1, 2)
    flops = [SegmentFlops(10, 0), SegmentFlops(1e9, 1e9), SegmentFlops(1e11, 1e11),
             SegmentFlops(10, 10)]  # fmt: skip
    cost = fine_tuning_round_cost(
        cluster, flops, [100, 200, 300], [0, 40, 50], samples=2, upload_bytes=7,
        download_bytes=9,
    )  # fmt: skip
    edge = cost.edge_node
    assert edge is not None and edge.name == "edge" and edge.device == "server"
    assert edge.compute_s == pytest.approx(3 * 4e11 / 1e11)  # 4e11 FLOPs at 1e11 FLOP/s, x3
    assert edge.compute_j == pytest.approx(1e-28 * (4e11 / 50) * 2e9**2)  # kappa cycles f^2
    assert edge.tx_bytes == 300 + 40  # forward to the end point, gradient back to peer 1
    assert cost.edge_flops == 4e11 and cost.edge_compute_s == edge.compute_s
    assert cost.edge_energy_j == pytest.approx(edge.compute_j + (0.5 * 300 + 0.2 * 40) * 8 / 4e6)
    # the devices' part: the edge not in it
    devices = [cost.nodes[k] for k in (0, 1, 3)]
    assert cost.compute_flops == sum(n.flops for n in devices)
    assert cost.energy_j == pytest.approx(sum(n.energy_j for n in devices))
    # communication: hop 0 is D2D; hops 1 and 2 (into and out of the edge) client-edge
    assert (cost.d2d_forward_bytes, cost.d2d_backward_bytes) == (100, 0)
    assert cost.cs_hop_bytes == 200 + 40 + 300 + 50
    assert cost.cs_bytes == 9 + 7 + 590
    assert cost.cs_hop_s == pytest.approx(8 * 590 / 4e6)
    assert cost.d2d_s == pytest.approx(8 * 100 / 8e6)
    # latency and the busiest node cover every node, the edge included
    assert cost.latency_s == pytest.approx(cost.download_s + sum(n.busy_s for n in cost.nodes))
    assert cost.bottleneck_s == edge.busy_s
    request = inference_cost(cluster, flops, [100, 200, 300], result_bytes=8, samples=1)
    assert request.cs_hop_bytes == 500 and request.d2d_forward_bytes == 100 + 8


def test_a_chain_with_an_edge_node_is_checked() -> None:
    phone, server = device("phone", 1e9), device("server", 1e11)
    d2d, up = wired("d2d", "d2d", 1e6), wired("up", "client-edge", 1e6)
    with pytest.raises(CostConfigError, match=r"hop start->edge: link 'd2d' is d2d, not client"):
        ClusterProfile([phone, server, phone], [d2d, up], up, d2d, edge=1)
    with pytest.raises(CostConfigError, match=r"hop start->peer1: link 'up' is client-edge, not"):
        ClusterProfile([phone, phone, phone], [up, d2d], up)
    with pytest.raises(CostConfigError, match=r"must run a middle node of the chain \(1 .. 1\)"):
        ClusterProfile([phone, server, phone], [up, up], up, d2d, edge=2)
    with pytest.raises(CostConfigError, match="edge_share=2: .* 1 when the chain has no edge"):
        ClusterProfile([phone, phone, phone], [d2d, d2d], up, edge_share=2)
    with pytest.raises(CostConfigError, match="it must be a client-edge link"):
        EdgeServer(server, d2d)


def test_inserting_the_edge_keeps_the_devices_and_their_links() -> None:
    peers = [device("a", 1e9), device("b", 2e9)]
    cluster = chain(peers, [1e6, 2e6, 3e6])
    edge = EdgeServer(PROFILES.device("edge-server"), PROFILES.link("uplink-1mhz"))
    for node in (1, 2, 3):
        inserted = with_edge(cluster, edge, node, share=4)
        assert inserted.devices[node] is edge.device and inserted.edge_share == 4
        assert [d for k, d in enumerate(inserted.devices) if k != node] == list(cluster.devices)
        kept = [h for k, h in enumerate(inserted.hops) if k not in inserted.edge_hops]
        assert kept == [h for k, h in enumerate(cluster.hops) if k != node - 1]
        into, out = (inserted.hops[k] for k in inserted.edge_hops)
        assert into.kind == out.kind == "client-edge"
        assert into.power_w == min(0.2, cluster.devices[node - 1].tx_power_w)  # the device's cap
        assert out.power_w == 0.2 and into.rate_bps() <= out.rate_bps()
        assert inserted.result == cluster.result  # end -> start stays D2D


# -- placing the edge ---------------------------------------------------------------------------
def brute_force(
    costs: RangeCosts, cluster: ClusterProfile, edge: EdgeServer | None, share: int = 1
) -> tuple[float, float]:
    """The least (busiest node, then latency) over the devices alone and the edge at every
    position, each over every split (every node at least one block, within its memory)."""
    candidates = [cluster]
    if edge is not None:
        candidates += [with_edge(cluster, edge, n, share) for n in range(1, len(cluster.devices))]
    keys = []
    for profile in candidates:
        stages = len(profile.devices) - 2
        for cuts in itertools.combinations(range(1, costs.depth), stages - 1):
            plan = SplitPlan.from_sizes(
                [b - a for a, b in itertools.pairwise([0, *cuts, costs.depth])]
            )
            fits = all(
                costs.peer(a, b).memory_bytes <= profile.devices[k + 1].memory_bytes
                for k, (a, b) in enumerate(plan.ranges)
            )
            if fits:
                keys.append(price(costs, profile, plan).key)
    if not keys:
        return (math.inf, math.inf)
    busiest = min(k[0] for k in keys)
    return (busiest, min(k[1] for k in keys if k[0] <= busiest * (1 + 1e-12)))


@pytest.fixture(scope="module")
def costs() -> RangeCosts:
    return RangeCosts(meta_model(), Workload(32, 16))


@pytest.mark.parametrize("case", range(30))
def test_the_edge_is_placed_optimally_against_exhaustive_search(
    case: int, costs: RangeCosts
) -> None:
    rng = random.Random(case)
    block = costs.peer(0, 1).memory_bytes
    peers = [
        device(f"p{k}", rng.uniform(1e7, 1e9), memory=block * rng.randint(1, 3))
        for k in range(rng.randint(1, 4))
    ]
    cluster = chain(peers, [rng.uniform(1e5, 1e9) for _ in range(len(peers) + 1)])
    server = device("server", rng.uniform(1e7, 1e10), memory=max(1, block * rng.randint(0, 4)))
    edge = EdgeServer(server, wired("up", "client-edge", 10 ** rng.uniform(4, 9)))
    share = rng.randint(1, 4)
    best = brute_force(costs, cluster, edge, share)
    if math.isinf(best[0]):
        with pytest.raises(PlanError, match="no chain fits"):
            place_cluster(costs, cluster, edge, share)
        return
    placed = place_cluster(costs, cluster, edge, share)
    assert placed.key == pytest.approx(best, rel=1e-12)
    assert placed.key == price(costs, placed.profile, placed.plan).key
    alone = brute_force(costs, cluster, None)
    if placed.profile.edge is not None:  # the edge only where it is strictly better
        assert placed.busiest_s < alone[0] or (
            placed.busiest_s <= alone[0] * (1 + 1e-12) and placed.latency_s < alone[1]
        )
    else:
        assert placed.key == pytest.approx(alone, rel=1e-12)


def test_a_round_shares_the_edge_among_the_clusters_that_offload(costs: RangeCosts) -> None:
    """Three clusters: one weak, one a little weak, one strong. The weak one gains most; the
    edge's share follows how many offload; the round (its slowest cluster) never gets slower."""
    edge = EdgeServer(device("server", 4e9), wired("up", "client-edge", 1e9))
    fast = [1e9] * 4
    clusters = [
        chain([device("weak", 1e8)] * 3, fast),
        chain([device("mid", 3e8)] * 3, fast),
        chain([device("strong", 1e10)] * 3, fast),
    ]
    alone = [place_cluster(costs, c, None) for c in clusters]
    placed = plan_round(costs, clusters, edge)
    on_edge = [i for i, p in enumerate(placed) if p.profile.edge is not None]
    assert 0 in on_edge and 2 not in on_edge  # the slowest offloads, the strong never
    assert all(placed[i].profile.edge_share == len(on_edge) for i in on_edge)
    assert max(p.busiest_s for p in placed) < max(p.busiest_s for p in alone)
    for p, a in zip(placed, alone, strict=True):
        assert p.busiest_s <= a.busiest_s  # nobody is slower for it
    # Each offloader is priced at its share: alone on the edge it would be faster.
    for i in on_edge:
        solo = place_cluster(costs, clusters[i], edge, share=1, devices=False)
        assert solo.busiest_s <= placed[i].busiest_s
    # A round of identical clusters offloads all of them or none (a tie is no gain).
    same = plan_round(costs, [clusters[0]] * 3, edge)
    assert len({p.profile.edge_share for p in same}) == 1
    assert all(p.profile.edge is not None for p in same)
    # An edge that cannot hold a segment (memory) is never used; a cluster that fits nowhere
    # is named.
    tiny = EdgeServer(device("server", 4e12, memory=1), edge.link)
    assert all(p.profile.edge is None for p in plan_round(costs, clusters, tiny))
    block = costs.peer(0, 1).memory_bytes
    stuck = chain([device("w", 1e9, memory=block)] * 3, fast)  # 3 blocks of 6 fit
    with pytest.raises(PlanError, match=r"cluster\(s\) \[1\] fit neither"):
        plan_round(costs, [clusters[2], stuck], tiny)


@pytest.mark.parametrize("case", range(12))
def test_the_round_busiest_node_is_optimal_over_every_set_of_offloaders(
    case: int, costs: RangeCosts
) -> None:
    """Against every set S of clusters that could offload (each at share |S|): the round's
    busiest node is the least possible (any set that beats the m slowest must contain them, and
    more sharers only slow the edge); the latency tie-break is a heuristic, never worse than
    the devices alone."""
    rng = random.Random(case)
    fast = [1e9] * 3
    clusters = [
        chain([device(f"c{c}p{k}", 10 ** rng.uniform(7, 9)) for k in range(2)], fast)
        for c in range(4)
    ]
    edge = EdgeServer(device("server", 10 ** rng.uniform(8, 10)), wired("up", "client-edge", 1e8))
    alone = [place_cluster(costs, c, None) for c in clusters]
    best = math.inf
    for m in range(len(clusters) + 1):
        for chosen in itertools.combinations(range(len(clusters)), m):
            placed = [
                place_cluster(costs, c, edge, share=m, devices=False) if i in chosen else alone[i]
                for i, c in enumerate(clusters)
            ]
            best = min(best, max(p.busiest_s for p in placed))
    placed = plan_round(costs, clusters, edge)
    assert max(p.busiest_s for p in placed) == pytest.approx(best, rel=1e-12)
    offloaders = [p for p in placed if p.profile.edge is not None]
    assert all(p.profile.edge_share == len(offloaders) for p in offloaders)
    round_alone = (max(p.busiest_s for p in alone), max(p.latency_s for p in alone))
    round_placed = (max(p.busiest_s for p in placed), max(p.latency_s for p in placed))
    assert round_placed == round_alone or faster(round_placed, round_alone)


# -- the run-config -----------------------------------------------------------------------------
def cell(tmp_path: Path, peer: str, devices: int = 6) -> dict[str, object]:
    """A cell of `devices` devices on a line, 10 m apart, one in three with data (so chains
    start, peer, end), every device of profile `peer`; cost profiles where compute decides
    (no sensing, fast wired links): an edge 10x slower than `strong` and 10x faster than
    `slow`, and a `watch` whose memory holds one block of the tiny model but not two."""
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        "[devices.edge-small]\nclock_hz = 1e8\nflops_per_cycle = 1\ntx_power_w = 1.0\n"
        "[devices.slow]\nclock_hz = 1e7\nflops_per_cycle = 1\n"
        "[devices.strong]\nclock_hz = 1e9\nflops_per_cycle = 1\n"
        "[devices.watch]\nclock_hz = 1e9\nflops_per_cycle = 1\nmemory_bytes = 1000000\n"
        '[links.wire-d2d]\nkind = "d2d"\nwired_rate_bps = 1e9\n'
        '[links.wire-up]\nkind = "client-edge"\nwired_rate_bps = 1e9\n'
    )
    population = tmp_path / f"{peer}.toml"
    population.write_text(
        "".join(
            f'[[device]]\nname = "d{i}"\nx_m = {10.0 * i}\ny_m = 0.0\nprofile = "{peer}"\n'
            f"data = {'true' if i % 3 == 0 else 'false'}\n"
            for i in range(devices)
        )
    )
    return {
        "population": str(population),
        "planner": "comm-aware",
        "edge-offload": "auto",
        "cost-profiles": str(profiles),
        "edge-device": "edge-small",
        "uplink": "wire-up",
        "d2d-link": "wire-d2d",
        "depth": 4,
        "embed-dim": 32,
        "num-heads": 2,
        "peers-per-cluster": 1,
        "batch-size": 16,
        "foundation": "none",
        "device": "cpu",
    }


def derived_of(run_config: dict[str, object]) -> Derived:
    return derive(RunConfig.from_run_config(run_config))


def tasks_of(
    derived: Derived, nodes: int, edge_ids: list[int] | None = None
) -> dict[int, ClusterTask]:
    """What the ServerApp sends `nodes` nodes (node n: partition n; `edge_ids`: each one's
    edge-id, partitions counted within the edge)."""
    from gaisnet_flwr.apps.server_app import TaskBuilder, cluster_tasks

    if edge_ids is None:
        identities = {n: NodeIdentity(n, nodes) for n in range(nodes)}
    else:
        per_edge = {e: [n for n in range(nodes) if edge_ids[n] == e] for e in set(edge_ids)}
        identities = {
            n: NodeIdentity(per_edge[e].index(n), len(per_edge[e]), e, n)
            for n, e in enumerate(edge_ids)
        }
    tasks, _ = cluster_tasks(derived, identities, TaskBuilder(derived))
    return tasks


def test_edge_offload_is_a_run_config_choice_refused_by_name(tmp_path: Path) -> None:
    assert RunConfig().cluster.edge_offload == "never"
    with pytest.raises(ConfigError, match="edge-offload='always' is not valid; choose one of "
                       "never, auto"):  # fmt: skip
        RunConfig.of(edge_offload="always")
    given = cell(tmp_path, "slow")
    with pytest.raises(ConfigError, match="needs planner='comm-aware' \\(planner='minmax'"):
        RunConfig.from_run_config({**given, "planner": "minmax"})


def test_the_edge_is_shared_by_the_clusters_each_edge_server_really_has(tmp_path: Path) -> None:
    """The old refusals are gone because the ServerApp knows its nodes before it plans the
    edge's share: identical clusters with 'auto' share each edge among that edge's own
    clusters, and a population over two edge servers shares each among the clusters it runs."""
    identical = {**cell(tmp_path, "slow"), "population": "", "peer-devices": "slow",
                 "start-device": "slow", "end-device": "slow"}  # fmt: skip
    derived = derived_of(identical)
    assert derived.layout is None and derived.edge is not None
    tasks = tasks_of(derived, 3)
    assert all(t.profile.edge is not None and t.profile.edge_share == 3 for t in tasks.values())
    two = derived_of({**identical, "edge-domains": "none,rotate"})
    tasks = tasks_of(two, 3)  # edge 0: nodes 0, 1; edge 1: node 2
    assert [tasks[n].edge for n in range(3)] == [0, 0, 1]
    assert [tasks[n].profile.edge_share for n in range(3)] == [2, 2, 1]
    # a population on two edges: each edge's clusters share only their own edge server
    population = derived_of({**cell(tmp_path, "slow", devices=9), "edge-domains": "none,rotate"})
    assert population.layout is not None and len(population.layout.fine_tuning) == 3
    assert {c.profile.edge_share for c in population.layout.fine_tuning} == {3}  # all, at first
    tasks = tasks_of(population, 3, edge_ids=[0, 0, 1])
    assert [tasks[n].profile.edge_share for n in range(3)] == [2, 2, 1]


def test_offloading_off_forms_the_layout_of_before() -> None:
    """edge-offload='never' (the default) is the comm-aware layout, key for key."""
    from gaisnet_flwr.population.devices import load_spec
    from gaisnet_flwr.population.layout import form_layout

    derived = derived_of({"population": "generated:60:0", "planner": "comm-aware"})
    layout = derived.layout
    p = derived.profiles
    assert derived.costs is not None
    plain = form_layout(
        load_spec("generated:60:0", p), p, p.link("d2d-50m"), p.link("uplink-1mhz"), 3,
        "comm-aware", derived.costs,
    )  # fmt: skip
    assert layout is not None and layout.describe() == plain.describe()
    assert "edge_offload" not in layout.describe()


def test_a_deployed_chain_lists_the_edge_servers_peer_at_its_place() -> None:
    """In a deployment the edge's segment is a gaisnet-peer: the start point names the members
    by the chain (the edge's calls say "edge at ...") and refuses a `peers` list that does not
    match the chain, naming the chain it expects."""
    from gaisnet_flwr.deploy.remote import NetworkPeers, PeerError, PeerSettings
    from gaisnet_flwr.split.chain import OptimizerSpec

    settings = PeerSettings.from_node_config({"peers": "10.0.0.11:50051,10.0.0.12:50051"})
    assert settings is not None
    peers = NetworkPeers(settings, {}, OptimizerSpec("sgd", 0.1), members=["edge", "peer1", "end"])
    with pytest.raises(
        PeerError,
        match=r"chain after the start point is edge -> peer1 -> end: give 3 addresses in "
        r"'peers', in that order \(the edge server's gaisnet-peer at its place\)",
    ):
        peers.open(meta_model(), SplitPlan.from_sizes([3, 3]), True, 0.0)


# -- exactness ----------------------------------------------------------------------------------
def test_a_chain_with_an_edge_segment_trains_bit_for_bit_like_the_unsplit_model(
    tmp_path: Path,
) -> None:
    """The plan the planner made with the edge's segment in it, run as the ClientApp runs it
    (train_cluster: the edge's segment is one more in-process peer), against the unsplit model
    on the same batches, with AdamW: bit for bit."""
    derived = derived_of({**cell(tmp_path, "watch"), "optimizer": "adamw"})
    cfg, layout = derived.cfg, derived.layout
    assert layout is not None
    (plan,) = {c.plan for c in layout.fine_tuning}
    assert layout.fine_tuning[0].edge_blocks is not None and plan.num_peers == 2
    data = load_image_data(derived.spec)
    train = Subset(data.train, range(48))  # 3 steps
    split = build_model(cfg.model, cfg.cloud, data.num_classes, cfg.run.seed)
    whole = copy.deepcopy(split)
    train_cluster(split, plan, train, cfg.training, seed=5)
    train_centralised(whole, train, cfg.training, epochs=1, seed=5)
    expected = whole.tunable_state()
    for key, value in split.tunable_state().items():
        assert torch.equal(value, expected[key]), key


# -- a run --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("peer", "offloads"), [("watch", True), ("slow", True), ("strong", False)])
def test_a_run_with_weak_devices_completes_on_the_edge_and_reports_it(
    tmp_path: Path, peer: str, offloads: bool
) -> None:
    """The real ServerApp and ClientApp in process: 2 clusters of a weak cell (memory for one
    block, or 10x slower than the edge) run their chains with the edge's segment; clusters.json
    shows it, the round's latency is the slowest cluster's prediction, and the edge's part is
    reported apart. A strong cell (10x faster than the edge) keeps its chains to itself."""
    from gaisnet_flwr.apps.inprocess import run_inprocess

    out = tmp_path / "out"
    config = {**cell(tmp_path, peer), "num-rounds": 1, "inference-requests": 0,
              "output-dir": str(out)}  # fmt: skip
    run = run_inprocess(config, 2)
    report = json.loads((out / "clusters.json").read_text())
    assert report["edge_offload"] == "auto" and len(report["fine_tuning"]) == 2
    (row,) = [r for r in run.metrics() if r["round"] == 1]
    assert row["train/num-clusters"] == 2
    slowest = max(c["predicted_round"]["latency_s"] for c in report["fine_tuning"])
    assert row["train/latency-s"] == pytest.approx(slowest, rel=1e-12)
    for cluster in report["fine_tuning"]:
        roles = [m["role"] for m in cluster["members"]]
        predicted = cluster["predicted_round"]
        if not offloads:
            assert roles == ["start", "peer1", "end"] and "edge_server" not in cluster
            assert "edge_flops" not in predicted
            continue
        assert "edge" in roles and cluster["edge_server"]["share"] == 2
        (edge,) = [m for m in cluster["members"] if m["role"] == "edge"]
        assert (
            edge["profile"] == "edge-small" and edge["blocks"] == cluster["edge_server"]["blocks"]
        )
        assert [h["link"] for h in cluster["hops"] if "edge" in (h["from"], h["to"])] == [
            "client-edge"
        ] * 2
        assert predicted["edge_flops"] > 0 and predicted["edge_hop_bytes"] > 0
    # what the clusters reported: the edge's compute, energy and hops apart from the devices'
    edge_keys = ("train/edge-flops", "train/edge-energy-j", "train/edge-hop-bytes")
    if offloads:
        assert all(row[k] > 0 for k in edge_keys)
        assert row["train/edge-flops"] == pytest.approx(
            sum(c["predicted_round"]["edge_flops"] for c in report["fine_tuning"]), rel=1e-12
        )
        assert row["train/cs-bytes"] == sum(
            c["predicted_round"]["cs_bytes"] for c in report["fine_tuning"]
        )
    else:
        assert all(row[k] == 0 for k in edge_keys)


def test_the_planner_benchmark_finds_the_edge_never_slower(tmp_path: Path) -> None:
    """bench_planner's edge tables (tiny model): every comparison with the devices alone, for
    the cluster and for the population's round, and the exhaustive best set of offloaders."""
    from gaisnet_flwr.experiments.bench_planner import main

    out = tmp_path / "edge.csv"
    args = ["--model", "tiny", "--samples", "64", "--bandwidths-mhz", "1,0.05", "--edge-csv",
            str(out)]  # fmt: skip
    assert main(args) == 0  # exit 1 if the edge's placement were slower anywhere
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["table"] for r in rows} == {"edge-cluster", "edge-population", "edge-round"}
    for r in (r for r in rows if r["table"] == "edge-round"):
        # the round's busiest node with the planner's rule is the best over every set
        assert float(r["busiest_edge_s"]) == pytest.approx(float(r["busiest_best_set_s"]))
        assert float(r["latency_best_set_s"]) <= float(r["latency_edge_s"]) * (1 + 1e-12)


# -- a deployment -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.simulation
def test_the_edge_servers_segment_runs_as_a_peer_in_a_lab(tmp_path: Path) -> None:
    """A lab on loopback (`scripts/lab.py`'s Lab, from a population run-config): a
    `flower-superlink`, one `flower-supernode` and a `gaisnet-peer` per member of the chain
    after the start point, the edge server's among them (`edge-c0`; on real devices, the edge
    machine's). Devices with memory for one block: the edge takes the rest. The round and an
    inference request go through the edge's peer and train the modules of the in-process run;
    every process is stopped by PID."""
    from gaisnet_flwr.apps.inprocess import run_inprocess
    from gaisnet_flwr.experiments import flwr_local
    from gaisnet_flwr.experiments.lab import Lab

    config: dict[str, Any] = {
        **cell(tmp_path, "watch", devices=3),  # one chain: start, one peer, end point
        "num-rounds": 1,
        "inference-requests": 1,
        "fraction-evaluate": 0.0,
        "seed": 3,
    }
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    lab = Lab.for_run_config(tmp_path / "lab", text)
    assert lab.clusters == 1 and "edge" in lab.chains[0]
    member = lab.chains[0].index("edge") + 1
    started: dict[str, int] = {}
    try:
        lab.up()
        started = {name: p.pid for name, p in lab.procs.items()}
        assert "edge-c0" in started  # the edge server's gaisnet-peer
        assert lab.peer_address(0, member) in lab.node_config(0)
        outcome = lab.run(text)
    finally:
        started |= {name: p.pid for name, p in lab.procs.items()}
        lab.down()
    alive = [p for p in flwr_local.family(set(started.values())) if p.alive]
    assert not alive, f"left running: {alive}"
    assert outcome.ok, f"{outcome.problems}\n{outcome.log.read_text()[-3000:]}"
    deployed = outcome.results
    report = json.loads((deployed / "clusters.json").read_text())
    (cluster,) = report["fine_tuning"]
    assert [m["role"] for m in cluster["members"]][member] == "edge"

    # The same modules as the in-process run, where the edge's segment is an in-process peer.
    simulated = tmp_path / "sim"
    run_inprocess({**config, "output-dir": str(simulated)}, 1)
    got = np.load(deployed / "rounds" / "round-001.npz")
    want = np.load(simulated / "rounds" / "round-001.npz")
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    (row,) = [r for r in json.loads((deployed / "metrics.json").read_text()) if r["round"] == 1]
    assert row["failed-clusters"] == 0 and row["train/edge-flops"] > 0
    # the edge's peer served the round's session and the inference request
    log = (lab.logs / "edge-c0.log").read_text()
    assert log.count("opened") >= 2, log
    (served,) = json.loads((deployed / "inference.json").read_text())
    assert "error" not in served and served["edge-flops"] > 0
