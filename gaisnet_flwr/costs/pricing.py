"""The paper's key metrics as a cost model (paper Sec. III-C.2 and III-D.2).

For one client cluster (start point -> peers -> end point, chain.py) and one fine-tuning round or
one inference request, this module turns FLOPs (flops.py) and bytes per hop (ChainStats) into
latency, computing cost, energy and communication per node, and estimates each node's memory
footprint from the model's shape. It is pure: no Flower, no clocks; the apps pass in what they
counted.

Conventions (shared/notes/anchors.md, "Cost model conventions used in split-learning edge papers"):

    compute time     t = FLOPs / (f * phi)               f clock (Hz), phi FLOPs per cycle
    compute energy   E = kappa * cycles * f^2            cycles = FLOPs / phi, kappa ~ 1e-28
    link rate        r = B * log2(1 + p * g / (N0 * B))  Shannon; N0 = -174 dBm/Hz,
                     g = 10^(-PL / 10), PL = 128.1 + 37.6 * log10(d / km) dB
    transmission     t = 8 * bytes / r,  E = p * t       the sender pays

Every number in the presets is an assumption taken from the ranges in anchors.md; each can be
overridden from a TOML file (`load_profiles`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from gaisnet_flwr.split.chain import segment_parameters
from gaisnet_flwr.split.flops import SegmentFlops, ViTShape
from gaisnet_flwr.split.plan import node_names

if TYPE_CHECKING:
    from gaisnet_flwr.split.plan import SplitPlan
    from gaisnet_flwr.vit.model import PromptedViT

LINK_KINDS = ("d2d", "client-edge", "edge-cloud")
NOISE_DBM_PER_HZ = -174.0  # thermal noise density at room temperature (anchors.md)


class CostConfigError(ValueError):
    """An invalid device, link or cluster profile; the message names the profile and field."""


# -- profiles -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """A node's compute speed, energy constant, transmit-power cap and memory."""

    name: str
    clock_hz: float
    flops_per_cycle: float
    kappa: float = 1e-28  # effective switched capacitance (anchors.md)
    tx_power_w: float = 0.2  # the most it transmits with; a phone's 0.2 W (anchors.md)
    memory_bytes: int = 4 * 2**30

    def __post_init__(self) -> None:
        _check_positive("device", self, "clock_hz", "flops_per_cycle", "memory_bytes")
        _check_non_negative("device", self, "kappa", "tx_power_w")

    @property
    def flops_per_second(self) -> float:
        return self.clock_hz * self.flops_per_cycle


@dataclass(frozen=True)
class LinkProfile:
    """A radio link (`bandwidth_hz`, `distance_m`, `tx_power_w`) or a wired one (`wired_rate_bps`).

    The sender of a radio link transmits at `tx_power_w`, which sets the Shannon rate and is what
    it pays per second. A wired link (edge <-> cloud backhaul) has a fixed rate and costs
    `tx_power_w` per second if given, else nothing.
    """

    name: str
    kind: str
    bandwidth_hz: float | None = None
    distance_m: float | None = None
    tx_power_w: float | None = None
    noise_dbm_per_hz: float = NOISE_DBM_PER_HZ
    wired_rate_bps: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in LINK_KINDS:
            raise CostConfigError(
                f"link {self.name!r}: unknown kind {self.kind!r}; valid kinds: "
                f"{', '.join(LINK_KINDS)}"
            )
        if self.wired_rate_bps is not None:
            radio_only = [f for f in ("bandwidth_hz", "distance_m") if getattr(self, f) is not None]
            if radio_only:
                raise CostConfigError(
                    f"link {self.name!r}: a wired link (wired_rate_bps) takes no "
                    f"{' or '.join(radio_only)}"
                )
            _check_positive("link", self, "wired_rate_bps")
            _check_non_negative("link", self, "tx_power_w")
            return
        missing = [
            f for f in ("bandwidth_hz", "distance_m", "tx_power_w") if getattr(self, f) is None
        ]
        if missing:
            raise CostConfigError(
                f"link {self.name!r}: a radio link needs {', '.join(missing)} "
                f"(or wired_rate_bps for a wired link)"
            )
        _check_positive("link", self, "bandwidth_hz", "distance_m", "tx_power_w")

    @property
    def power_w(self) -> float:
        """What the sender spends per second on this link."""
        return self.tx_power_w or 0.0

    def rate_bps(self) -> float:
        """Data rate in bit/s: fixed for a wired link, Shannon capacity for a radio link."""
        if self.wired_rate_bps is not None:
            return self.wired_rate_bps
        assert self.bandwidth_hz is not None and self.distance_m is not None
        return shannon_rate_bps(
            self.bandwidth_hz, self.distance_m, self.power_w, self.noise_dbm_per_hz
        )


