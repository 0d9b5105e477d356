"""How to cluster clients (paper Sec. IV-B): chains of D2D-reachable devices.

A cluster is a chain start point -> peers -> end point in which every consecutive pair can talk
over D2D (within both devices' range). A fine-tuning cluster starts at a device that holds data;
an inference cluster starts at the requesting device and must also let its end point reach the
start point, which receives the result (paper Fig. 5). Each cluster is then split with the
planner over its peers' compute speeds.

The search is a depth-first search over simple paths that tries devices without data first
(data holders stay free to start fine-tuning clusters) and faster devices first: exact for
the small device graphs of a cell (it finds a chain whenever one exists), with a step budget so a
large graph cannot stall a run. Devices that end up in no cluster are reported with the reason.

`plan_chain` lets the caller plan each candidate chain with its own devices and links (e.g. the
communication-aware planner with per-device memory, gaisnet_flwr/population); a chain it cannot
plan (None) is passed over and the search goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


# A chain in chain order -> its split plan, or None when it cannot be planned (e.g. memory).
ChainPlanner = Callable[[Sequence[Device]], SplitPlan | None]


def _find_chain(
    start: Device,
    free: Sequence[Device],
    length: int,
    close_loop: bool,
    accept: Callable[[list[Device]], bool] | None = None,
    budget: int = 20_000,
) -> list[Device] | None:
    """A simple path of `length` devices from `start` through `free` (consecutive devices
    reachable); with `close_loop`, the last device must also reach `start`; with `accept`, the
    first such path it accepts. At most `budget` steps (one per partial path tried)."""
    # Devices without data first (data holders stay free to start their own fine-tuning
    # clusters), faster ones first among those.
    candidates = sorted(free, key=lambda d: (d.has_data, -d.flops_per_second))
    neighbours: dict[str, list[Device]] = {}  # each device's reachable candidates, in order
    steps = 0

    def near(device: Device) -> list[Device]:
        if device.name not in neighbours:
            neighbours[device.name] = [c for c in candidates if reachable(device, c)]
        return neighbours[device.name]

    def extend(path: list[Device], names: set[str]) -> list[Device] | None:
        nonlocal steps
        steps += 1
        if steps > budget:
            return None
        if len(path) == length:
            if close_loop and not reachable(path[-1], start):
                return None
            return path if accept is None or accept(path) else None
        for device in near(path[-1]):
            if device.name not in names:
                found = extend([*path, device], names | {device.name})
                if found:
                    return found
        return None

    return extend([start], {start.name})


def form_clusters(
    devices: Sequence[Device],
    peers_per_cluster: int,
    num_blocks: int,
    inference_starts: Sequence[str] = (),
    plan_chain: ChainPlanner | None = None,
) -> Clustering:
    """Form inference clusters for the requesting devices first, then fine-tuning clusters
    from the data holders, each start -> `peers_per_cluster` peers -> end point.

    Each chain is planned by `plan_chain` (default: compute-only min-max over the peers' speeds);
    chains it cannot plan are skipped."""
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

    def compute_only(chain: Sequence[Device]) -> SplitPlan:
        return plan_min_max([1.0] * num_blocks, [d.flops_per_second for d in chain[1:-1]])

    planner = plan_chain or compute_only

    def place(kind: str, start: Device, close_loop: bool) -> None:
        free = [d for d in devices if d.name not in used and d.name != start.name]
        plans: dict[tuple[str, ...], SplitPlan] = {}
        rejected = 0

        def accept(chain: list[Device]) -> bool:
            nonlocal rejected
            plan = planner(chain)
            if plan is None:
                rejected += 1
                return False
            plans[tuple(d.name for d in chain)] = plan
            return True

        chain = _find_chain(start, free, length, close_loop, accept)
        if chain is None:
            loop = " whose end point reaches it back" if close_loop else ""
            why = f"no D2D chain of {length} devices{loop} from it"
            if used:
                why += f" through the {len(free)} device(s) not yet in a cluster"
            if rejected:
                why += f" that can be planned ({rejected} chain(s) found, none fits memory)"
            result.unplaced[start.name] = f"{kind} start point: {why}"
            return
        used.update(d.name for d in chain)
        result.clusters.append(Cluster(kind, chain, plans[tuple(d.name for d in chain)]))

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
