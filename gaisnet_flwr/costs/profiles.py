"""Device and link profiles of the cost model (paper Sec. III-C.2, III-D.2): presets, a TOML
file on top, and the Shannon rate of a radio link.

Conventions (the cost models of split-learning edge papers):

    link rate        r = B * log2(1 + p * g / (N0 * B))  Shannon; N0 = -174 dBm/Hz,
                     g = 10^(-PL / 10), PL = 128.1 + 37.6 * log10(d / km) dB

Every number in the presets is an assumption within the ranges those papers use; each can be
overridden from a TOML file (`load_profiles`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gaisnet_flwr.split.plan import node_names

LINK_KINDS = ("d2d", "client-edge", "edge-cloud")
NOISE_DBM_PER_HZ = -174.0  # thermal noise density at room temperature (those papers' convention)


class CostConfigError(ValueError):
    """An invalid device, link or cluster profile; the message names the profile and field."""


# -- profiles -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """A node's compute speed, energy constant, transmit-power cap, memory, and what sensing one
    data sample costs it (paper Sec. III-C.2: "sensing data generation", "data acquisition"):
    the time and energy to capture one input, paid by the start point for each sample it feeds
    the chain (0 for a device that never senses, e.g. the edge server)."""

    name: str
    clock_hz: float
    flops_per_cycle: float
    kappa: float = 1e-28  # effective switched capacitance (those papers' convention)
    tx_power_w: float = (
        0.2  # the most it transmits with; a phone's 0.2 W (those papers' convention)
    )
    memory_bytes: int = 4 * 2**30
    sensing_s_per_sample: float = 0.0
    sensing_j_per_sample: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("device", self, "clock_hz", "flops_per_cycle", "memory_bytes")
        _check_non_negative(
            "device", self, "kappa", "tx_power_w", "sensing_s_per_sample", "sensing_j_per_sample"
        )

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
# D2D bandwidth 1-20 MHz; edge <-> cloud wired (those papers' ranges). Memory sizes and distances
# are our assumptions (typical phones; a client inside a small cell's 200 m radius). Sensing is our
# assumption too: one camera frame per sample at 30 frames/s (1/30 s) with the camera module
# drawing about 1 W while it captures (so ~0.033 J per sample); the same for every phone.
GiB = 2**30
FRAME_S = 1 / 30
CAMERA_W = 1.0
PHONE_SENSING = dict(sensing_s_per_sample=FRAME_S, sensing_j_per_sample=CAMERA_W * FRAME_S)
DEVICE_PRESETS: Mapping[str, DeviceProfile] = MappingProxyType(
    {
        p.name: p
        for p in (
            DeviceProfile("phone-low", 0.5e9, 8, memory_bytes=2 * GiB, **PHONE_SENSING),
            DeviceProfile("phone-mid", 1.0e9, 12, memory_bytes=4 * GiB, **PHONE_SENSING),
            DeviceProfile("phone-high", 2.0e9, 16, memory_bytes=8 * GiB, **PHONE_SENSING),
            # 16 cores x 16 FLOPs/cycle at 3 GHz; transmits at a small cell's 1 W (assumption).
            DeviceProfile("edge-server", 3.0e9, 16 * 16, tx_power_w=1.0, memory_bytes=64 * GiB),
        )
    }
)
LINK_PRESETS: Mapping[str, LinkProfile] = MappingProxyType(
    {
        p.name: p
        for p in (
            # The Shannon rate here: ~19 Mbps at 50 m and ~6.7 Mbps at 500 m.
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


# -- a cluster's devices and links -----------------------------------------------------------------
@dataclass(frozen=True)
class ClusterProfile:
    """Devices in chain order (start, peers..., end), one D2D link per hop (hop k: node k -> k + 1)
    and the cluster's client-edge link (the start point's uplink, which the model download and
    the upload also use; we assume the rate is the same both ways).

    `result_link` carries an inference result from the end point back to the start point; it
    defaults to the last hop's link profile. Every link must be of its role's kind and within
    its sender's transmit power.

    The edge server as a cooperative node (paper Sec. III-C, III-D: "when the end clients'
    computing resources are limited, the edge server can also act as a cooperative node"):
    `edge` is the chain node it runs (a middle node; its device is the edge's profile), and the
    two hops into and out of it are client-edge links, not D2D. Its compute is shared: it runs
    the segments of `edge_share` clusters in the same round, each at 1/`edge_share` of its
    FLOP/s (processor sharing), so a segment there takes `edge_share` times as long; its energy
    per FLOP is its own (`pricing.node_compute_s`).
    """

    devices: Sequence[DeviceProfile]
    hops: Sequence[LinkProfile]
    uplink: LinkProfile
    result_link: LinkProfile | None = None
    edge: int | None = None
    edge_share: int = 1

    def __post_init__(self) -> None:
        if len(self.devices) < 3:
            raise CostConfigError(
                f"a cluster needs a start point, at least one peer and an end point; "
                f"got {len(self.devices)} device profile(s)"
            )
        if self.edge is not None and not 1 <= self.edge <= len(self.devices) - 2:
            raise CostConfigError(
                f"the edge server must run a middle node of the chain (1 .. "
                f"{len(self.devices) - 2}), got node {self.edge}"
            )
        if self.edge_share < 1 or (self.edge is None and self.edge_share != 1):
            raise CostConfigError(
                f"edge_share={self.edge_share}: the clusters sharing the edge server's compute "
                f"must be >= 1, and 1 when the chain has no edge node"
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
            kind = "client-edge" if k in self.edge_hops else "d2d"
            self._check_link(f"hop {names[k]}->{names[k + 1]}", link, kind, self.devices[k])
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
        """start, peer1 .. peerK (the devices, in chain order), end; the edge server's node,
        if any, is "edge"."""
        if self.edge is None:
            return node_names(len(self.devices) - 2)
        peers = [f"peer{k + 1}" for k in range(len(self.devices) - 3)]
        peers.insert(self.edge - 1, "edge")
        return ["start", *peers, "end"]

    @property
    def edge_hops(self) -> tuple[int, ...]:
        """The hops into and out of the edge server's node (client-edge traffic)."""
        return () if self.edge is None else (self.edge - 1, self.edge)

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