def _check_positive(kind: str, profile: Any, *names: str) -> None:
    for name in names:
        value = getattr(profile, name)
        if value is None or not math.isfinite(value) or value <= 0:
            raise CostConfigError(f"{kind} {profile.name!r}: {name} must be > 0, got {value}")


def _check_non_negative(kind: str, profile: Any, *names: str) -> None:
    for name in names:
        value = getattr(profile, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise CostConfigError(f"{kind} {profile.name!r}: {name} must be >= 0, got {value}")


# Presets. Clients: f in [0.5, 2] GHz, phi 8-16 FLOPs/cycle, 0.2 W; edge: 2.5-3.5 GHz multi-core;
# D2D bandwidth 1-20 MHz; edge <-> cloud wired (anchors.md). Memory sizes and distances are our
# assumptions (typical phones; a client inside a small cell's 200 m radius).
GiB = 2**30
DEVICE_PRESETS: Mapping[str, DeviceProfile] = MappingProxyType(
    {
        p.name: p
        for p in (
            DeviceProfile("phone-low", 0.5e9, 8, memory_bytes=2 * GiB),
            DeviceProfile("phone-mid", 1.0e9, 12, memory_bytes=4 * GiB),
            DeviceProfile("phone-high", 2.0e9, 16, memory_bytes=8 * GiB),
            # 16 cores x 16 FLOPs/cycle at 3 GHz; transmits at a small cell's 1 W (assumption).
            DeviceProfile("edge-server", 3.0e9, 16 * 16, tx_power_w=1.0, memory_bytes=64 * GiB),
        )
    }
)
LINK_PRESETS: Mapping[str, LinkProfile] = MappingProxyType(
    {
        p.name: p
        for p in (
            # anchors.md's worked examples: ~19 Mbps at 50 m and ~6.7 Mbps at 500 m.
            LinkProfile("d2d-50m", "d2d", bandwidth_hz=1e6, distance_m=50, tx_power_w=0.2),
            LinkProfile("d2d-500m", "d2d", bandwidth_hz=1e6, distance_m=500, tx_power_w=0.2),
            LinkProfile("d2d-50m-20mhz", "d2d", bandwidth_hz=20e6, distance_m=50, tx_power_w=0.2),
            LinkProfile(
                "uplink-1mhz", "client-edge", bandwidth_hz=1e6, distance_m=200, tx_power_w=0.2
            ),
            LinkProfile("backhaul-1gbps", "edge-cloud", wired_rate_bps=1e9),
        )
    }
)


@dataclass(frozen=True)
class Profiles:
    """Named device and link profiles; lookups by an unknown name list the valid ones."""

    devices: Mapping[str, DeviceProfile]
    links: Mapping[str, LinkProfile]

    def device(self, name: str) -> DeviceProfile:
        if name not in self.devices:
            raise CostConfigError(
                f"unknown device profile {name!r}; valid: {', '.join(sorted(self.devices))}"
            )
        return self.devices[name]

    def link(self, name: str) -> LinkProfile:
        if name not in self.links:
            raise CostConfigError(
                f"unknown link profile {name!r}; valid: {', '.join(sorted(self.links))}"
            )
        return self.links[name]


def load_profiles(path: str | Path | None = None) -> Profiles:
    """The presets, with `[devices.NAME]` / `[links.NAME]` tables of a TOML file on top.

    A table named like a preset overrides only the fields it gives; a new name needs every
    required field. Keys are the dataclass fields (`clock_hz`, `bandwidth_hz`, ...).
    """
    devices, links = dict(DEVICE_PRESETS), dict(LINK_PRESETS)
    if path is not None:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        unknown = sorted(set(doc) - {"devices", "links"})
        if unknown:
            raise CostConfigError(f"{path}: unknown table(s) {unknown}; valid: devices, links")
        for name, table in doc.get("devices", {}).items():
            devices[name] = _from_table(DeviceProfile, "devices", name, table, devices.get(name))
        for name, table in doc.get("links", {}).items():
            links[name] = _from_table(LinkProfile, "links", name, table, links.get(name))
    return Profiles(MappingProxyType(devices), MappingProxyType(links))


def _from_table(cls: Any, section: str, name: str, table: Any, base: Any) -> Any:
    where = f"[{section}.{name}]"
    if not isinstance(table, dict):
        raise CostConfigError(f"{where} must be a table")
    keys = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise CostConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(keys)}")
    for key, value in table.items():
        wants_str = key == "kind"
        if wants_str != isinstance(value, str) or isinstance(value, bool):
            kind = "a string" if wants_str else "a number"
            raise CostConfigError(f"{where}: {key} must be {kind}, got {value!r}")
    if "memory_bytes" in table:
        table = {**table, "memory_bytes": int(table["memory_bytes"])}
    try:
        if base is not None:
            return dataclasses.replace(base, name=name, **table)
        return cls(name=name, **table)
    except TypeError as err:  # a required field is missing
        raise CostConfigError(f"{where}: {err}") from err


