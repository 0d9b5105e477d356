"""The paper's key metrics as a cost model (paper Sec. III-C.2 and III-D.2).

For one client cluster (start point -> peers -> end point, split/chain.py) and one fine-tuning
round or one inference request, this module turns FLOPs (split/flops.py) and bytes per hop
(ChainStats) into latency, computing cost, energy and communication per node, and a round's
latency through the edge and cloud hierarchy. It is pure: no Flower, no clocks; the apps pass in
what they counted. Device and link profiles are in profiles.py, memory per node in memory.py.

Conventions (the cost models of split-learning edge papers):

    compute time     t = FLOPs / (f * phi)               f clock (Hz), phi FLOPs per cycle
    compute energy   E = kappa * cycles * f^2            cycles = FLOPs / phi, kappa ~ 1e-28
    transmission     t = 8 * bytes / r,  E = p * t       the sender pays; r: profiles.LinkProfile
    sensing          t = n * s_t,  E = n * s_E           n samples the start point captured;
                                                         s_t, s_E per sample (DeviceProfile)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gaisnet_flwr.costs.profiles import ClusterProfile, CostConfigError, DeviceProfile, LinkProfile
from gaisnet_flwr.split.flops import SegmentFlops
from gaisnet_flwr.split.link import header_bytes


# -- formulas -----------------------------------------------------------------------------------
def compute_time_s(flops: float, device: DeviceProfile) -> float:
    """t = FLOPs / (f * phi)."""
    return flops / device.flops_per_second


def compute_energy_j(flops: float, device: DeviceProfile) -> float:
    """E = kappa * cycles * f^2 with cycles = FLOPs / phi."""
    return device.kappa * (flops / device.flops_per_cycle) * device.clock_hz**2


def tx_time_s(num_bytes: float, link: LinkProfile) -> float:
    """t = bits / r."""
    return 8.0 * num_bytes / link.rate_bps()


def tx_energy_j(num_bytes: float, link: LinkProfile) -> float:
    """E = p * t, paid by the sender."""
    return link.power_w * tx_time_s(num_bytes, link)


def tensor_wire_bytes(shape: Sequence[int], element_size: int = 4, permuted: bool = False) -> int:
    """Bytes `link.serialize_tensor` puts on the wire for a tensor of `shape` whose elements
    take `element_size` bytes (4: float32; 2: bf16 / fp16 smashed data): the link's header
    (`link.header_bytes`, with the dim order of a `permuted` layout, e.g. a prefix-free ViT's
    tokens) and the data."""
    return header_bytes(len(shape), permuted) + math.prod(shape) * element_size


def node_compute_s(cluster: ClusterProfile, node: int, flops: float) -> float:
    """Node `node`'s time for `flops`: t = FLOPs / (f * phi) on its device, times
    `edge_share` on the edge server (the other clusters' segments run there too)."""
    seconds = compute_time_s(flops, cluster.devices[node])
    return seconds * cluster.edge_share if node == cluster.edge else seconds


# -- a cluster's costs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeCost:
    """One node's share of a round (or request): what it computed and what it sent."""

    name: str
    device: str
    flops: float
    compute_s: float
    compute_j: float
    tx_bytes: int
    tx_s: float
    tx_j: float
    sensing_s: float = 0.0  # capturing the samples it fed the chain (the start point only)
    sensing_j: float = 0.0

    @property
    def busy_s(self) -> float:
        """Its sensing, computing and sending, one after another."""
        return self.sensing_s + self.compute_s + self.tx_s

    @property
    def energy_j(self) -> float:
        return self.sensing_j + self.compute_j + self.tx_j


@dataclass(frozen=True)
class RoundCost:
    """The key metrics of one fine-tuning round (or inference request) of one cluster.

    Communication is kept apart by link (client-server vs D2D) and direction. `latency_s` is the
    serial critical path (see `fine_tuning_round_cost`); `bottleneck_s` is the busiest node's
    sensing + compute + transmit time, a lower bound for the round under any pipelined schedule.

    With the edge server as a node of the chain (`ClusterProfile.edge`), its compute and energy
    are reported apart from the devices' (`edge_*`; `compute_*`, `tx_j` and `energy_j` are the
    devices'), and the hops into and out of it are client-edge traffic (`cs_hop_*`, counted in
    `cs_bytes`, not in `d2d_*`). Latency and the bottleneck cover every node.
    """

    nodes: tuple[NodeCost, ...]
    latency_s: float
    download_s: float
    upload_s: float
    cs_download_bytes: int
    cs_upload_bytes: int
    d2d_forward_bytes: int
    d2d_backward_bytes: int
    edge: int | None = None  # the node the edge server runs (None: devices only)
    cs_hop_bytes: int = 0  # smashed data and gradients to and from the edge server
    cs_hop_s: float = 0.0

    @property
    def devices(self) -> tuple[NodeCost, ...]:
        """The cluster's own devices (every node but the edge server)."""
        return tuple(n for k, n in enumerate(self.nodes) if k != self.edge)

    @property
    def edge_node(self) -> NodeCost | None:
        return None if self.edge is None else self.nodes[self.edge]

    @property
    def compute_flops(self) -> float:
        return sum(n.flops for n in self.devices)

    @property
    def compute_s(self) -> float:
        return sum(n.compute_s for n in self.devices)

    @property
    def d2d_s(self) -> float:
        """Transmit time on D2D links (everything the nodes sent except the upload and the
        hops to and from the edge server)."""
        return sum(n.tx_s for n in self.nodes) - self.upload_s - self.cs_hop_s

    @property
    def compute_j(self) -> float:
        return sum(n.compute_j for n in self.devices)

    @property
    def tx_j(self) -> float:
        return sum(n.tx_j for n in self.devices)

    @property
    def sensing_s(self) -> float:
        return sum(n.sensing_s for n in self.nodes)

    @property
    def sensing_j(self) -> float:
        return sum(n.sensing_j for n in self.nodes)

    @property
    def energy_j(self) -> float:
        """The cluster's energy: its devices' sensing, computing and transmitting (the edge's
        not counted: `edge_energy_j`)."""
        return self.sensing_j + self.compute_j + self.tx_j

    @property
    def edge_flops(self) -> float:
        return self.edge_node.flops if self.edge_node else 0.0

    @property
    def edge_compute_s(self) -> float:
        """The edge server's time on this cluster's segment (its share of the edge's FLOP/s)."""
        return self.edge_node.compute_s if self.edge_node else 0.0

    @property
    def edge_energy_j(self) -> float:
        """What the edge server spends on this cluster: its segment's compute and its sends."""
        return self.edge_node.energy_j if self.edge_node else 0.0

    @property
    def cs_bytes(self) -> int:
        """Client-server traffic: the modules down and up, and the hops to and from the edge."""
        return self.cs_download_bytes + self.cs_upload_bytes + self.cs_hop_bytes

    @property
    def d2d_bytes(self) -> int:
        return self.d2d_forward_bytes + self.d2d_backward_bytes

    @property
    def bottleneck_s(self) -> float:
        return max(n.busy_s for n in self.nodes)


def fine_tuning_round_cost(
    cluster: ClusterProfile,
    flops: Sequence[SegmentFlops],
    hop_bytes_forward: Sequence[int],
    hop_bytes_backward: Sequence[int],
    samples: int,
    upload_bytes: int,
    download_bytes: int,
    sensed_samples: int = 0,
) -> RoundCost:
    """One cluster's fine-tuning round (paper Sec. III-C.2).

    Args:
        cluster: devices and links of the chain.
        flops: per-sample FLOPs of [start, peer 1 .. peer K, end] (`flops.segment_flops`).
        hop_bytes_forward / hop_bytes_backward: bytes each hop carried over the whole round
            (`ChainStats`); hop k joins node k and k + 1. Forward hops are sent by node k
            (smashed data), backward hops by node k + 1 (gradients).
        samples: training samples the chain processed in the round (all local epochs).
        upload_bytes: the tunable modules sent to the edge at the end of the round, sent by the
            start point on the cluster's uplink.
        download_bytes: the edge model's tunable modules delivered to the cluster at the start
            of the round; sent by the edge, so it costs the cluster time but no energy.
        sensed_samples: samples the start point captured for the round ("sensing data
            generation"): the distinct training samples, not once per local epoch.

    Latency is the critical path of strictly sequential split learning: sensing, every
    segment's forward and backward work and every hop's transmission happen one after another
    (no pipelining across batches), between the download and the upload:

        latency = download + sensing + sum(compute) + sum(hop transmissions) + upload
    """
    n = _check_lengths(cluster, flops, forward=hop_bytes_forward, backward=hop_bytes_backward)
    _check_counts(
        samples=samples,
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        sensed_samples=sensed_samples,
    )
    sent: list[list[tuple[int, LinkProfile]]] = [[] for _ in range(n)]
    for k, link in enumerate(cluster.hops):
        sent[k].append((hop_bytes_forward[k], link))
        sent[k + 1].append((hop_bytes_backward[k], link))
    sent[0].append((upload_bytes, cluster.uplink))
    d2d = [k for k in range(n - 1) if k not in cluster.edge_hops]
    return _chain_cost(
        cluster,
        work=[(f.forward + f.backward) * samples for f in flops],
        sent=sent,
        download_bytes=download_bytes,
        upload_bytes=upload_bytes,
        d2d_forward_bytes=sum(hop_bytes_forward[k] for k in d2d),
        d2d_backward_bytes=sum(hop_bytes_backward[k] for k in d2d),
        cs_hops={k: hop_bytes_forward[k] + hop_bytes_backward[k] for k in cluster.edge_hops},
        sensed=sensed_samples,
    )


def inference_cost(
    cluster: ClusterProfile,
    flops: Sequence[SegmentFlops],
    hop_bytes: Sequence[int],
    result_bytes: int,
    samples: int = 1,
    download_bytes: int = 0,
) -> RoundCost:
    """One inference request (paper Sec. III-D.2): forward only, then the end point sends the
    result back to the start point on `cluster.result`.

    `hop_bytes` are the smashed data per hop for the whole request, `samples` the inputs in it,
    each sensed by the start point (the requester: "unlabeled sensing data as the inference
    task"). `download_bytes` (0 by default) adds delivering the fine-tuned modules when the
    request also sets the cluster up. Latency = download + sensing + sum(forward compute) + hops
    + result hop. The result hop counts as D2D forward traffic.
    """
    n = _check_lengths(cluster, flops, forward=hop_bytes)
    _check_counts(samples=samples, result_bytes=result_bytes, download_bytes=download_bytes)
    sent: list[list[tuple[int, LinkProfile]]] = [[] for _ in range(n)]
    for k, link in enumerate(cluster.hops):
        sent[k].append((hop_bytes[k], link))
    sent[n - 1].append((result_bytes, cluster.result))
    d2d = [k for k in range(n - 1) if k not in cluster.edge_hops]
    return _chain_cost(
        cluster,
        work=[f.forward * samples for f in flops],
        sent=sent,
        download_bytes=download_bytes,
        upload_bytes=0,
        d2d_forward_bytes=sum(hop_bytes[k] for k in d2d) + result_bytes,
        d2d_backward_bytes=0,
        cs_hops={k: hop_bytes[k] for k in cluster.edge_hops},
        sensed=samples,
    )


def fedavg_time_s(tunable_params: int, models: int, device: DeviceProfile) -> float:
    """FedAvg of `models` sets of `tunable_params` parameters: 2 FLOPs per parameter and model."""
    return compute_time_s(2 * tunable_params * models, device)


def hierarchy_round_latency(
    slowest_cluster_s: float,
    tunable_params: int,
    clusters: int,
    edges: int,
    cloud_round: bool,
    edge: DeviceProfile,
    backhaul: LinkProfile,
) -> float:
    """A round's convergence latency through the hierarchy (paper Sec. III-B, III-C.2).

    Clusters fine-tune in parallel (paper Fig. 4), so an edge round takes the slowest cluster
    (its chain, upload and download) and then the edge's FedAvg over its `clusters`. On cloud
    rounds with more than one edge, every edge's modules go up and back down the backhaul (fp32)
    in series, with the cloud's own FedAvg over the `edges` in between. An edge-only round is
    `cloud_round=False` (the backhaul is then not used).
    """
    if clusters < 1 or edges < 1:
        raise CostConfigError(f"a round needs clusters and edges >= 1, got {clusters}, {edges}")
    _check_counts(slowest_cluster_s=slowest_cluster_s, tunable_params=tunable_params)
    latency = slowest_cluster_s + fedavg_time_s(tunable_params, clusters, edge)
    if cloud_round and edges > 1:
        latency += 2 * edges * tx_time_s(4 * tunable_params, backhaul)
        latency += fedavg_time_s(tunable_params, edges, edge)
    return latency


def _chain_cost(
    cluster: ClusterProfile,
    work: Sequence[float],
    sent: Sequence[Sequence[tuple[int, LinkProfile]]],
    download_bytes: int,
    upload_bytes: int,
    d2d_forward_bytes: int,
    d2d_backward_bytes: int,
    cs_hops: dict[int, int],
    sensed: int,
) -> RoundCost:
    """Per node: compute `work[k]` FLOPs, send `sent[k]` (bytes, link); all of it in series.
    The start point (node 0) first senses `sensed` samples. `cs_hops`: the bytes of each hop to
    or from the edge server (both directions), client-edge traffic."""
    nodes = []
    for k, (name, device, flops, messages) in enumerate(
        zip(cluster.names, cluster.devices, work, sent, strict=True)
    ):
        captured = sensed if k == 0 else 0
        nodes.append(
            NodeCost(
                name=name,
                device=device.name,
                flops=flops,
                compute_s=node_compute_s(cluster, k, flops),
                compute_j=compute_energy_j(flops, device),
                tx_bytes=sum(b for b, _ in messages),
                tx_s=sum(tx_time_s(b, link) for b, link in messages),
                tx_j=sum(tx_energy_j(b, link) for b, link in messages),
                sensing_s=captured * device.sensing_s_per_sample,
                sensing_j=captured * device.sensing_j_per_sample,
            )
        )
    download_s = tx_time_s(download_bytes, cluster.uplink)
    return RoundCost(
        nodes=tuple(nodes),
        latency_s=download_s + sum(node.busy_s for node in nodes),
        download_s=download_s,
        upload_s=tx_time_s(upload_bytes, cluster.uplink),
        cs_download_bytes=download_bytes,
        cs_upload_bytes=upload_bytes,
        d2d_forward_bytes=d2d_forward_bytes,
        d2d_backward_bytes=d2d_backward_bytes,
        edge=cluster.edge,
        cs_hop_bytes=sum(cs_hops.values()),
        cs_hop_s=sum(tx_time_s(b, cluster.hops[k]) for k, b in cs_hops.items()),
    )


def _check_lengths(
    cluster: ClusterProfile, flops: Sequence[SegmentFlops], **hop_bytes: Sequence[int]
) -> int:
    n = len(cluster.devices)
    if len(flops) != n:
        raise CostConfigError(f"{n} nodes need {n} SegmentFlops, got {len(flops)}")
    for label, counts in hop_bytes.items():
        if len(counts) != n - 1:
            raise CostConfigError(
                f"{n - 1} hops need {n - 1} {label} byte counts, got {len(counts)}"
            )
        _check_counts(**{f"{label} hop_bytes[{k}]": b for k, b in enumerate(counts)})
    return n


def _check_counts(**counts: float) -> None:
    for name, value in counts.items():
        if value < 0:
            raise CostConfigError(f"{name} must be >= 0, got {value}")
