"""Fine-tune or infer: the paper's Table V, and MLCP against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from gaisnet_flwr.service.scheduler import (
    PRIOR_GAIN,
    SERVE,
    ProfitModel,
    QualityModel,
    choose_action,
    fitted_gain,
    mlcp_expected,
    mlcp_plan,
    predicted_accuracy,
    replay,
    run_policy,
    table_v,
)


def test_table_v_msip_earns_500_and_mlcp_650() -> None:
    model, demand = table_v()
    msip = run_policy("msip", model, demand)
    assert msip.total == 500 and msip.actions == [SERVE] * 10
    mlcp = run_policy("mlcp", model, demand)
    assert mlcp.total == 650
    # One of the tying optimal schedules: serve A, upgrade c twice, serve C at 100 seven times.
    assert mlcp.actions == [SERVE, "c", "c"] + [SERVE] * 7
    assert mlcp.profits == [50, -50, -50] + [100] * 7


def test_the_papers_rs_row_of_table_v_earns_minus_75() -> None:
    model, demand = table_v()
    rs = replay(model, demand, ["a", "b", "a", "C", "b", "C", "a", "C", "c", "C"])
    # upgrades a, b, a (-150); C at 50; b (-50); C at 50; a is capped (-50); C at 50; c (-50);
    # C at 75 after one upgrade of c
    assert rs.profits == [-50, -50, -50, 50, -50, 50, -50, 50, -50, 75]
    assert rs.total == -75
    # the paper's MSIP and MLCP rows price to their totals too
    assert replay(model, demand, ["A", "A", "B", "C", "C", "C", "C", "C", "C", "C"]).total == 500
    assert replay(model, demand, ["A", "c", "c", "C", "C", "C", "C", "C", "C", "C"]).total == 650
    with pytest.raises(ValueError, match="round 1: decision 'B' is neither"):
        replay(model, demand, ["B", "A", "B", "C", "C", "C", "C", "C", "C", "C"])


def test_rs_is_seeded_and_never_beats_mlcp() -> None:
    model, demand = table_v()
    a, b = run_policy("rs", model, demand, seed=3), run_policy("rs", model, demand, seed=3)
    assert a.actions == b.actions
    best = run_policy("mlcp", model, demand).total
    assert all(run_policy("rs", model, demand, seed=s).total <= best for s in range(50))


def brute_force(model: ProfitModel, demand: list[str]) -> float:
    best = float("-inf")
    for actions in itertools.product(model.actions(), repeat=len(demand)):
        levels, total = (0,) * len(model.models), 0.0
        for action, good in zip(actions, demand, strict=True):
            profit, levels = model.apply(action, good, levels)
            total += profit
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_mlcp_equals_brute_force_on_small_random_instances(seed: int) -> None:
    rng = random.Random(seed)
    models = ("a", "b")[: rng.randint(1, 2)]
    goods = {g: rng.choice(models) for g in "XY"}
    model = ProfitModel(
        models,
        goods,
        base=rng.choice([20.0, 50.0]),
        step=rng.choice([10.0, 30.0]),
        upgrade_cost=rng.choice([10.0, 40.0, 80.0]),
        cap=rng.randint(0, 3),
    )
    demand = [rng.choice("XY") for _ in range(rng.randint(1, 6))]
    assert run_policy("mlcp", model, demand).total == pytest.approx(brute_force(model, demand))
    assert run_policy("msip", model, demand).total <= brute_force(model, demand) + 1e-9


def test_expected_value_mlcp_matches_the_known_demand_case() -> None:
    model, demand = table_v()
    certain = [{g: 1.0} for g in demand]
    value, first = mlcp_expected(model, certain)
    assert value == 650 and first == mlcp_plan(model, tuple(demand))[0]
    # Mostly-A demand after round 1 makes upgrading a the better bet than c.
    skewed = [{"A": 1.0}] + [{"A": 0.9, "C": 0.1}] * 9
    _, action = mlcp_expected(model, skewed[1:])
    assert action == "a"


def test_bad_inputs_are_rejected() -> None:
    model, demand = table_v()
    with pytest.raises(ValueError, match="unknown policy 'greedy'; valid policies: rs, msip, mlcp"):
        run_policy("greedy", model, demand)
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['z'\]"):
        ProfitModel(("a",), {"A": "z"})
    with pytest.raises(ValueError, match="unknown good 'Q'"):
        run_policy("msip", model, ["Q"])


def test_integrated_mlcp_fine_tunes_when_it_pays_and_msip_never_does() -> None:
    quality = QualityModel(value=100.0, finetune_cost=20.0)
    rng = random.Random(0)
    # Edge 1 is at 10 % accuracy and one round closes half the gap: tuning once then serving
    # 5 requests earns -20 + 5 * 55 = 255 against 6 * 10 = 60 for serving straight away.
    demand = [1] * 6
    assert choose_action("mlcp", quality, [0.9, 0.1], [0.5, 0.5], demand, rng) == "finetune:1"
    assert choose_action("msip", quality, [0.9, 0.1], [0.5, 0.5], demand, rng) == SERVE
    # With one request left, tuning cannot pay back.
    assert choose_action("mlcp", quality, [0.9, 0.1], [0.5, 0.5], [1], rng) == SERVE
    assert predicted_accuracy(0.1, 0.5, 2) == pytest.approx(1 - 0.9 * 0.25)


def test_fitted_gain_from_measured_rounds() -> None:
    assert fitted_gain([]) == PRIOR_GAIN
    assert fitted_gain([(0.2, 0.6), (0.6, 0.8)]) == pytest.approx((0.5 + 0.5) / 2)
    assert fitted_gain([(0.5, 0.4)]) == 0.01  # a round that hurt: clipped, not negative
