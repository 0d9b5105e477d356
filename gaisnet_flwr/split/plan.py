"""How to split the model across a cluster (paper Sec. III-C.1 and IV-A).

The start point holds the embedding, the end point the final norm and the head, and the middle
peers hold contiguous ranges of Transformer blocks together with their prompt modules. ViT blocks
are homogeneous, so sizing the ranges to the peers' compute speeds is the classic min-max linear
partition problem: choose cut points so that the slowest stage is as fast as possible. We solve it
exactly by dynamic programming in O(L^2 K) for L blocks and K peers, then break ties by the least
total compute time (a second exact DP restricted to stages within the optimal bottleneck).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from gaisnet_flwr.config import PLANNERS

# Compute-only planners size the ranges to the peers' speeds alone (or ignore them); "comm-aware"
# also counts the hop each peer sends and its memory (it needs the cluster's links and the model:
# gaisnet_flwr/population/planning.py).


class PlanError(ValueError):
    """A split plan that cannot run, with the reason."""


@dataclass(frozen=True)
class SplitPlan:
    """Block ranges `[start, stop)` of the middle peers, in chain order.

    A valid plan covers blocks `0 .. num_blocks - 1` exactly once, in order, with at least one
    block per peer (a peer with no block would only relay smashed data).
    """

    num_blocks: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise PlanError(f"a plan needs at least one block, got num_blocks={self.num_blocks}")
        if not self.ranges:
            raise PlanError("a plan needs at least one middle peer")
        if len(self.ranges) > self.num_blocks:
            raise PlanError(
                f"{len(self.ranges)} peers for {self.num_blocks} blocks: at most one peer per "
                f"block is allowed"
            )
        expected_start = 0
        for k, (start, stop) in enumerate(self.ranges):
            if not (0 <= start < stop <= self.num_blocks):
                raise PlanError(
                    f"peer {k} range [{start}, {stop}) is empty or outside blocks "
                    f"[0, {self.num_blocks})"
                )
            if start != expected_start:
                kind = "overlaps" if start < expected_start else "leaves a gap before"
                raise PlanError(f"peer {k} range [{start}, {stop}) {kind} block {expected_start}")
            expected_start = stop
        if expected_start != self.num_blocks:
            raise PlanError(f"blocks [{expected_start}, {self.num_blocks}) are assigned to no peer")

    @property
    def num_peers(self) -> int:
        return len(self.ranges)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> SplitPlan:
        """A plan from the number of blocks each peer takes, e.g. `[4, 4, 4]`."""
        ranges, start = [], 0
        for size in sizes:
            ranges.append((start, start + size))
            start += size
        return cls(num_blocks=start, ranges=tuple(ranges))

    def sizes(self) -> list[int]:
        return [stop - start for start, stop in self.ranges]


def bottleneck(plan: SplitPlan, block_costs: Sequence[float], speeds: Sequence[float]) -> float:
    """The slowest peer's time: max over peers of (cost of its blocks) / (its speed)."""
    return max(
        sum(block_costs[start:stop]) / speed
        for (start, stop), speed in zip(plan.ranges, speeds, strict=True)
    )


def plan_min_max(block_costs: Sequence[float], speeds: Sequence[float]) -> SplitPlan:
    """Exact min-max partition of blocks (in order) over peers (in chain order).

    Minimises the slowest peer's time; among the plans that reach that bottleneck it takes one
    with the least total compute time (faster peers carry more), so no fast peer is starved.

    Args:
        block_costs: compute per block (e.g. FLOPs); all equal for a plain ViT.
        speeds: compute speed per peer (e.g. FLOP/s), in chain order.
    """
    num_blocks, num_peers = len(block_costs), len(speeds)
    if num_peers < 1 or num_peers > num_blocks:
        raise PlanError(f"need 1 <= peers <= blocks, got {num_peers} peers for {num_blocks} blocks")
    if any(s <= 0 for s in speeds):
        raise PlanError(f"peer speeds must be > 0, got {list(speeds)}")
    if any(c < 0 for c in block_costs):
        raise PlanError(f"block costs must be >= 0, got {list(block_costs)}")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)
    return plan_min_max_stages(
        num_blocks,
        num_peers,
        lambda peer, start, stop: (prefix[stop] - prefix[start]) / speeds[peer],
    )