# -- formulas -----------------------------------------------------------------------------------
def shannon_rate_bps(
    bandwidth_hz: float,
    distance_m: float,
    tx_power_w: float,
    noise_dbm_per_hz: float = NOISE_DBM_PER_HZ,
) -> float:
    """r = B log2(1 + p g / (N0 B)) with path loss 128.1 + 37.6 log10(d / km) dB (3GPP macro)."""
    path_loss_db = 128.1 + 37.6 * math.log10(distance_m / 1000.0)
    gain = 10.0 ** (-path_loss_db / 10.0)
    noise_w_per_hz = 10.0 ** ((noise_dbm_per_hz - 30.0) / 10.0)  # dBm -> W
    return bandwidth_hz * math.log2(1.0 + tx_power_w * gain / (noise_w_per_hz * bandwidth_hz))


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


def tensor_wire_bytes(shape: Sequence[int], element_size: int = 4) -> int:
    """Bytes `link.serialize_tensor` puts on the wire: a 2 + 8 * ndim header and the data."""
    return 2 + 8 * len(shape) + math.prod(shape) * element_size


# -- a cluster and its costs ----------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterProfile:
    """Devices in chain order (start, peers..., end), one D2D link per hop (hop k: node k -> k + 1)
    and the cluster's client-edge link (the start point's uplink, which the model download and
    the upload also use; we assume the rate is the same both ways).

    `result_link` carries an inference result from the end point back to the start point; it
    defaults to the last hop's link profile. Every link must be of its role's kind and within
    its sender's transmit power.
    """

    devices: Sequence[DeviceProfile]
    hops: Sequence[LinkProfile]
    uplink: LinkProfile
    result_link: LinkProfile | None = None

    def __post_init__(self) -> None:
        if len(self.devices) < 3:
            raise CostConfigError(
                f"a cluster needs a start point, at least one peer and an end point; "
                f"got {len(self.devices)} device profile(s)"
            )
        names = self.names
        for name, device in zip(names, self.devices, strict=True):
            if device is None:
                raise CostConfigError(f"cluster node {name!r} has no device profile")
        if len(self.hops) != len(names) - 1:
            raise CostConfigError(
                f"{len(names)} nodes need {len(names) - 1} hop link(s), got {len(self.hops)}"
            )
        for k, link in enumerate(self.hops):
            self._check_link(f"hop {names[k]}->{names[k + 1]}", link, "d2d", self.devices[k])
        self._check_link("uplink", self.uplink, "client-edge", self.devices[0])
        self._check_link("result link end->start", self.result, "d2d", self.devices[-1])

    @staticmethod
    def _check_link(where: str, link: LinkProfile | None, kind: str, sender: DeviceProfile) -> None:
        if link is None:
            raise CostConfigError(f"cluster {where} has no link profile")
        if link.kind != kind:
            raise CostConfigError(f"cluster {where}: link {link.name!r} is {link.kind}, not {kind}")
        if link.power_w > sender.tx_power_w:
            raise CostConfigError(
                f"cluster {where}: link {link.name!r} transmits at {link.power_w} W, more than "
                f"its sender {sender.name!r} can ({sender.tx_power_w} W)"
            )

    @property
    def names(self) -> list[str]:
        return node_names(len(self.devices) - 2)

    @property
    def result(self) -> LinkProfile:
        return self.result_link or self.hops[-1]

    @classmethod
    def from_names(
        cls,
        profiles: Profiles,
        devices: Sequence[str],
        hops: str | Sequence[str],
        uplink: str,
        result_link: str | None = None,
    ) -> ClusterProfile:
        """Resolve profile names; `hops` may be one name for every hop."""
        hop_names = [hops] * (len(devices) - 1) if isinstance(hops, str) else list(hops)
        return cls(
            devices=tuple(profiles.device(d) for d in devices),
            hops=tuple(profiles.link(h) for h in hop_names),
            uplink=profiles.link(uplink),
            result_link=profiles.link(result_link) if result_link else None,
        )


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

    @property
    def energy_j(self) -> float:
        return self.compute_j + self.tx_j


