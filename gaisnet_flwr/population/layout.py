"""The clusters a run forms from its device population (paper Sec. III-C/D, IV-B).

`form_layout` runs the clustering of service/clustering.py over the population: first an
inference cluster (a closed loop: start point -> peers -> end point -> start point) around every
device that requests inference, then fine-tuning clusters (chains) from the devices that hold
data. Every cluster gets its own devices (their profiles), its own links (one D2D link per hop,
its rate from the distance between the two devices: the `d2d-link` profile's bandwidth and power
at that distance, Shannon) and therefore its own split plan, priced by the cost model. A chain
that no plan fits (memory) is passed over. Devices left out are reported with the reason;
nothing is dropped silently. With an edge server (`edge-offload='auto'`, population/edge_offload.py)
a chain may also hold the edge as a node: the fine-tuning chains share it in each round
(`plan_round`: all of the population's, until the ServerApp knows which clusters run on which
edge server and re-places each edge's own with `share_edge`), each inference loop has it to
itself.

The layout is a pure function of the run-config (population, profiles, model, planner,
peers-per-cluster, batch size, optimizer), built once in the ServerApp's preparation
(`derived.derive`); `digest` fingerprints it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gaisnet_flwr.costs.pricing import RoundCost
from gaisnet_flwr.costs.profiles import ClusterProfile, CostConfigError, LinkProfile, Profiles
from gaisnet_flwr.population.devices import Population, PopulationDevice, PopulationError
from gaisnet_flwr.population.edge_offload import (
    EdgeServer,
    Placement,
    capped,
    place_cluster,
    plan_round,
)
from gaisnet_flwr.population.planning import RangeCosts, fits_memory, plan_cluster
from gaisnet_flwr.service.clustering import Device, form_clusters
from gaisnet_flwr.split.plan import PlanError, SplitPlan

KINDS = ("fine-tuning", "inference")
MIN_DISTANCE_M = 1.0  # two devices at one spot: the path-loss formula needs d > 0


@dataclass(frozen=True)
class FormedCluster:
    """One cluster: its members in chain order (start point, peers, end point), its cost-model
    profile (their devices and links, and the edge server's node where the chain holds one)
    and its split plan (over the chain's middle nodes: the peers and the edge)."""

    kind: str  # one of KINDS
    index: int  # among the clusters of its kind, in the order they were formed
    members: tuple[PopulationDevice, ...]
    profile: ClusterProfile
    plan: SplitPlan
    own: ClusterProfile | None = None  # its devices alone (where the edge may be placed)

    @property
    def start(self) -> PopulationDevice:
        return self.members[0]

    @property
    def edge_blocks(self) -> tuple[int, int] | None:
        """The blocks [start, stop) the edge server holds in this chain, or None."""
        edge = self.profile.edge
        return None if edge is None else self.plan.ranges[edge - 1]

    def describe(self) -> dict[str, Any]:
        """Members, links and plan as plain data (clusters.json). The edge server's node, where
        the chain has one, is a member with role "edge" (no device of the population)."""
        p = self.profile
        roles = p.names
        devices = iter(self.members)
        members = []
        for k, (role, device) in enumerate(zip(roles, p.devices, strict=True)):
            blocks = list(self.plan.ranges[k - 1]) if 0 < k <= self.plan.num_peers else []
            d = None if k == p.edge else next(devices)
            members.append(
                {
                    "role": role,
                    "device": d.name if d else "edge server",
                    "profile": d.profile if d else device.name,
                    "x_m": d.x_m if d else None,
                    "y_m": d.y_m if d else None,
                    "blocks": blocks,
                }
            )
        hops = []
        for a, b, link in zip(roles, roles[1:], p.hops, strict=False):
            hop = {"from": a, "to": b, "distance_m": link.distance_m, "rate_bps": link.rate_bps()}
            if "edge" in (a, b):
                hop["link"] = "client-edge"
            hops.append(hop)
        described: dict[str, Any] = {
            "kind": self.kind,
            "index": self.index,
            "start": self.start.name,
            "members": members,
            "hops": hops,
            "result_link": {"distance_m": p.result.distance_m, "rate_bps": p.result.rate_bps()}
            if self.kind == "inference"
            else None,
            "plan": self.plan.sizes(),
        }
        if self.edge_blocks is not None:
            described["edge_server"] = {"blocks": list(self.edge_blocks), "share": p.edge_share}
        return described


@dataclass(frozen=True)
class ClusterLayout:
    """Every cluster formed from a population, and the devices in none (device -> why)."""

    population: Population
    planner: str
    fine_tuning: tuple[FormedCluster, ...]
    inference: tuple[FormedCluster, ...]
    unplaced: Mapping[str, str]
    edge_offload: str = "never"  # "auto": chains may hold the edge server (edge_offload.py)

    def inference_for(self, requester: str) -> FormedCluster:
        for cluster in self.inference:
            if cluster.start.name == requester:
                return cluster
        formed = [c.start.name for c in self.inference]
        why = self.unplaced.get(requester, "it does not request inference")
        raise PopulationError(
            f"device {requester!r} has no inference cluster ({why}); requesters with one: {formed}"
        )

    def describe(self) -> dict[str, Any]:
        described = {
            "population": self.population.source,
            "devices": len(self.population),
            "planner": self.planner,
            "fine_tuning": [c.describe() for c in self.fine_tuning],
            "inference": [c.describe() for c in self.inference],
            "unplaced": dict(self.unplaced),
        }
        if self.edge_offload != "never":
            described["edge_offload"] = self.edge_offload
        return described

    def digest(self) -> int:
        """A 48-bit fingerprint of the layout (members and plans), equal on every party that
        formed the same one; fits a MetricRecord int exactly."""
        text = json.dumps(self.describe(), sort_keys=True)
        return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def d2d_link(
    template: LinkProfile, sender: PopulationDevice, receiver: PopulationDevice, tx_power_w: float
) -> LinkProfile:
    """The D2D link from `sender` to `receiver`: `template` (the d2d-link profile) at their
    distance, transmitting at most what the sender's device can. A wired template is kept."""
    if template.wired_rate_bps is not None:
        return dataclasses.replace(template, name=f"{sender.name}->{receiver.name}")
    assert template.tx_power_w is not None
    return dataclasses.replace(
        template,
        name=f"{sender.name}->{receiver.name}",
        distance_m=max(sender.distance_m(receiver), MIN_DISTANCE_M),
        tx_power_w=min(template.tx_power_w, tx_power_w),
    )


def cluster_profile(
    members: Sequence[PopulationDevice],
    profiles: Profiles,
    d2d: LinkProfile,
    uplink: LinkProfile,
    loop: bool,
) -> ClusterProfile:
    """Devices and links of a chain of population devices (with the result link end -> start
    for an inference loop)."""
    devices = tuple(profiles.device(m.profile) for m in members)
    hops = tuple(
        d2d_link(d2d, a, b, dev.tx_power_w)
        for a, b, dev in zip(members, members[1:], devices, strict=False)
    )
    result = d2d_link(d2d, members[-1], members[0], devices[-1].tx_power_w) if loop else None
    return ClusterProfile(devices, hops, capped(uplink, devices[0]), result)


def check_memory(population: Population, profiles: Profiles, costs: RangeCosts) -> None:
    """Refuse, naming the device, one whose memory holds no segment at all (neither the start
    point's, the end point's, nor one block's): no cluster can take it."""
    need = min(costs.start.memory_bytes, costs.end.memory_bytes, costs.smallest_peer_memory())
    for d in population.devices:
        have = profiles.device(d.profile).memory_bytes
        if have < need:
            raise PopulationError(
                f"{population.source}: device {d.name!r} ({d.profile}) has {have / 2**20:.1f} MiB "
                f"of memory; the smallest segment of this model needs {need / 2**20:.1f} MiB: no "
                f"cluster can take it"
            )


def form_layout(
    population: Population,
    profiles: Profiles,
    d2d: LinkProfile,
    uplink: LinkProfile,
    peers_per_cluster: int,
    planner: str,
    costs: RangeCosts,
    edge: EdgeServer | None = None,
) -> ClusterLayout:
    """The clusters of `population` (module docstring); `costs` holds the model and the
    workload the plans are sized on. With `edge` (edge-offload 'auto', planner 'comm-aware')
    a chain is taken if it fits with or without the edge server, and the chains' final plans
    come from `plan_round` (fine-tuning: they share the edge) and `place_cluster` (inference)."""
    if edge is not None and planner != "comm-aware":
        raise PlanError(f"the edge server is placed by the comm-aware planner, not {planner!r}")
    check_memory(population, profiles, costs)
    by_name = {d.name: d for d in population.devices}
    graph = [
        Device(
            d.name,
            d.x_m,
            d.y_m,
            profiles.device(d.profile).flops_per_second,
            d2d_range_m=d.d2d_range_m,
            has_data=d.data,
        )
        for d in population.devices
    ]
    loops = set(population.requesters)

    def plan_chain(chain: Sequence[Device]) -> SplitPlan | None:
        members = [by_name[c.name] for c in chain]
        try:
            profile = cluster_profile(members, profiles, d2d, uplink, chain[0].name in loops)
            if edge is not None:
                placed = place_cluster(costs, profile, edge)  # the edge at its best: share 1
                profile, plan = placed.profile, placed.plan
            else:
                plan = plan_cluster(planner, costs, profile)
        except (PlanError, CostConfigError):
            return None
        return None if fits_memory(costs, profile, plan) else plan

    clustering = form_clusters(
        graph,
        peers_per_cluster,
        costs.depth,
        inference_starts=population.requesters,
        plan_chain=plan_chain,
    )
    chains: dict[str, list[tuple[tuple[PopulationDevice, ...], ClusterProfile]]] = {
        kind: [] for kind in KINDS
    }
    for c in clustering.clusters:
        members = tuple(by_name[d.name] for d in c.chain)
        profile = cluster_profile(members, profiles, d2d, uplink, c.kind == "inference")
        chains[c.kind].append((members, profile))
    plans: dict[str, list[SplitPlan | Placement]] = {
        kind: [c.plan for c in clustering.clusters if c.kind == kind] for kind in KINDS
    }
    if edge is not None:
        fine_tuning = [profile for _, profile in chains["fine-tuning"]]
        plans["fine-tuning"] = list(plan_round(costs, fine_tuning, edge))
        plans["inference"] = [place_cluster(costs, p, edge) for _, p in chains["inference"]]
    formed: dict[str, list[FormedCluster]] = {kind: [] for kind in KINDS}
    for kind in KINDS:
        for index, ((members, profile), planned) in enumerate(
            zip(chains[kind], plans[kind], strict=True)
        ):
            own = profile
            if isinstance(planned, Placement):
                profile, planned = planned.profile, planned.plan
            formed[kind].append(FormedCluster(kind, index, members, profile, planned, own))
    return ClusterLayout(
        population,
        planner,
        tuple(formed["fine-tuning"]),
        tuple(formed["inference"]),
        dict(clustering.unplaced),
        "never" if edge is None else "auto",
    )


def share_edge(
    layout: ClusterLayout, groups: Iterable[Sequence[int]], costs: RangeCosts, edge: EdgeServer
) -> ClusterLayout:
    """`layout` with the fine-tuning clusters of each group (those one edge server serves in a
    round: the ServerApp knows them once its nodes are assigned) placed by `plan_round` over
    that group alone; clusters in no group keep their placement."""
    fine_tuning = list(layout.fine_tuning)
    for group in groups:
        clusters = [fine_tuning[i] for i in group]
        own = [c.own or c.profile for c in clusters]
        for c, placed in zip(clusters, plan_round(costs, own, edge), strict=True):
            fine_tuning[c.index] = dataclasses.replace(c, profile=placed.profile, plan=placed.plan)
    return dataclasses.replace(layout, fine_tuning=tuple(fine_tuning))


def round_summary(cost: RoundCost) -> dict[str, float]:
    """A predicted round (or request) by the paper's metrics: latency, the busiest node, and
    sensing, compute and communication side by side."""
    return {
        "latency_s": cost.latency_s,
        "bottleneck_s": cost.bottleneck_s,
        "sensing_s": cost.sensing_s,
        "compute_s": cost.compute_s,
        "d2d_s": cost.d2d_s,
        "download_s": cost.download_s,
        "upload_s": cost.upload_s,
        "energy_j": cost.energy_j,
        "sensing_j": cost.sensing_j,
        "compute_j": cost.compute_j,
        "tx_j": cost.tx_j,
        "d2d_bytes": cost.d2d_bytes,
        "cs_bytes": cost.cs_bytes,
    } | (
        {
            # the edge server's part, apart from the devices' (its hops: client-edge traffic)
            "edge_compute_s": cost.edge_compute_s,
            "edge_energy_j": cost.edge_energy_j,
            "edge_flops": cost.edge_flops,
            "edge_hop_bytes": cost.cs_hop_bytes,
            "edge_hop_s": cost.cs_hop_s,
        }
        if cost.edge is not None
        else {}
    )
