"""What `scripts/run.sh` and `flwr_local.py run` do with `--run-config` before anything starts:
presets and key=value items merged in order, unknown keys named with their close matches and
invalid values refused, with no SuperLink, Ray or model started; and what keeps a plain
`flwr run .` from building a second environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from gaisnet_flwr.experiments import flwr_local

REPO = Path(__file__).resolve().parents[1]


def refused(tmp_path: Path, *run_config: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`flwr_local.py run` with these --run-config values, on a private FLWR_HOME and ports."""
    ports = flwr_local.free_ports(2)
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
        "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
    }
    args = [a for value in run_config for a in ("--run-config", value)]
    cmd = [sys.executable, str(REPO / "scripts" / "flwr_local.py"), "run", "--app", str(REPO)]
    cmd += ["--output-dir", str(tmp_path / "out"), "--", *args]
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout[-2000:]
    assert not (tmp_path / "home" / "local-superlink").exists(), "a SuperLink was started"
    assert "flwr run" not in result.stdout  # nothing was launched
    return result, elapsed


def test_a_misspelt_key_is_named_with_its_close_match_before_anything_starts(
    tmp_path: Path,
) -> None:
    result, elapsed = refused(tmp_path, "num-round=2")
    assert "unknown run-config key 'num-round' (did you mean 'num-rounds'" in result.stderr
    assert "valid run-config keys: " in result.stderr
    # The key check reads pyproject.toml only (no torch): the acceptance bound is 10 s.
    assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_an_invalid_value_is_refused_before_anything_starts(tmp_path: Path) -> None:
    # The strategy is resolved by the ServerApp's own first check
    # (apps.server_app.check_run_config).
    result, _ = refused(tmp_path, "conf/same-classes.toml", "strategy='fedavgg'")
    assert "strategy='fedavgg'" in result.stderr and "module-fedavg" in result.stderr


def test_unreadable_run_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(flwr_local.RunConfigError, match="cannot read run-config file"):
        flwr_local.read_run_config([str(tmp_path / "missing.toml")])
    with pytest.raises(flwr_local.RunConfigError, match="give key=value items"):
        flwr_local.read_run_config(["num-rounds 2"])
    with pytest.raises(flwr_local.RunConfigError, match="strings need quotes"):
        flwr_local.read_run_config(["strategy=fedavg"])
    nested = tmp_path / "nested.toml"
    nested.write_text("[tool]\nlr = 0.1\n")
    with pytest.raises(flwr_local.RunConfigError, match="flat key = value"):
        flwr_local.read_run_config([str(nested)])
    with pytest.raises(flwr_local.RunConfigError, match="needs a value"):
        flwr_local.split_run_config(["--stream", "--run-config"])


def test_presets_and_items_merge_in_order_later_ones_winning() -> None:
    values, rest = flwr_local.split_run_config(
        [
            "--run-config",
            "conf/same-classes.toml",
            "--stream",
            "-c",
            "num-rounds=2 lr=0.1",
            "--run-config=mode='linear' num-prompts=0",
        ]  # fmt: skip
    )
    assert rest == ["--stream"]
    with (REPO / "conf" / "same-classes.toml").open("rb") as f:
        preset = tomllib.load(f)
    merged = flwr_local.read_run_config([str(REPO / values[0]), *values[1:]])
    assert merged == {**preset, "num-rounds": 2, "lr": 0.1, "mode": "linear", "num-prompts": 0}
    # ... and what `flwr run` is handed reads back the same (one TOML file).
    assert flwr_local.read_run_config(["x='a \"b\" c' y=1e-05"]) == {"x": 'a "b" c', "y": 1e-05}


def test_the_run_config_file_for_flwr_run_reads_back_exactly(tmp_path: Path) -> None:
    overrides = {"output-dir": str(tmp_path / "o 'x\""), "lr": 1e-05, "num-rounds": 2, "a": True}
    path = flwr_local.write_run_config(overrides, tmp_path)
    assert flwr_local.read_run_config([str(path)]) == overrides


def test_plain_flwr_run_builds_no_second_environment() -> None:
    # Flower's runtime `uv sync` installs [project].dependencies (and resolves the extras) into
    # a fresh environment; [tool.uv] exclude-dependencies must name every one of them, so it
    # makes an empty one, offline, instead of a second torch.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = config["project"]
    requirements = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += extra
    names = {re.split(r"[\s\[<>=!~;@]", r, maxsplit=1)[0].lower() for r in requirements}
    assert names == set(config["tool"]["uv"]["exclude-dependencies"])
