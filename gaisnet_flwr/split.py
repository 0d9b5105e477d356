"""How to split the model across a cluster (paper Sec. III-C.1 and IV-A).

The start point holds the embedding, the end point the final norm and the head, and the middle
peers hold contiguous ranges of Transformer blocks together with their prompt modules. ViT blocks
are homogeneous, so sizing the ranges to the peers' compute speeds is the classic min-max linear
partition problem: choose cut points so that the slowest stage is as fast as possible. We solve it
exactly by dynamic programming in O(L^2 K) for L blocks and K peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

PLANNERS = ("minmax", "even")


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

    @cache
    def best(first_block: int, peer: int) -> tuple[float, tuple[int, ...]]:
        """Min bottleneck for blocks [first_block, L) on peers [peer, K); returns the sizes."""
        remaining_peers = num_peers - peer
        if remaining_peers == 1:
            return (prefix[num_blocks] - prefix[first_block]) / speeds[peer], (
                num_blocks - first_block,
            )
        result: tuple[float, tuple[int, ...]] = (float("inf"), ())
        # Leave at least one block for each later peer.
        for stop in range(first_block + 1, num_blocks - remaining_peers + 2):
            here = (prefix[stop] - prefix[first_block]) / speeds[peer]
            rest, sizes = best(stop, peer + 1)
            candidate = max(here, rest)
            if candidate < result[0]:  # strict: ties keep the earliest (fewest blocks up front)
                result = (candidate, (stop - first_block, *sizes))
        return result

    return SplitPlan.from_sizes(best(0, 0)[1])


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
    raise PlanError(f"unknown planner {planner!r}; valid planners: {', '.join(PLANNERS)}")