@dataclass(frozen=True)
class RoundCost:
    """The key metrics of one fine-tuning round (or inference request) of one cluster.

    Communication is kept apart by link (client-server vs D2D) and direction. `latency_s` is the
    serial critical path (see `fine_tuning_round_cost`); `bottleneck_s` is the busiest node's
    compute + transmit time, a lower bound for the round under any pipelined schedule.
    """

    nodes: tuple[NodeCost, ...]
    latency_s: float
    download_s: float
    upload_s: float
    cs_download_bytes: int
    cs_upload_bytes: int
    d2d_forward_bytes: int
    d2d_backward_bytes: int

    @property
    def compute_flops(self) -> float:
        return sum(n.flops for n in self.nodes)

    @property
    def compute_s(self) -> float:
        return sum(n.compute_s for n in self.nodes)

    @property
    def d2d_s(self) -> float:
        """Transmit time on D2D links (everything the nodes sent except the upload)."""
        return sum(n.tx_s for n in self.nodes) - self.upload_s

    @property
    def compute_j(self) -> float:
        return sum(n.compute_j for n in self.nodes)

    @property
    def tx_j(self) -> float:
        return sum(n.tx_j for n in self.nodes)

    @property
    def energy_j(self) -> float:
        """The cluster's energy: its nodes' computing and transmitting (the edge's not counted)."""
        return self.compute_j + self.tx_j

    @property
    def cs_bytes(self) -> int:
        return self.cs_download_bytes + self.cs_upload_bytes

    @property
    def d2d_bytes(self) -> int:
        return self.d2d_forward_bytes + self.d2d_backward_bytes

    @property
    def bottleneck_s(self) -> float:
        return max(n.compute_s + n.tx_s for n in self.nodes)


