"""RunConfig: pyproject's run-config and the dataclass cannot drift; every bad value is refused
with a message that names the run-config key (and the valid choices where there are some)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from gaisnet_flwr.config import DEVICES, OPTIMIZERS, ConfigError, RunConfig
from gaisnet_flwr.data.images import DATASETS, PARTITIONINGS
from gaisnet_flwr.split.plan import PLANNERS
from gaisnet_flwr.vit.model import MODES

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_run_config() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_equals_runconfig_defaults_key_for_key() -> None:
    declared, defaults = pyproject_run_config(), RunConfig().to_dict()
    assert sorted(declared) == sorted(defaults), (
        f"only in pyproject: {sorted(set(declared) - set(defaults))}; "
        f"only in RunConfig: {sorted(set(defaults) - set(declared))}"
    )
    differ = {k: (declared[k], defaults[k]) for k in defaults if declared[k] != defaults[k]}
    assert not differ, f"pyproject value vs RunConfig default: {differ}"
    # ... and what Flower hands the apps from pyproject parses to exactly the defaults.
    assert RunConfig.from_run_config(declared) == RunConfig()


def test_missing_keys_default_and_to_dict_round_trips() -> None:
    assert RunConfig.from_run_config({}) == RunConfig()
    cfg = RunConfig.from_run_config({"num-rounds": 3, "mode": "vpt-shallow", "lr": 0.1})
    assert (cfg.hierarchy.num_rounds, cfg.model.mode, cfg.training.lr) == (3, "vpt-shallow", 0.1)
    assert RunConfig.from_run_config(cfg.to_dict()) == cfg


def test_ints_are_accepted_where_floats_are_wanted() -> None:
    cfg = RunConfig.from_run_config({"lr": 1, "fraction-evaluate": 0, "weight-decay": 0})
    assert (cfg.training.lr, cfg.hierarchy.fraction_evaluate, cfg.training.weight_decay) == (
        1.0,
        0.0,
        0.0,
    )
    assert all(
        isinstance(v, float)
        for v in (cfg.training.lr, cfg.hierarchy.fraction_evaluate, cfg.training.weight_decay)
    )


INVALID = [
    # shape of the input
    ({"num-round": 3}, ["num-round", "num-rounds"]),  # unknown key: lists the valid keys
    ({"num-rounds": "3"}, ["num-rounds", "int", "str"]),
    ({"num-rounds": 3.0}, ["num-rounds", "int", "float"]),
    ({"num-rounds": True}, ["num-rounds", "int", "bool"]),  # bool is an int in Python
    ({"lr": True}, ["lr", "float", "bool"]),
    ({"lr": "0.1"}, ["lr", "float"]),
    # choices: the message lists every valid one
    ({"mode": "vpt"}, ["mode", "'vpt'", *MODES]),
    ({"planner": "fastest"}, ["planner", *PLANNERS]),
    ({"optimizer": "adam"}, ["optimizer", *OPTIMIZERS]),
    ({"dataset": "cifar10"}, ["dataset", *DATASETS]),
    ({"partitioning": "shards"}, ["partitioning", *PARTITIONINGS]),
    ({"device": "gpu"}, ["device", *DEVICES]),
    # ranges and relations
    ({"depth": 0}, ["depth", ">= 1"]),
    ({"num-rounds": 0}, ["num-rounds"]),
    ({"batch-size": -1}, ["batch-size"]),
    ({"num-prompts": -1}, ["num-prompts"]),
    ({"mode": "linear"}, ["num-prompts"]),  # linear trains no prompts: num-prompts=0
    ({"peers-per-cluster": 4, "depth": 3}, ["peers-per-cluster", "depth"]),
    ({"peer-speeds": "1,2"}, ["peer-speeds", "3"]),  # 3 peers by default
    ({"peer-speeds": "1,fast,2"}, ["peer-speeds"]),
    ({"peer-speeds": "1,0,2"}, ["peer-speeds", "positive"]),
    ({"lr": 0}, ["lr", "> 0"]),
    ({"lr": -0.1}, ["lr", "> 0"]),
    ({"momentum": 1.0}, ["momentum"]),
    ({"fraction-evaluate": 1.5}, ["fraction-evaluate", "[0, 1]"]),
    ({"fraction-evaluate": -0.1}, ["fraction-evaluate", "[0, 1]"]),
    ({"strategy-options": "proximal_mu="}, ["strategy-options"]),
    ({"strategy-options": "mu 0.1"}, ["strategy-options"]),
]


@pytest.mark.parametrize("overrides, must_mention", INVALID, ids=[repr(o) for o, _ in INVALID])
def test_invalid_values_raise_config_error_naming_the_key(
    overrides: dict[str, Any], must_mention: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(overrides)
    for text in must_mention:
        assert text in str(err.value), f"{text!r} missing from: {err.value}"


def test_imagefolder_without_its_data_dir_is_refused(tmp_path: Path) -> None:
    # foundation="none": the cloud foundation is pre-trained on digits only.
    base = {"dataset": "imagefolder", "foundation": "none"}
    (tmp_path / "empty").mkdir()
    for data_dir, reason in (
        ("", "required"),
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path / "empty"), "is empty"),
    ):
        with pytest.raises(ConfigError) as err:
            RunConfig.from_run_config({**base, "data-dir": data_dir})
        assert "data_dir" in str(err.value) or "data-dir" in str(err.value), str(err.value)
        assert reason in str(err.value) and data_dir in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"dataset": "imagefolder", "foundation": "none", "data-dir": "/no/such/dir"}, "data-dir"),
        ({"val-fraction": 1.0}, "val-fraction"),
        ({"partitioning": "dirichlet", "dirichlet-alpha": 0}, "dirichlet-alpha"),
    ],
)
def test_data_errors_name_the_run_config_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_run_config(overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="device='cuda'"):
        RunConfig.from_run_config({"device": "cuda"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d2d-link": "wifi"}, "unknown link profile 'wifi'; valid: backhaul-1gbps"),
        ({"peer-devices": "phone-x"}, "unknown device profile 'phone-x'; valid: edge-server"),
        ({"peer-devices": ""}, "peer-devices names no device profile"),
        ({"uplink": "d2d-50m"}, "uplink"),
    ],
)
def test_cost_model_errors_fail_before_the_run(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("cost model: ") + ".*" + re.escape(message)):
        RunConfig.from_run_config(overrides)


def test_negative_bandwidth_in_a_profiles_file_fails_before_the_run(tmp_path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        '[links.bad]\nkind = "d2d"\nbandwidth_hz = -1e6\ndistance_m = 50\ntx_power_w = 0.2\n'
    )
    with pytest.raises(ConfigError, match="cost model: .*bad.*bandwidth_hz must be > 0"):
        RunConfig.from_run_config({"cost-profiles": str(path), "d2d-link": "bad"})


def test_backhaul_must_be_an_edge_cloud_link() -> None:
    with pytest.raises(ConfigError, match="backhaul-link 'd2d-50m' is a d2d link"):
        RunConfig.from_run_config({"backhaul-link": "d2d-50m"})
