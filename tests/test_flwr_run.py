"""`flwr run` for real: the CLI, a managed local SuperLink, the simulation engine, the app.

Goes through `scripts/flwr_local.py run` (what `scripts/run.sh` runs) with this interpreter's
Flower, a private FLWR_HOME and free ports, so it neither reuses nor disturbs any other
SuperLink. Afterwards no process this test started may be left: the managed SuperLink outlives
`flwr run` by design, so this is where a cleanup bug shows.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gaisnet_flwr.apps.inprocess import run_inprocess
from tests.conftest import flwr_run_local

pytestmark = [pytest.mark.simulation, pytest.mark.slow]


# 2 rounds of a 2-block model on the CPU (bit-for-bit results are promised on one device type).
TINY = {
    "depth": 2,
    "embed-dim": 32,
    "num-heads": 2,
    "peers-per-cluster": 2,
    "num-rounds": 2,
    "pretrain-epochs": 1,
    "device": "cpu",
}


def tiny(tmp_path: Path, **extra: str) -> str:
    # The 1-epoch cloud foundation goes to tmp, not ~/.cache.
    settings = {
        **{k: json.dumps(v) for k, v in TINY.items()},
        "foundation-dir": json.dumps(str(tmp_path / "foundation")),
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in settings.items())


@pytest.fixture(scope="module")
def flwr_run_result(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    tmp_path = tmp_path_factory.mktemp("flwr-run")
    # As `bash scripts/run.sh --run-config preset.toml --run-config "key=value"` gives them: the
    # tiny model from a preset file, then the foundation folder as an item (flwr run itself
    # refuses a .toml next to key=value items; scripts/flwr_local.py merges them).
    preset = tmp_path / "tiny.toml"
    preset.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items()))
    foundation = f"foundation-dir={json.dumps(str(tmp_path / 'foundation'))}"
    result, out = flwr_run_local(tmp_path, [str(preset), foundation])
    return result, out, tmp_path / "foundation"


def test_flwr_run_completes_and_cleans_up(
    flwr_run_result: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    result, out, _ = flwr_run_result
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "FINAL: central test accuracy" in result.stdout, log[-4000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[1]["train/num-clusters"] == 2
    assert (out / "final_tunable.npz").is_file()
    assert "FINAL:" in (out / "run.log").read_text()  # the stream is teed to the log


def test_in_process_run_gives_the_flwr_run_modules_exactly(
    flwr_run_result: tuple[subprocess.CompletedProcess[str], Path, Path], tmp_path: Path
) -> None:
    # The same app, config and seed in process (no Ray, no SuperLink) must train exactly the
    # modules `flwr run` trained: one round logic, whichever way the Messages travel.
    result, out, foundation = flwr_run_result
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    config = {**TINY, "foundation-dir": str(foundation), "output-dir": str(tmp_path)}
    here = run_inprocess(config, num_clusters=2)  # reuses the run's foundation checkpoint
    with np.load(out / "final_tunable.npz") as real:
        expected = {k: real[k] for k in real.files}
    got = here.modules()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(got[key], value), f"{key} differs from the `flwr run` result"
    real_rows = json.loads((out / "metrics.json").read_text())
    for a, b in zip(real_rows, here.metrics(), strict=True):
        assert a["accuracy"] == b["accuracy"] and a.get("train/train-loss") == b.get(
            "train/train-loss"
        )


def test_a_failed_run_is_reported_as_a_failure(tmp_path: Path) -> None:
    # 1000 SuperNodes on the default config (496 edge images, cluster-samples=0). With
    # --no-check the wrapper leaves it to the ServerApp, which refuses it before asking each
    # node who it is and before any pre-training (issue 29: this was 18,008 lines of ClientApp
    # failures after pre-training). `flwr run --stream` still exits 0, so only the wrapper's
    # checks turn it into a non-zero exit. (Without --no-check the wrapper refuses it before
    # anything starts: tests/test_data_capacity.py.)
    result, out = flwr_run_local(
        tmp_path, "num-rounds=1", num_supernodes=1000, wrapper_args=("--no-check",)
    )
    assert result.returncode != 0
    assert "status is 'finished:failed'" in result.stderr, result.stderr[-2000:]
    # ... and says why in its one line: the ServerApp's own reason, naming the key.
    (line,) = [x for x in result.stderr.splitlines() if "RUN FAILED" in x]
    assert "the ServerApp failed: ConfigError: 1000 client clusters (SuperNodes)" in line, line
    assert "set cluster-samples=K" in line
    log = (out / "run.log").read_text().splitlines()
    assert len(log) < 200, f"{len(log)} lines"  # Flower's start-up, the refusal, its traceback
    assert not any("ClientApp" in x for x in log)  # no node did any work
    # the folder says the run failed, and why
    assert "cluster-samples" in (out / "FAILED.txt").read_text()


def test_flwr_run_with_an_eva_model(tmp_path: Path) -> None:
    # EVA-02 (RoPE attention, SwiGLU) through the whole app on the embedded default: the cloud's
    # pre-training, split-chain rounds whose peers compute the rotary embedding for their own
    # blocks (prompts take no rotary position), aggregation and evaluation.
    model = json.dumps("eva02_tiny_patch14_224")
    result, out = flwr_run_local(tmp_path, tiny(tmp_path, **{"model-name": model}))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "FINAL: central test accuracy" in result.stdout, log[-4000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[1]["train/num-clusters"] == 2 and rows[2]["train/train-loss"] > 0
