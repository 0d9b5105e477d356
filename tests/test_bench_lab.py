"""bench_lab's figures from its runs (the lab runs themselves: tests/test_lab.py)."""

from __future__ import annotations

import pytest

from gaisnet_flwr.experiments.bench_lab import LabRun, summary


def test_the_summary_pairs_each_turns_cold_and_warm_runs() -> None:
    runs = [
        LabRun("cold", 50.0, [10.0, 12.0], 1.0, "a"),
        LabRun("warm", 30.0, [5.0, 6.0], 1.0, "a"),
        LabRun("warm", 32.0, [4.0, 7.0], 1.0, "a"),
        LabRun("cold", 40.0, [11.0, 13.0], 1.0, "a"),
    ]
    row = summary(runs)
    assert row["turns"] == 2
    assert row["warm / cold run turns min"] == pytest.approx(0.6)  # 30 / 50
    assert row["warm / cold run turns max"] == pytest.approx(0.8)  # 32 / 40
    assert row["warm / cold run"] == pytest.approx(0.7)
    assert row["cold round s (median)"] == 11.5 and row["warm round s (median)"] == 5.5
    assert row["same final modules"]
    assert not summary([*runs[:3], LabRun("cold", 40.0, [1.0], 1.0, "b")])["same final modules"]
