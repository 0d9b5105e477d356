"""A fine-tuning run goes on after its last completed round (run-config `resume = true`).

Real in-process runs of a tiny random-backbone ViT (2 edges, 4 clusters, the cloud every 2
rounds): 4 rounds at once, and 2 rounds then resumed to 4 in the same folder, give the same
rows and the same final modules bit for bit, with the default strategy and with the two whose
server keeps state between rounds (FedAdam's moments, FedAvgM's momentum); what cannot be
resumed exactly is refused before any work, naming why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.recorder import RunResult
from gaisnet_flwr.apps.server_app import check_run_config
from gaisnet_flwr.config import ConfigError
from tests.conftest import TINY_RUN

TINY: dict[str, Any] = {**TINY_RUN, "cloud-every": 2}
TIMES = {c.ROUND_TIME, c.ROUND_CPU, c.CENTRAL_EVAL_TIME}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


STRATEGIES = {
    "module-fedavg": {},
    "fedadam": {"strategy": "fedadam"},
    "fedavgm": {"strategy": "fedavgm", "strategy-options": "server_momentum=0.9"},
}


def resume_runs(tmp: Path, settings: dict[str, Any]) -> tuple[RunResult, RunResult, Path]:
    """(4 rounds at once, 2 rounds resumed to 4, the resumed run's folder)."""
    config = {**TINY, **settings}
    whole = run_inprocess({**config, "num-rounds": 4, "output-dir": str(tmp / "whole")}, 4)
    folder = tmp / "stopped"
    run_inprocess({**config, "num-rounds": 2, "output-dir": str(folder)}, 4)
    resumed = run_inprocess(
        {**config, "num-rounds": 4, "resume": True, "output-dir": str(folder)}, 4
    )
    return whole, resumed, folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, RunResult, Path]:
    return resume_runs(tmp_path_factory.mktemp("resume"), {})


def untimed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIMES and not k.endswith("time-s")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_resumed_run_equals_one_that_never_stopped(
    runs: Any, strategy: str, tmp_path: Path
) -> None:
    whole, resumed, folder = (
        runs if strategy == "module-fedavg" else resume_runs(tmp_path, STRATEGIES[strategy])
    )
    on_disk = json.loads((folder / "metrics.json").read_text())
    assert [r["round"] for r in on_disk] == [0, 1, 2, 3, 4]
    assert [untimed(r) for r in on_disk] == [untimed(r) for r in whole.rows]
    cloud = [r["round"] for r in on_disk if f"{c.TRAIN_ROW}/{c.CLOUD_ROUND}" in r]
    assert cloud == [2, 4]  # the cloud's rounds count on across the resume
    assert resumed.final_modules.keys() == whole.final_modules.keys()
    for key, value in whole.final_modules.items():
        assert np.array_equal(value, resumed.final_modules[key]), key
    assert (folder / "rounds" / "round-004.npz").is_file()
    assert json.loads((folder / "config.json").read_text())["num-rounds"] == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": 0.5}, r"another run-config \(it differs in \['lr'\]\).*may change"),
        ({"num-rounds": 4}, r"holds 4 completed round\(s\) already, num-rounds=4; give num-r"),
        (  # its state was not saved: the folder's strategy kept none
            {"num-rounds": 6, "strategy": "fedadam"},
            r"not a whole run's folder: it has metrics.json but no rounds/server-state-004.npz",
        ),
    ],
)
def test_what_cannot_be_resumed_exactly_is_refused_at_the_boundary(
    runs: Any, change: dict[str, Any], message: str
) -> None:
    whole = runs[0]  # its folder holds 4 rounds
    config = {**TINY, "num-rounds": 4, "output-dir": str(whole.output_dir), "resume": True}
    with pytest.raises(ConfigError, match=message):
        check_run_config({**config, **change})
    assert not (whole.output_dir / "FAILED.txt").exists()  # the finished run is left as it was


def test_how_the_run_is_watched_and_stopped_may_change(runs: Any) -> None:
    whole = runs[0]
    config = {**TINY, "num-rounds": 6, "output-dir": str(whole.output_dir), "resume": True}
    check_run_config({**config, "central-eval-every": 2, "patience": 3, "server-threads": 0})


def test_a_folder_without_rows_starts_afresh_and_one_without_modules_is_refused(
    tmp_path: Path,
) -> None:
    config = {**TINY, "num-rounds": 1, "resume": True, "output-dir": str(tmp_path / "new")}
    check_run_config(config)  # nothing to go on with: a fresh run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(json.dumps([{"round": 0}]))
    (broken / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has metrics.json but no rounds/round-000.npz"):
        check_run_config({**config, "output-dir": str(broken)})