def fine_tuning_round_cost(
    cluster: ClusterProfile,
    flops: Sequence[SegmentFlops],
    hop_bytes_forward: Sequence[int],
    hop_bytes_backward: Sequence[int],
    samples: int,
    upload_bytes: int,
    download_bytes: int,
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

    Latency is the critical path of strictly sequential split learning: every segment's forward
    and backward work and every hop's transmission happen one after another (no pipelining
    across batches), between the download and the upload:

        latency = download + sum(compute) + sum(hop transmissions) + upload
    """
    n = _check_lengths(cluster, flops, forward=hop_bytes_forward, backward=hop_bytes_backward)
    _check_counts(samples=samples, upload_bytes=upload_bytes, download_bytes=download_bytes)
    sent: list[list[tuple[int, LinkProfile]]] = [[] for _ in range(n)]
    for k, link in enumerate(cluster.hops):
        sent[k].append((hop_bytes_forward[k], link))
        sent[k + 1].append((hop_bytes_backward[k], link))
    sent[0].append((upload_bytes, cluster.uplink))
    return _chain_cost(
        cluster,
        work=[(f.forward + f.backward) * samples for f in flops],
        sent=sent,
        download_bytes=download_bytes,
        upload_bytes=upload_bytes,
        d2d_forward_bytes=sum(hop_bytes_forward),
        d2d_backward_bytes=sum(hop_bytes_backward),
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

    `hop_bytes` are the smashed data per hop for the whole request, `samples` the inputs in it.
    `download_bytes` (0 by default) adds delivering the fine-tuned modules when the request
    also sets the cluster up. Latency = download + sum(forward compute) + hops + result hop.
    The result hop counts as D2D forward traffic.
    """
    n = _check_lengths(cluster, flops, forward=hop_bytes)
    _check_counts(samples=samples, result_bytes=result_bytes, download_bytes=download_bytes)
    sent: list[list[tuple[int, LinkProfile]]] = [[] for _ in range(n)]
    for k, link in enumerate(cluster.hops):
        sent[k].append((hop_bytes[k], link))
    sent[n - 1].append((result_bytes, cluster.result))
    return _chain_cost(
        cluster,
        work=[f.forward * samples for f in flops],
        sent=sent,
        download_bytes=download_bytes,
        upload_bytes=0,
        d2d_forward_bytes=sum(hop_bytes) + result_bytes,
        d2d_backward_bytes=0,
    )


def edge_round_latency(cluster_costs: Sequence[RoundCost], aggregation_s: float) -> float:
    """Clusters fine-tune in parallel (paper Fig. 4), so a round at the edge takes the slowest
    cluster's latency plus the edge's FedAvg."""
    if not cluster_costs:
        raise CostConfigError("an edge round needs at least one cluster")
    if aggregation_s < 0:
        raise CostConfigError(f"aggregation_s must be >= 0, got {aggregation_s}")
    return max(c.latency_s for c in cluster_costs) + aggregation_s


def hierarchy_round_latency(
    slowest_cluster_s: float,
    tunable_params: int,
    clusters: int,
    edges: int,
    cloud_round: bool,
    edge: DeviceProfile,
    backhaul: LinkProfile,
) -> float:
    """A round's convergence latency through the hierarchy (paper Sec. III-B, III-C.2):
    the slowest cluster (its chain, upload and download), then the edge's FedAvg (2 FLOPs per
    parameter and cluster), then on cloud rounds every edge's modules up and back down the
    backhaul (fp32) in series with the cloud's own averaging (2 FLOPs per parameter and edge)."""
    latency = slowest_cluster_s + compute_time_s(2 * tunable_params * clusters, edge)
    if cloud_round and edges > 1:
        latency += 2 * edges * tx_time_s(4 * tunable_params, backhaul)
        latency += compute_time_s(2 * tunable_params * edges, edge)
    return latency


