"""Split plans and the min-max planner (paper Sec. IV-A)."""

from __future__ import annotations

import itertools
import random

import pytest

from gaisnet_flwr.split.plan import (
    PlanError,
    SplitPlan,
    bottleneck,
    make_plan,
    plan_even,
    plan_min_max,
)


def compositions(total: int, parts: int):
    """Every way to give `parts` peers >= 1 of `total` blocks, in order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [b - a for a, b in itertools.pairwise(bounds)]


def brute_force(costs: list[float], speeds: list[float]) -> float:
    return min(
        bottleneck(SplitPlan.from_sizes(sizes), costs, speeds)
        for sizes in compositions(len(costs), len(speeds))
    )


@pytest.mark.parametrize("seed", range(40))
def test_min_max_planner_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randint(1, 9)
    num_peers = rng.randint(1, num_blocks)
    costs = [rng.uniform(0.5, 2.0) if seed % 2 else 1.0 for _ in range(num_blocks)]
    speeds = [rng.uniform(0.2, 3.0) for _ in range(num_peers)]
    plan = plan_min_max(costs, speeds)
    assert plan.num_peers == num_peers
    assert bottleneck(plan, costs, speeds) == pytest.approx(brute_force(costs, speeds), rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_ties_are_broken_by_the_least_total_time(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randint(2, 9)
    speeds = [rng.choice([1.0, 2.0, 4.0]) for _ in range(rng.randint(1, num_blocks))]
    costs = [1.0] * num_blocks
    plan = plan_min_max(costs, speeds)
    best = brute_force(costs, speeds)
    optimal = [
        SplitPlan.from_sizes(s)
        for s in compositions(num_blocks, len(speeds))
        if bottleneck(SplitPlan.from_sizes(s), costs, speeds) <= best * (1 + 1e-12)
    ]

    def total(p: SplitPlan) -> float:
        return sum(size / speed for size, speed in zip(p.sizes(), speeds, strict=True))

    assert bottleneck(plan, costs, speeds) == pytest.approx(best, rel=1e-12)
    assert total(plan) == pytest.approx(min(total(p) for p in optimal), rel=1e-12)


def test_a_fast_peer_is_not_starved() -> None:
    # Peers 32, 12, 4, 32 GFLOP/s over 12 blocks: the slow peer bounds the bottleneck at one
    # block; the two fast peers should then carry the most, not one block each.
    sizes = plan_min_max([1.0] * 12, [32.0, 12.0, 4.0, 32.0]).sizes()
    assert sizes[2] == 1 and sizes[0] >= 4 and sizes[3] >= 4


def test_faster_peer_gets_more_blocks() -> None:
    # 12 blocks on peers 1x, 2x, 1x fast: the bottleneck is minimised by 3 / 6 / 3.
    assert plan_min_max([1.0] * 12, [1.0, 2.0, 1.0]).sizes() == [3, 6, 3]


def test_even_plan() -> None:
    assert plan_even(12, 5).sizes() == [3, 3, 2, 2, 2]
    assert make_plan("even", 6, [1.0, 9.0]).sizes() == [3, 3]
    assert make_plan("minmax", 6, [1.0, 2.0]).sizes() == [2, 4]


@pytest.mark.parametrize(
    ("num_blocks", "ranges", "message"),
    [
        (6, ((0, 3), (2, 6)), r"peer 1 range \[2, 6\) overlaps block 3"),
        (6, ((0, 2), (3, 6)), r"peer 1 range \[3, 6\) leaves a gap before block 2"),
        (6, ((0, 3), (3, 7)), r"peer 1 range \[3, 7\) is empty or outside blocks \[0, 6\)"),
        (6, ((0, 3), (3, 3), (3, 6)), r"peer 1 range \[3, 3\) is empty"),
        (6, ((0, 4),), r"blocks \[4, 6\) are assigned to no peer"),
        (6, (), "at least one middle peer"),
        (2, ((0, 1), (1, 2), (2, 2)), "3 peers for 2 blocks"),
    ],
)
def test_invalid_plans_are_rejected(num_blocks: int, ranges: tuple, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        SplitPlan(num_blocks, ranges)


def test_planner_rejects_bad_input() -> None:
    with pytest.raises(PlanError, match="need 1 <= peers <= blocks, got 7 peers for 6 blocks"):
        plan_min_max([1.0] * 6, [1.0] * 7)
    with pytest.raises(PlanError, match="speeds must be > 0"):
        plan_min_max([1.0] * 6, [1.0, 0.0])
    with pytest.raises(PlanError, match="unknown planner 'greedy'; valid planners: minmax, even"):
        make_plan("greedy", 6, [1.0])
