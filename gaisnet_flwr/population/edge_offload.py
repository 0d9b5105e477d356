"""The edge server as a cooperative node of a chain (paper Sec. III-C, III-D: "when the end
clients' computing resources are limited, the edge server can also act as a cooperative node,
and part of the fine-tuning [inference] tasks can be executed at the edge server").

Run-config `edge-offload` (config.EDGE_OFFLOAD): "never" (the default: chains of the cluster's
own devices) or "auto". With "auto" the planner may insert the edge server as one more middle
node of a chain, between any two consecutive nodes (after the start point, between two peers,
or before the end point), holding a contiguous range of blocks like any peer:

    start -> peer1 -> edge -> peer2 -> end        (hops into and out of the edge: client-edge)

The edge's node is priced with the edge's device profile (`edge-device`) and the client-edge link
(`uplink`) in both directions of its two hops (the device sends at most its own transmit power,
the edge at most its own); every other hop stays D2D. Every device of the cluster keeps at least
one block (all members take part, paper Sec. III-C); the edge takes a range of its own.

Each candidate chain (the devices alone, and the edge at each position) is split by the
communication-aware min-max planner (`split.plan.plan_min_max_stages` with
`planning.peer_time_s`: each node's compute plus what it sends, within its memory), and the
candidates are compared as that planner compares splits: the least busiest node first (the cost
model's `RoundCost.bottleneck_s`: sensing, compute and sends of every node, the edge's
included), then the least serial round latency (`RoundCost.latency_s`, the critical path of
strictly sequential split learning). The devices alone win ties on both: the edge takes a
segment only when that lowers the round's busiest node, or its latency at an equal busiest node.

The edge server is shared. Its compute is divided equally among the clusters whose segments it
runs in the same round (processor sharing): a cluster that offloads, one of m that do, gets 1/m
of the edge's FLOP/s (`ClusterProfile.edge_share = m`; energy per FLOP unchanged). Its memory
holds all their segments at once. Which clusters offload is settled per round (`plan_round`):
the m clusters slowest on their own devices, for the m that makes the round shortest (the
busiest node of its slowest cluster, then the slowest cluster's latency: the round waits for
it, paper Fig. 4), m = 0 (nobody) unless some m lowers it. An inference request is a round of
its own (one service per round, paper Sec. IV-C), so an inference loop is planned with the
whole edge (`place_cluster`, share 1).

The chain code does not change: the edge's segment is one more peer segment (simulation: in the
cluster's ClientApp; deployment: a `gaisnet-peer` on the edge machine).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from gaisnet_flwr.costs.profiles import ClusterProfile, CostConfigError, DeviceProfile, LinkProfile
from gaisnet_flwr.population.planning import (
    RangeCosts,
    peer_time_s,
    plan_cluster,
    predicted_round_cost,
)
from gaisnet_flwr.split.plan import PlanError, SplitPlan, plan_min_max_stages

TIE = 1e-12  # relative: a candidate must be faster than this to win


@dataclass(frozen=True)
class EdgeServer:
    """The edge server as a chain node: its device profile and the client-edge link between it
    and any device of its cell (the same link both ways)."""

    device: DeviceProfile
    link: LinkProfile

    def __post_init__(self) -> None:
        if self.link.kind != "client-edge":
            raise CostConfigError(
                f"the edge server's link {self.link.name!r} is a {self.link.kind} link; it must "
                f"be a client-edge link"
            )


def capped(link: LinkProfile, sender: DeviceProfile) -> LinkProfile:
    """`link` as `sender` transmits on it: at most the sender's power (a wired link is kept)."""
    if link.wired_rate_bps is not None:
        return link
    return dataclasses.replace(link, tx_power_w=min(link.power_w, sender.tx_power_w))


def with_edge(
    cluster: ClusterProfile, edge: EdgeServer, node: int, share: int = 1
) -> ClusterProfile:
    """`cluster` (its devices only) with the edge server inserted as chain node `node`
    (1 .. K + 1: after node - 1, before the old node `node`), its compute shared by `share`
    clusters. The D2D hop it replaces becomes two client-edge hops."""
    if cluster.edge is not None:
        raise ValueError("the cluster already has an edge node")
    if not 1 <= node <= len(cluster.devices) - 1:
        raise ValueError(
            f"the edge goes between two nodes: 1 <= node <= {len(cluster.devices) - 1}"
        )
    devices = [*cluster.devices[:node], edge.device, *cluster.devices[node:]]
    into = capped(edge.link, cluster.devices[node - 1])
    out = capped(edge.link, edge.device)
    hops = [*cluster.hops[: node - 1], into, out, *cluster.hops[node:]]
    return ClusterProfile(
        tuple(devices),
        tuple(hops),
        cluster.uplink,
        cluster.result,  # end -> start stays the D2D link it was
        edge=node,
        edge_share=share,
    )


@dataclass(frozen=True)
class Placement:
    """A cluster's chain as it runs: `profile` (its devices, and the edge server where it holds
    a segment), `plan` over that chain's middle nodes, and what it was chosen by: the cost
    model's busiest node in the round (`RoundCost.bottleneck_s`) and the round's serial latency
    (`RoundCost.latency_s`), under the workload the plans are sized on."""

    plan: SplitPlan
    profile: ClusterProfile
    busiest_s: float
    latency_s: float

    @property
    def edge_blocks(self) -> tuple[int, int] | None:
        """The blocks [start, stop) the edge server holds, or None."""
        edge = self.profile.edge
        return None if edge is None else self.plan.ranges[edge - 1]

    def beats(self, other: Placement | None) -> bool:
        """Strictly better: a less busy busiest node, or as busy and a shorter latency."""
        return other is None or faster(self.key, other.key)

    @property
    def key(self) -> tuple[float, float]:
        return (self.busiest_s, self.latency_s)