def _chain_cost(
    cluster: ClusterProfile,
    work: Sequence[float],
    sent: Sequence[Sequence[tuple[int, LinkProfile]]],
    download_bytes: int,
    upload_bytes: int,
    d2d_forward_bytes: int,
    d2d_backward_bytes: int,
) -> RoundCost:
    """Per node: compute `work[k]` FLOPs, send `sent[k]` (bytes, link); all of it in series."""
    nodes = []
    for name, device, flops, messages in zip(
        cluster.names, cluster.devices, work, sent, strict=True
    ):
        nodes.append(
            NodeCost(
                name=name,
                device=device.name,
                flops=flops,
                compute_s=compute_time_s(flops, device),
                compute_j=compute_energy_j(flops, device),
                tx_bytes=sum(b for b, _ in messages),
                tx_s=sum(tx_time_s(b, link) for b, link in messages),
                tx_j=sum(tx_energy_j(b, link) for b, link in messages),
            )
        )
    download_s = tx_time_s(download_bytes, cluster.uplink)
    return RoundCost(
        nodes=tuple(nodes),
        latency_s=download_s + sum(node.compute_s + node.tx_s for node in nodes),
        download_s=download_s,
        upload_s=tx_time_s(upload_bytes, cluster.uplink),
        cs_download_bytes=download_bytes,
        cs_upload_bytes=upload_bytes,
        d2d_forward_bytes=d2d_forward_bytes,
        d2d_backward_bytes=d2d_backward_bytes,
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


# -- memory per node ------------------------------------------------------------------------------
OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}  # buffers per tunable parameter: momentum; exp_avg(_sq)


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes one node holds for one batch (paper Sec. III-C.2 / III-D.2 "memory footprint").

    weights: every parameter of its segment (frozen and tunable).
    gradients, optimizer_state: for its tunable parameters, while training.
    activations: tensors autograd keeps for backward (training), estimated from the shape.
    smashed: its input and output tensors between hops, where autograd does not already hold them.
    inference_activations: the largest working set inside one block of a no-grad forward.
    """

    name: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    smashed: int
    inference_activations: int

    @property
    def training(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer_state + self.activations + self.smashed
        )

    @property
    def inference(self) -> int:
        return self.weights + self.inference_activations + self.smashed


def segment_memory(
    model: PromptedViT,
    plan: SplitPlan,
    batch_size: int,
    optimizer: str = "sgd",
    *,
    momentum: float = 0.9,
) -> list[MemoryFootprint]:
    """Memory per node [start, peer 1 .. peer K, end] while training on `batch_size` samples.

    `optimizer` is one of `OPTIMIZER_STATE` ("sgd" keeps one momentum buffer unless
    `momentum` == 0; "adamw" two moments). Activations follow what autograd saves in a timm
    block (see `block_saved_elements`); tests check them against `measure_saved_activation_bytes`.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise CostConfigError(
            f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZER_STATE)}"
        )
    if batch_size < 1:
        raise CostConfigError(f"batch_size must be >= 1, got {batch_size}")
    s = ViTShape.of(model)
    bb = model.backbone
    es = next(model.parameters()).element_size()
    fused = bool(getattr(bb.blocks[0].attn, "fused_attn", False))
    num_heads = int(getattr(bb.blocks[0].attn, "num_heads", 1))
    full = model.mode == "full"
    first_grad_block = 0 if (full or s.num_prompts) else s.depth  # as in flops.segment_flops
    upstream_trains = first_grad_block < s.depth or full
    t_hop = s.num_prefix_tokens + s.num_patches + (s.num_prompts if model.prompts_travel else 0)
    t_end = s.num_prefix_tokens + s.num_patches
    d = s.embed_dim
    b = batch_size
    state_factor = 0 if (optimizer == "sgd" and momentum == 0) else OPTIMIZER_STATE[optimizer]

    # Start point: images in, tokens out. Only full fine-tuning saves anything: the conv's input
    # (and norm_pre's, where the model has one).
    image = b * s.num_patches * s.patch_dim
    start = 0
    if full:
        start = image + (b * t_end * (d + 2) if _is_layer_norm(bb.norm_pre) else 0)
    saved = [start]
    smashed = [(0 if full else image) + b * t_hop * d]  # the chain holds its input and output
    infer = [b * t_hop * d]
    for lo, hi in plan.ranges:
        # Every block runs on s.block_tokens tokens (prompts included) and saves activations
        # once a gradient must reach it.
        grad_blocks = sum(1 for i in range(lo, hi) if i >= first_grad_block)
        saved.append(
            grad_blocks
            * b
            * block_saved_elements(s.block_tokens, d, s.mlp_dim, num_heads, fused, full)
        )
        # The received tokens are saved by the first block's LayerNorm unless a prompt is
        # inserted in front of them (a new tensor); the output is held for backward.
        inserts = (model.mode == "vpt-deep" and s.num_prompts > 0) or (
            model.prompts_travel and lo == 0
        )
        received_saved = lo >= first_grad_block and not inserts
        smashed.append((0 if received_saved else b * t_hop * d) + b * t_hop * d)
        infer.append(b * s.block_tokens * _block_working_set(d, s.mlp_dim))
    # End point: final LayerNorm (if a gradient flows back), pooling, head, loss.
    final_norm = upstream_trains and _is_layer_norm(bb.norm)  # Identity when fc_norm is used
    end = b * t_end * (d + 2) if final_norm else 0
    if bb.global_pool == "token":
        end += b * t_end * d  # the head saves x[:, 0], a view: the whole norm output stays
    else:
        if bb.global_pool in ("max", "avgmax"):
            end += b * t_end * d  # amax saves its input, again a view of the norm output
        if upstream_trains and _is_layer_norm(bb.fc_norm):
            end += b * (d + 2)
        end += b * d  # the head's input: the pooled (and fc-normed) feature
    end += b * s.num_classes + 1  # cross-entropy: log-softmax output, nll's scalar weight
    saved.append(end)
    # vpt-shallow drops the prompt slots first (a new tensor), so its input is not saved.
    received_saved = final_norm and not model.prompts_travel
    smashed.append((0 if received_saved else b * t_hop * d) + b * s.num_classes)
    infer.append(b * t_end * d)

    params = segment_parameters(model, plan)
    footprints = []
    for k, name in enumerate(node_names(plan.num_peers)):
        weights = sum(p.numel() * p.element_size() for p in params[k])
        tunable = sum(p.numel() * p.element_size() for p in params[k] if p.requires_grad)
        extra_target = 8 * b if k == len(params) - 1 else 0  # int64 labels kept by the loss
        footprints.append(
            MemoryFootprint(
                name=name,
                weights=weights,
                gradients=tunable,
                optimizer_state=state_factor * tunable,
                activations=saved[k] * es + extra_target,
                smashed=smashed[k] * es,
                inference_activations=infer[k] * es,
            )
        )
    return footprints


