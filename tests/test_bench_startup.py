"""The start-up benchmark's pieces that need no `flwr run`: the apps it writes and its ratios."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gaisnet_flwr.experiments.bench_startup import (
    TIMM_IMPORTS,
    StartupRun,
    summary,
    write_noop_app,
)


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_the_timm_floor_is_the_no_op_plus_timm_in_both_modules(tmp_path: Path) -> None:
    noop = write_noop_app(tmp_path / "noop")
    floor = write_noop_app(tmp_path / "floor", TIMM_IMPORTS)
    for module in ("server.py", "client.py"):
        assert "timm" not in imported(noop / "noop" / module)
        assert "timm" in imported(floor / "noop" / module)
        body = (floor / "noop" / module).read_text().removeprefix(TIMM_IMPORTS)
        assert body == (noop / "noop" / module).read_text()  # nothing else differs
    assert (floor / "pyproject.toml").read_text() == (noop / "pyproject.toml").read_text()


def test_summary_pairs_each_turns_runs() -> None:
    seconds = {"gaisnet": [20.0, 30.0, 22.0], "no-op": [10.0, 12.0, 11.0]}
    seconds["timm floor"] = [18.0, 24.0, 20.0]
    runs = [StartupRun(a, 4, s, 1.0) for a, times in seconds.items() for s in times]
    row = summary(runs + [StartupRun("no-op", 100, 1.0, 1.0)], 4)  # another N: left out
    assert row["turns"] == 3
    assert row["gaisnet s (median)"] == 22.0 and row["no-op s (median)"] == 11.0
    assert row["ours / no-op"] == pytest.approx(2.0)
    assert row["ours / no-op turns min"] == pytest.approx(2.0)
    assert row["ours / no-op turns max"] == pytest.approx(30 / 12)
    assert row["ours / timm floor"] == pytest.approx(22 / 20)
    assert row["timm floor / no-op turns min"] == pytest.approx(18 / 10)