def plan_even(num_blocks: int, num_peers: int) -> SplitPlan:
    """Blocks split as evenly as possible, earlier peers taking the remainder."""
    if num_peers < 1 or num_peers > num_blocks:
        raise PlanError(f"need 1 <= peers <= blocks, got {num_peers} peers for {num_blocks} blocks")
    base, extra = divmod(num_blocks, num_peers)
    return SplitPlan.from_sizes([base + (k < extra) for k in range(num_peers)])


def make_plan(planner: str, num_blocks: int, speeds: Sequence[float]) -> SplitPlan:
    """Plan by name: `minmax` (sized to speeds) or `even` (ignores speeds)."""
    if planner == "minmax":
        return plan_min_max([1.0] * num_blocks, speeds)
    if planner == "even":
        return plan_even(num_blocks, len(speeds))
    if planner == "comm-aware":
        raise PlanError(
            "planner 'comm-aware' needs the cluster's links and the model: use "
            "gaisnet_flwr.population.planning.plan_cluster"
        )
    raise PlanError(f"unknown planner {planner!r}; valid planners: {', '.join(PLANNERS)}")


def node_names(num_peers: int) -> list[str]:
    """Chain order, the names segments, costs and metrics use: start, peer1 .. peerK, end."""
    return ["start", *(f"peer{k + 1}" for k in range(num_peers)), "end"]


# (peer, first block, stop block) -> that peer's time with blocks [first, stop); inf = cannot
StageTime = Callable[[int, int, int], float]


def plan_min_max_stages(num_blocks: int, num_peers: int, stage_time: StageTime) -> SplitPlan:
    """Exact min-max partition where each stage's time is any function of its peer and range.

    The communication-aware planner (paper Sec. IV-A: "the computing resources of the working
    clients, as well as the communication resources") passes a peer's compute time for blocks
    [first, stop) plus the time to send what those blocks produce (and the gradient of what they
    received), each over that peer's own link; a range that does not fit the peer's memory is
    `math.inf`. The same two DPs as `plan_min_max`: the least possible bottleneck, then the least
    total time among plans within it.

    Raises:
        PlanError: no plan gives every peer a range it can take (every choice is `inf`).
    """
    if num_peers < 1 or num_peers > num_blocks:
        raise PlanError(f"need 1 <= peers <= blocks, got {num_peers} peers for {num_blocks} blocks")

    def stops(first_block: int, peer: int) -> range:
        if peer == num_peers - 1:
            return range(num_blocks, num_blocks + 1)
        return range(first_block + 1, num_blocks - (num_peers - peer) + 2)

    @cache
    def time(first_block: int, stop: int, peer: int) -> float:
        value = float(stage_time(peer, first_block, stop))
        if math.isnan(value) or value < 0:
            raise PlanError(f"stage time of peer {peer} on [{first_block}, {stop}) is {value}")
        return value

    @cache
    def bottleneck_from(first_block: int, peer: int) -> float:
        if peer == num_peers:
            return 0.0
        return min(
            max(time(first_block, stop, peer), bottleneck_from(stop, peer + 1))
            for stop in stops(first_block, peer)
        )

    best = bottleneck_from(0, 0)
    if math.isinf(best):
        raise PlanError(
            f"no split of {num_blocks} blocks over {num_peers} peers fits every peer (each "
            f"choice leaves some peer a range it cannot take, e.g. too little memory)"
        )
    limit = best * (1 + 1e-12)

    @cache
    def least_total(first_block: int, peer: int) -> tuple[float, tuple[int, ...]]:
        if peer == num_peers:
            return (0.0, ()) if first_block == num_blocks else (math.inf, ())
        result: tuple[float, tuple[int, ...]] = (math.inf, ())
        for stop in stops(first_block, peer):
            here = time(first_block, stop, peer)
            if here > limit:
                continue
            rest, sizes = least_total(stop, peer + 1)
            if here + rest < result[0]:
                result = (here + rest, (stop - first_block, *sizes))
        return result

    return SplitPlan.from_sizes(least_total(0, 0)[1])


def plan_bottleneck(plan: SplitPlan, stage_time: StageTime) -> float:
    """The busiest peer's time under `stage_time` (what `plan_min_max_stages` minimises)."""
    return max(stage_time(k, start, stop) for k, (start, stop) in enumerate(plan.ranges))