def block_saved_elements(
    tokens: int, dim: int, mlp_dim: int, num_heads: int, fused: bool, full: bool
) -> int:
    """Elements autograd saves per sample in a timm `Block` whose input needs a gradient.

    Frozen linear layers save only their (parameter) weight. What remains, measured on CPU:
      LayerNorm x2    input (D) + mean and rstd (1 + 1) per token
      attention       fused SDPA: q, k, v (one 3D qkv tensor), output (D), logsumexp per head;
                      explicit path: q * scale, k^T and v copies (3D) and the softmax (H T^2)
      GELU            its input (mlp_dim)
    Full fine-tuning adds the inputs of the weight gradients: both LayerNorm outputs (2D) and the
    GELU output (mlp_dim); the projection's input is the SDPA output already saved (explicit path:
    a reshaped copy, D more).
    """
    t, d, h = tokens, dim, mlp_dim
    per_token = 2 * (d + 2) + 3 * d + h  # LayerNorms, q/k/v, GELU input
    # fused: + output and logsumexp; explicit: + the attention probabilities
    attention = t * d + num_heads * t if fused else num_heads * t * t
    weight_grad_inputs = t * (2 * d + h + (0 if fused else d)) if full else 0
    return t * per_token + attention + weight_grad_inputs


def _block_working_set(dim: int, mlp_dim: int) -> int:
    """Per token, the most a no-grad block holds at once: residual stream, qkv and the attention
    output (5D), or residual, LayerNorm output and the MLP hidden before and after GELU
    (2D + 2 mlp_dim). An estimate; not measured."""
    return max(5 * dim, 2 * dim + 2 * mlp_dim)


def measure_saved_activation_bytes(
    fn: Callable[..., Any], *inputs: Any, exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes of the storages autograd saves for backward while running `fn(*inputs)`.

    Counted with `torch.autograd.graph.saved_tensors_hooks`, once per storage (views share
    one), leaving out the storages of `exclude` (pass the model's parameters: weights saved for
    backward are already counted as weights).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    total = sum(storages.values())
    del out  # held until here: a live graph keeps saved storages (and their addresses) unique
    return total


def _is_layer_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm)
