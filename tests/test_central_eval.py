"""The ServerApp's central evaluation every K rounds (run-config `central-eval-every`).

Two real in-process runs of a tiny random-backbone ViT (2 edges, 3 rounds), one evaluating
every round and one every 2nd: the skipped round keeps its row (train metrics, costs, its
modules on disk) without accuracy, the evaluated rounds (0, 2 and the last, 3) give the same
numbers bit for bit, and training is untouched by what the server evaluates.
"""

from __future__ import annotations

import csv
import json
import logging
from typing import Any

import numpy as np
import pytest
from flwr.common.logger import FLOWER_LOGGER

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.recorder import RunResult
from tests.conftest import TINY_RUN

TINY: dict[str, Any] = {**TINY_RUN, "num-rounds": 3}
CENTRAL = (c.ACCURACY, "loss", c.CENTRAL_EVAL_TIME, "edge0/accuracy", "edge1/loss")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[RunResult, list[str]]]:
    """{K: (the run's result, its log lines)} for K = 1 and 2."""
    tmp = tmp_path_factory.mktemp("central-eval")
    out: dict[int, tuple[RunResult, list[str]]] = {}
    for every in (1, 2):
        log = tmp / f"every-{every}.log"
        handler = logging.FileHandler(log)
        FLOWER_LOGGER.addHandler(handler)
        try:
            config = {**TINY, "central-eval-every": every, "output-dir": str(tmp / f"k{every}")}
            result = run_inprocess(config, num_clusters=2)
        finally:
            FLOWER_LOGGER.removeHandler(handler)
            handler.close()
        out[every] = result, log.read_text().splitlines()
    return out


def test_a_skipped_round_keeps_its_row_and_modules_without_accuracy(runs: Any) -> None:
    result, _ = runs[2]
    rows = json.loads((result.output_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    evaluated = [r["round"] for r in rows if c.ACCURACY in r]
    assert evaluated == [0, 2, 3]  # round 0 and the last always
    skipped = rows[1]
    assert not set(CENTRAL) & set(skipped), skipped.keys()
    assert skipped[f"{c.TRAIN_ROW}/{c.ENERGY}"] > 0 and skipped[c.FAILED_CLUSTERS] == 0
    for r in range(4):
        assert (result.output_dir / f"rounds/round-{r:03d}.npz").is_file()
    with (result.output_dir / "metrics.csv").open(newline="") as f:
        cells = [row[c.ACCURACY] for row in csv.DictReader(f)]
    assert cells[1] == "" and all(cells[r] for r in (0, 2, 3))
    assert (result.output_dir / "summary.png").stat().st_size > 10_000
    with pytest.raises(KeyError, match=r"round 1 has no 'accuracy'.*\[0, 2, 3\].*central-eval"):
        result.accuracy(1)


def test_evaluated_rounds_and_training_equal_a_run_that_evaluates_every_round(
    runs: Any,
) -> None:
    every, second = runs[1][0], runs[2][0]
    for r in (0, 2, 3):
        for key in CENTRAL[:-1] + ("edge1/accuracy",):
            if key != c.CENTRAL_EVAL_TIME:
                assert every.rows[r][key] == second.rows[r][key], (r, key)
    timings = {c.ROUND_TIME, c.ROUND_CPU, c.CENTRAL_EVAL_TIME}
    for r in (1, 2, 3):
        train = [k for k in every.rows[r] if k.startswith(f"{c.TRAIN_ROW}/") and "time" not in k]
        assert train and all(every.rows[r][k] == second.rows[r][k] for k in train), r
        assert set(every.rows[r]) - set(second.rows[r]) <= set(CENTRAL) | timings | {
            "edge0/loss",
            "edge1/accuracy",
        }
    for key, value in every.final_modules.items():
        assert np.array_equal(value, second.final_modules[key]), key


def test_the_round_line_says_it_was_not_evaluated(runs: Any) -> None:
    _, lines = runs[2]
    line = next(x for x in lines if "[round 1/3]" in x)
    assert line.startswith("[round 1/3] (no central evaluation) | train acc "), line
    final = next(x for x in lines if x.startswith("FINAL"))
    assert f"{runs[2][0].rows[3][c.ACCURACY]:.4f} after 3 rounds" in final
