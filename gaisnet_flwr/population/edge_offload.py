"""The edge server as a cooperative node of a chain (paper Sec. III-C, III-D: "when the end
clients' computing resources are limited, the edge server can also act as a cooperative node,
and part of the fine-tuning [inference] tasks can be executed at the edge server").

Run-config `edge-offload`: "never" (the default: chains of the cluster's own devices) or "auto".
With "auto" the planner may insert the edge server as one more middle node of a chain, between
any two consecutive nodes (after the start point, between two peers, or before the end point),
holding a contiguous range of blocks like any peer:

    start -> peer1 -> edge -> peer2 -> end        (hops into and out of the edge: client-edge)

The edge's node is priced with the edge's device profile (`edge-device`) and the client-edge link
(`uplink`) in both directions of its two hops (the device sends at most its own transmit power,
the edge at most its own); every other hop stays D2D. Each candidate chain (the devices alone,
and the edge at each position) is split by the communication-aware min-max planner
(`split.plan.plan_min_max_stages` with `planning.peer_time_s`: each node's compute plus what it
sends, within its memory), and the candidate with the least busiest node wins: the cost model's
`RoundCost.bottleneck_s` of the round (sensing, compute and sends of every node, the edge's
included). The devices alone win ties: the edge takes a segment only when that lowers it.

The edge server is shared. Its compute is divided equally among the clusters whose segments it
runs in the same round (processor sharing): a cluster that offloads, one of m that do, gets 1/m
of the edge's FLOP/s (`ClusterProfile.edge_share = m`; energy per FLOP unchanged). Its memory
holds all their segments at once. Which clusters offload is settled per round (`plan_round`):
the m clusters slowest on their own devices, for the m that makes the round (its slowest
cluster, which the round waits for: paper Fig. 4) shortest, m = 0 (nobody) unless some m lowers
it. An inference request is a round of its own (one service per round, paper Sec. IV-C), so an
inference loop is planned with the whole edge (`place_cluster`, share 1).

The chain code does not change: the edge's segment is one more peer segment (simulation: in the
cluster's ClientApp; deployment: a `gaisnet-peer` on the edge machine).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from gaisnet_flwr.costs.pricing import ClusterProfile
from gaisnet_flwr.costs.profiles import CostConfigError, DeviceProfile, LinkProfile
from gaisnet_flwr.population.planning import (
    RangeCosts,
    peer_time_s,
    plan_cluster,
    predicted_round_cost,
)
from gaisnet_flwr.split.plan import PlanError, SplitPlan, plan_min_max_stages

EDGE_OFFLOAD = ("never", "auto")
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
    a segment), `plan` over that chain's middle nodes, and the objective it was chosen by: the
    cost model's busiest node in the round (`RoundCost.bottleneck_s`)."""

    plan: SplitPlan
    profile: ClusterProfile
    busiest_s: float

    @property
    def edge_blocks(self) -> tuple[int, int] | None:
        """The blocks [start, stop) the edge server holds, or None."""
        edge = self.profile.edge
        return None if edge is None else self.plan.ranges[edge - 1]


def busiest_s(costs: RangeCosts, profile: ClusterProfile, plan: SplitPlan) -> float:
    """The cost model's busiest node (sensing + compute + sends) under `costs`' workload; the
    upload is the tunable modules in float32 (the record's few header bytes left out)."""
    modules = sum(p.numel() * p.element_size() for p in costs.model.tunable_parameters())
    return predicted_round_cost(costs, profile, plan, modules, 0).bottleneck_s


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
    return Placement(plan, profile, busiest_s(costs, profile, plan))


def place_cluster(
    costs: RangeCosts,
    cluster: ClusterProfile,
    edge: EdgeServer | None,
    share: int = 1,
    devices: bool = True,
) -> Placement:
    """The best chain of `cluster`: its devices alone (unless `devices` is False), and the edge
    server (shared by `share` clusters) at each position; the least busiest node wins, earlier
    candidates (the devices alone first) on ties.

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
        if best is None or placed.busiest_s < best.busiest_s * (1 - TIE):
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
    that makes the slowest cluster fastest (the smallest such m).

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
    slow = [math.inf if p is None else p.busiest_s for p in alone]
    order = sorted(range(len(clusters)), key=lambda i: (-slow[i], i))
    best: list[Placement | None] = list(alone)
    best_round = max(slow, default=0.0)
    for m in range(1, len(clusters) + 1):
        placed: dict[int, Placement] = {}
        for i in order[:m]:
            try:
                p = place_cluster(costs, clusters[i], edge, share=m, devices=False)
            except PlanError:
                break  # its segment fits the edge at no share: no larger m helps
            if not p.busiest_s < best_round * (1 - TIE):
                break  # it only gets slower as more clusters share the edge
            placed[i] = p
        if len(placed) < m:
            break
        held = sum(
            costs.peer(*p.edge_blocks).memory_bytes for p in placed.values() if p.edge_blocks
        )
        if held > edge.device.memory_bytes:
            continue  # the edge cannot hold these m clusters' segments at once
        rest = [slow[i] for i in order[m:]]
        round_s = max([*rest, *(p.busiest_s for p in placed.values())])
        if round_s < best_round * (1 - TIE):
            best_round = round_s
            best = [placed.get(i, alone[i]) for i in range(len(clusters))]
    missing = [i for i, p in enumerate(best) if p is None]
    if missing:
        raise PlanError(
            f"cluster(s) {missing} fit neither on their own devices nor with their share of the "
            f"edge server ({edge.device.name}, {edge.device.memory_bytes / 2**30:.0f} GiB)"
        )
    return [p for p in best if p is not None]