def faster(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(busiest, latency) `a` strictly before `b`, each compared to a relative `TIE`."""
    if a[0] < b[0] * (1 - TIE):
        return True
    return a[0] <= b[0] * (1 + TIE) and a[1] < b[1] * (1 - TIE)


def price(costs: RangeCosts, profile: ClusterProfile, plan: SplitPlan) -> Placement:
    """`plan` over `profile` by the cost model, under `costs`' workload; the download and the
    upload are the tunable modules in float32 (the record's few header bytes left out)."""
    modules = sum(p.numel() * p.element_size() for p in costs.model.tunable_parameters())
    cost = predicted_round_cost(costs, profile, plan, modules, modules)
    return Placement(plan, profile, cost.bottleneck_s, cost.latency_s)


def split(costs: RangeCosts, profile: ClusterProfile) -> Placement:
    """The communication-aware min-max split of `profile`'s middle nodes (edge or not)."""
    if profile.edge is None:
        plan = plan_cluster("comm-aware", costs, profile)
    else:
        plan = plan_min_max_stages(
            costs.depth,
            len(profile.devices) - 2,
            lambda k, a, b: peer_time_s(costs, profile, k, a, b),
        )
    return price(costs, profile, plan)


def place_cluster(
    costs: RangeCosts,
    cluster: ClusterProfile,
    edge: EdgeServer | None,
    share: int = 1,
    devices: bool = True,
) -> Placement:
    """The best chain of `cluster`: its devices alone (unless `devices` is False), and the edge
    server (shared by `share` clusters) at each position; the least busiest node, then the
    least latency, wins; earlier candidates (the devices alone first) on ties.

    Raises:
        PlanError: no candidate fits every node's memory.
    """
    candidates = [cluster] if devices else []
    if edge is not None and len(cluster.devices) - 1 <= costs.depth:  # a block for each node
        candidates += [
            with_edge(cluster, edge, node, share) for node in range(1, len(cluster.devices))
        ]
    best: Placement | None = None
    reasons = []
    for profile in candidates:
        try:
            placed = split(costs, profile)
        except PlanError as err:
            reasons.append(str(err))
            continue
        if placed.beats(best):
            best = placed
    if best is None:
        tried = [("its devices alone", devices), ("the edge at each position", edge is not None)]
        what = " or ".join(t for t, on in tried if on)
        raise PlanError(f"no chain fits ({what}): {reasons[0] if reasons else 'no candidate'}")
    return best


def plan_round(
    costs: RangeCosts, clusters: Sequence[ClusterProfile], edge: EdgeServer
) -> list[Placement]:
    """The placements of one round's clusters, which share one edge server (module docstring):
    the m clusters slowest on their own devices offload, each with 1/m of the edge, for the m
    that makes the round fastest (its slowest busiest node, then its slowest latency; the
    smallest such m).

    A cluster no devices-only plan fits (memory) counts as infinitely slow on its own: it
    offloads first. Each offloader is placed with the edge (`place_cluster(devices=False)`);
    the edge's memory must hold every offloader's segment.

    Raises:
        PlanError: some cluster fits neither alone nor with its share of the edge.
    """
    alone: list[Placement | None] = []
    for cluster in clusters:
        try:
            alone.append(split(costs, cluster))
        except PlanError:
            alone.append(None)
    slow = [(math.inf, math.inf) if p is None else p.key for p in alone]
    order = sorted(range(len(clusters)), key=lambda i: (-slow[i][0], -slow[i][1], i))

    def round_key(chosen: Sequence[tuple[float, float]]) -> tuple[float, float]:
        return (max(c[0] for c in chosen), max(c[1] for c in chosen))

    best: list[Placement | None] = list(alone)
    best_round = round_key(slow) if slow else (0.0, 0.0)
    for m in range(1, len(clusters) + 1):
        placed: dict[int, Placement] = {}
        for i in order[:m]:
            try:
                p = place_cluster(costs, clusters[i], edge, share=m, devices=False)
            except PlanError:
                break  # its segment fits the edge at no share: no larger m helps
            if p.busiest_s > best_round[0] * (1 + TIE):
                break  # its busiest node only grows as more clusters share the edge
            placed[i] = p
        if len(placed) < m:
            break
        held = sum(
            costs.peer(*p.edge_blocks).memory_bytes for p in placed.values() if p.edge_blocks
        )
        if held > edge.device.memory_bytes:
            continue  # the edge cannot hold these m clusters' segments at once
        round_now = round_key([slow[i] for i in order[m:]] + [p.key for p in placed.values()])
        if faster(round_now, best_round):
            best_round = round_now
            best = [placed.get(i, alone[i]) for i in range(len(clusters))]
    missing = [i for i, p in enumerate(best) if p is None]
    if missing:
        raise PlanError(
            f"cluster(s) {missing} fit neither on their own devices nor with their share of the "
            f"edge server ({edge.device.name}, {edge.device.memory_bytes / 2**30:.0f} GiB)"
        )
    return [p for p in best if p is not None]
