"""Fine-tuning stops when the model converges, not only after num-rounds (paper Sec. III-C.1),
and each row carries the fine-tuning's simulated latency and energy so far (the paper's
convergence latency and energy cost).

The rules on synthetic rows, then real in-process runs of a tiny random-backbone ViT (2 edges,
8 rounds at most): a run stopped by `target-accuracy` or `patience` equals the first rounds of
the run that went on, bit for bit, and ends on the round that met the rule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common.logger import FLOWER_LOGGER

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.convergence import stop_reason
from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.recorder import RoundRecorder, RunResult
from gaisnet_flwr.config import ConfigError, RunConfig
from tests.conftest import TINY_RUN


def rows(*accuracies: float | None) -> list[dict[str, Any]]:
    """Rows 0.. with these central accuracies (None: a round not evaluated)."""
    return [
        {"round": r} if a is None else {"round": r, c.ACCURACY: a} for r, a in enumerate(accuracies)
    ]


@pytest.mark.parametrize(
    "accuracies, target, patience, stops",
    [
        ((0.5,), 0.4, 1, False),  # round 0 (the initial model) never stops a run
        ((0.2, 0.39), 0.4, 0, False),
        ((0.2, 0.4), 0.4, 0, True),  # reached: >=
        ((0.2, 0.5, None), 0.4, 0, False),  # a round without evaluation decides nothing
        ((0.2, 0.3, 0.3), 0.0, 2, False),  # one evaluation without a better one
        ((0.2, 0.3, 0.3, 0.29), 0.0, 2, True),  # a tie is not better
        ((0.2, 0.3, None, 0.3, None, 0.31), 0.0, 2, False),  # counts evaluations, not rounds
        ((0.4, 0.3, 0.35), 0.0, 2, True),  # the initial model's accuracy is the best to beat
        ((0.2, 0.3, 0.3, 0.29), 0.0, 0, False),  # both off
    ],
)
def test_the_rules(
    accuracies: tuple[float | None, ...], target: float, patience: int, stops: bool
) -> None:
    assert (stop_reason(rows(*accuracies), target, patience) is not None) is stops


def test_the_deployed_cloud_s_rows_start_at_cloud_round_1() -> None:
    # No initial model's row: cloud round 1 may meet the target, and patience counts from it.
    cloud = rows(None, 0.5, 0.4, 0.45)[1:]
    assert stop_reason(cloud[:1], 0.5, 0) == "central accuracy 0.5000 reached target-accuracy 0.5"
    assert stop_reason(cloud[:1], 0.0, 1) is None
    assert stop_reason(cloud, 0.0, 2) is not None and stop_reason(cloud[:2], 0.0, 2) is None


def test_the_reasons_name_the_rule() -> None:
    reached = stop_reason(rows(0.2, 0.45), 0.4, 0)
    assert reached == "central accuracy 0.4500 reached target-accuracy 0.4"
    stalled = stop_reason(rows(0.2, 0.5, 0.4, 0.45), 0.0, 2)
    assert stalled == "no better central accuracy than 0.5000 in 2 evaluation(s) (patience 2)"


def test_the_rules_are_refused_where_the_scheduler_decides_the_rounds() -> None:
    settings = {"target-accuracy": 0.9, "service": "integrated", "demand": "0"}
    with pytest.raises(ConfigError, match=r"stop fine-tuning \(service='finetune'\).*'integrated'"):
        RunConfig.from_run_config(settings)
    # Deployed, the cloud decides (tests/test_hierarchy_lab.py); each edge shares its values.
    for tier in ({"tier": "cloud"}, {"tier": "edge", "edge-dir": "/x"}):
        RunConfig.from_run_config({"patience": 2, "target-accuracy": 0.9, **tier})


TINY: dict[str, Any] = {**TINY_RUN, "num-rounds": 8}
TIMES = {c.ROUND_TIME, c.ROUND_CPU, c.CENTRAL_EVAL_TIME}


def untimed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIMES and not k.endswith("time-s")}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """All 8 rounds, no rule."""
    out = tmp_path_factory.mktemp("full") / "run"
    return run_inprocess({**TINY, "output-dir": str(out)}, num_clusters=2)


def stopped_run(tmp: Path, settings: dict[str, Any]) -> tuple[RunResult, str]:
    log = tmp / "flower.log"
    handler = logging.FileHandler(log)
    FLOWER_LOGGER.addHandler(handler)
    try:
        result = run_inprocess({**TINY, **settings, "output-dir": str(tmp / "run")}, 2)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
        handler.close()
    return result, log.read_text()


def test_the_totals_add_up_each_round_s_priced_latency_and_energy(tmp_path: Path) -> None:
    recorder = RoundRecorder(tmp_path, 3, {})
    recorder.record(0, {c.ACCURACY: 0.1, "loss": 2.0})
    for r, train in enumerate(
        [
            {c.ROUND_LATENCY: 1.5, c.ENERGY: 2.0},
            {c.ROUND_LATENCY: 2.25, c.ENERGY: 0.5},
            {c.ENERGY: 1.0},  # no priced latency: no cluster reported one
        ],
        start=1,
    ):
        recorder.train_round(r, train)
        recorder.record(r, {c.ACCURACY: 0.2, "loss": 1.0})
    recorder.close()
    totals = [(r[c.TOTAL_LATENCY], r[c.TOTAL_ENERGY]) for r in recorder.rows]
    assert totals == [(0.0, 0.0), (1.5, 2.0), (3.75, 2.5), (3.75, 3.5)]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_each_row_carries_the_fine_tuning_s_latency_and_energy_so_far(full: RunResult) -> None:
    latency = energy = 0.0
    for row in full.rows:
        latency += row.get(f"{c.TRAIN_ROW}/{c.ROUND_LATENCY}", 0.0)
        energy += row.get(f"{c.TRAIN_ROW}/{c.ENERGY}", 0.0)
        assert (row[c.TOTAL_LATENCY], row[c.TOTAL_ENERGY]) == (latency, energy)
    assert full.rows[0][c.TOTAL_LATENCY] == 0.0 and latency > 0 and energy > 0


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("rule", ["target-accuracy", "patience"])
def test_a_run_stops_on_the_round_that_meets_a_rule_with_the_rounds_of_one_that_went_on(
    full: RunResult, rule: str, tmp_path: Path
) -> None:
    accuracies = [r[c.ACCURACY] for r in full.rows]
    if rule == "target-accuracy":  # the first round above the initial model's accuracy
        target = next(a for a in accuracies[1:] if a > accuracies[0])
        settings: dict[str, Any] = {rule: target}
        meets = 1 + accuracies[1:].index(target)
    else:
        settings = {rule: 1}  # the first round no better than all before it
        meets = next(r for r in range(1, 9) if accuracies[r] <= max(accuracies[:r]))
    assert meets < 8, "the full run must give the rule a round to stop at"
    result, log = stopped_run(tmp_path, settings)
    assert [r["round"] for r in result.rows] == list(range(meets + 1))
    why = result.rows[meets].pop(c.STOPPED)
    assert why.startswith("central accuracy" if rule == "target-accuracy" else "no better")
    on_disk = json.loads((result.output_dir / "metrics.json").read_text())
    assert on_disk[-1][c.STOPPED] == why
    assert [untimed(r) for r in result.rows] == [untimed(r) for r in full.rows[: meets + 1]]
    for key, value in full.round_modules[meets].items():
        assert np.array_equal(value, result.final_modules[key]), key
    assert f"stopped after round {meets} of 8: " in log
    assert f"after {meets} rounds" in log and "cost model, fine-tuning in all: latency" in log
