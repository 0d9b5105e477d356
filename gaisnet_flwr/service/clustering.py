"""How to cluster clients (paper Sec. IV-B): chains of D2D-reachable devices.

A cluster is a chain start point -> peers -> end point in which every consecutive pair can talk
over D2D (within both devices' range). A fine-tuning cluster starts at a device that holds data;
an inference cluster starts at the requesting device and must also let its end point reach the
start point, which receives the result (paper Fig. 5). Each cluster is then split with the
planner over its peers' compute speeds.

The search is a depth-first search over simple paths that tries faster devices first: exact for
the small device graphs of a cell (it finds a chain whenever one exists), with a step budget so a
large graph cannot stall a run. Devices that end up in no cluster are reported with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from gaisnet_flwr.split.plan import SplitPlan, plan_min_max


@dataclass(frozen=True)
class Device:
    name: str
    x_m: float
    y_m: float
    flops_per_second: float
    d2d_range_m: float = 100.0
    has_data: bool = False


def reachable(a: Device, b: Device) -> bool:
    """D2D works when each device is within the other's range."""
    return math.dist((a.x_m, a.y_m), (b.x_m, b.y_m)) <= min(a.d2d_range_m, b.d2d_range_m)


@dataclass
class Cluster:
    kind: str  # "fine-tuning" or "inference"
    chain: list[Device]  # start point, peers..., end point
    plan: SplitPlan

    @property
    def start(self) -> Device:
        return self.chain[0]

    @property
    def peers(self) -> list[Device]:
        return self.chain[1:-1]

    @property
    def end(self) -> Device:
        return self.chain[-1]


@dataclass
class Clustering:
    clusters: list[Cluster] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # device -> why


def _find_chain(
    start: Device, free: Sequence[Device], length: int, close_loop: bool, budget: int = 100_000
) -> list[Device] | None:
    """A simple path of `length` devices from `start` through `free` (consecutive devices
    reachable); with `close_loop`, the last device must also reach `start`."""
    candidates = sorted(free, key=lambda d: -d.flops_per_second)
    steps = 0

    def extend(path: list[Device]) -> list[Device] | None:
        nonlocal steps
        steps += 1
        if steps > budget:
            return None
        if len(path) == length:
            return path if not close_loop or reachable(path[-1], start) else None
        for device in candidates:
            if device not in path and reachable(path[-1], device):
                found = extend([*path, device])
                if found:
                    return found
        return None

    return extend([start])


def form_clusters(
    devices: Sequence[Device],
    peers_per_cluster: int,
    num_blocks: int,
    inference_starts: Sequence[str] = (),
) -> Clustering:
    """Form inference clusters for the requesting devices first, then fine-tuning clusters
    from the data holders, each start -> `peers_per_cluster` peers -> end point."""
    if peers_per_cluster < 1 or peers_per_cluster > num_blocks:
        raise ValueError(
            f"need 1 <= peers_per_cluster <= {num_blocks} blocks, got {peers_per_cluster}"
        )
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ValueError("device names must be unique")
    by_name = {d.name: d for d in devices}
    unknown = sorted(set(inference_starts) - set(by_name))
    if unknown:
        raise ValueError(f"inference start(s) {unknown} are not devices")
    length = peers_per_cluster + 2
    result = Clustering()
    used: set[str] = set()

    def place(kind: str, start: Device, close_loop: bool) -> None:
        free = [d for d in devices if d.name not in used and d.name != start.name]
        chain = _find_chain(start, free, length, close_loop)
        if chain is None:
            loop = " whose end point reaches it back" if close_loop else ""
            why = f"no D2D chain of {length} devices{loop} from it"
            result.unplaced[start.name] = f"{kind} start point: {why}"
            return
        used.update(d.name for d in chain)
        plan = plan_min_max([1.0] * num_blocks, [d.flops_per_second for d in chain[1:-1]])
        result.clusters.append(Cluster(kind, chain, plan))

    for name in inference_starts:
        if name not in used:
            place("inference", by_name[name], close_loop=True)
    for device in devices:
        if device.has_data and device.name not in used and device.name not in result.unplaced:
            place("fine-tuning", device, close_loop=False)
    for device in devices:
        if device.name not in used and device.name not in result.unplaced:
            result.unplaced[device.name] = (
                "holds no data and no cluster needed it"
                if not device.has_data
                else "no free chain left"
            )
    return result
