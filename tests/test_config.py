"""RunConfig: pyproject's run-config and the dataclass cannot drift; every bad value is refused
with a message that names the run-config key (and the valid choices where there are some): the
plain values by `RunConfig.from_run_config`, what needs the environment by the ServerApp's
boundary (`check_run_config`: `derived.derive` and the strategy)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from gaisnet_flwr.apps.server_app import check_run_config
from gaisnet_flwr.config import (
    DATASETS,
    DEVICES,
    MODES,
    OPTIMIZERS,
    PARTITIONINGS,
    PLANNERS,
    ConfigError,
    RunConfig,
    key_table,
    parse_overrides,
)

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


def test_importing_the_config_loads_neither_torch_nor_timm() -> None:
    script = (
        "import sys, gaisnet_flwr.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'flwr', "
        "'numpy')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout


KEYS_START = "<!-- the keys: generated from gaisnet_flwr/config.py (config.key_table) -->"
KEYS_END = "<!-- end of the keys -->"


def test_the_docs_key_table_is_the_one_the_config_declares() -> None:
    """Each key's default, bounds and doc are declared once (config.py); docs/configure.md
    holds the table made from them."""
    text = (PYPROJECT.parent / "docs" / "configure.md").read_text()
    assert KEYS_START in text and KEYS_END in text
    table = text.split(KEYS_START)[1].split(KEYS_END)[0].strip()
    assert table == key_table(), f"docs/configure.md should hold:\n{key_table()}"


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
    # unknown key: the close match first, then every valid key
    ({"num-round": 3}, ["'num-round' (did you mean 'num-rounds'", "valid run-config keys: "]),
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
    ({"central-eval-every": 0}, ["central-eval-every", ">= 1"]),
    (
        {"central-eval-every": 2, "service": "integrated", "demand": "0,0"},
        ["central-eval-every=2", "service='finetune'", "central-eval-every=1"],
    ),
    (
        {"resume": True, "service": "integrated", "demand": "0,0"},
        ["resume=true", "service='finetune'", "resume=false"],
    ),
    ({"strategy-options": "proximal_mu="}, ["strategy-options"]),
    ({"strategy-options": "mu 0.1"}, ["strategy-options"]),
]


@pytest.mark.parametrize("overrides, must_mention", INVALID, ids=[repr(o) for o, _ in INVALID])
def test_invalid_values_raise_config_error_naming_the_key(
    overrides: dict[str, Any], must_mention: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        check_run_config(overrides)
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
            check_run_config({**base, "data-dir": data_dir})
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
        check_run_config(overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="device='cuda'"):
        check_run_config({"device": "cuda"})


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
        check_run_config(overrides)


def test_negative_bandwidth_in_a_profiles_file_fails_before_the_run(tmp_path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        '[links.bad]\nkind = "d2d"\nbandwidth_hz = -1e6\ndistance_m = 50\ntx_power_w = 0.2\n'
    )
    with pytest.raises(ConfigError, match="cost model: .*bad.*bandwidth_hz must be > 0"):
        check_run_config({"cost-profiles": str(path), "d2d-link": "bad"})


def test_backhaul_must_be_an_edge_cloud_link() -> None:
    with pytest.raises(ConfigError, match="backhaul-link 'd2d-50m' is a d2d link"):
        check_run_config({"backhaul-link": "d2d-50m"})


# Issue 17 ("Hardening"): every value it found accepted, or refused without naming the key, is
# refused at the boundary with a message that names the key, the value and what is valid.
ISSUE_17 = [
    ({"patch-size": 0}, "patch-size=0 is out of range: must be >= 1 and <= img-size=32"),
    ({"patch-size": 64}, "patch-size=64 is out of range: must be >= 1 and <= img-size=32"),
    ({"patch-size": 5}, "patch-size=5 must divide img-size=32 (the image is cut into"),
    ({"num-heads": 5}, "num-heads=5 must divide embed-dim=64 (each head gets embed-dim / "),
    ({"embed-dim": 63}, "num-heads=4 must divide embed-dim=63 (each head gets"),
    ({"seed": -1}, "seed=-1 is out of range: must be >= 0 and <= 4294967295"),
    (
        {"seed": 2**63 - 1},
        "seed=9223372036854775807 is out of range: must be >= 0 and <= 4294967295",
    ),
    ({"weight-decay": -1.0}, "weight-decay=-1.0 is not valid: must be a finite number in [0, 1]"),
    ({"model-name": "vit_nope"}, "model-name='vit_nope' is not a timm model; valid: a timm ViT"),
    ({"model-name": "resnet18"}, "model-name='resnet18' is a ResNet, not a ViT PromptedViT runs"),
    ({"model-name": ""}, "model-name='' is not valid: name a timm ViT"),
    (
        {"peer-speeds": "nan,1,1"},
        "peer-speeds='nan,1,1': nan is not a finite number > 0; must list 3 finite positive",
    ),
    (
        {"edge-shares": "nan,1", "edge-domains": "none,invert"},
        "edge-shares='nan,1': nan is not a finite number > 0; must list 2 finite positive",
    ),
    ({"depth": 10**6}, "depth=1000000 is out of range: must be >= 1 and <= 48"),
    ({"img-size": 10**9}, "img-size=1000000000 is out of range: must be >= 1 and <= 1024"),
    ({"embed-dim": 10**9}, "embed-dim=1000000000 is out of range: must be >= 1 and <= 4096"),
    ({"num-prompts": 10**9}, "num-prompts=1000000000 is out of range: must be >= 0 and <= 1024"),
    (
        {"img-size": 1024, "patch-size": 8},
        "img-size=1024 with patch-size=8 makes 16384 patches; at most 4096",
    ),
    (
        {"depth": 48, "embed-dim": 4096, "num-heads": 64},
        "with depth=48, embed-dim=4096 has 9.67e+09 parameters; at most 1e+09",
    ),
    (
        {"partitioning": "classes", "classes-per-cluster": 11},
        "classes-per-cluster=11 is out of range: dataset='digits' has 5 classes; must be >= 1 "
        "and <= 5",
    ),
    ({"classes-per-cluster": 0}, "classes-per-cluster=0 is out of range: must be >= 1"),
    (
        {"dirichlet-alpha": math.inf},
        "dirichlet-alpha=inf is not valid: must be a finite number > 0 and <= 1e+06",
    ),
    ({"lr": math.nan}, "lr=nan is not valid: must be a finite number > 0 and <= 10"),
    ({"lr": math.inf}, "lr=inf is not valid: must be a finite number > 0 and <= 10"),
    (
        {"weight-decay": math.nan},
        "weight-decay=nan is not valid: must be a finite number in [0, 1]",
    ),
    (
        {"weight-decay": math.inf},
        "weight-decay=inf is not valid: must be a finite number in [0, 1]",
    ),
    ({"momentum": math.nan}, "momentum=nan is not valid: must be a finite number >= 0 and < 1"),
    ({"pretrain-lr": math.inf}, "pretrain-lr=inf is not valid: must be a finite number > 0 and"),
    ({"service-value": math.nan}, "service-value=nan is not valid: must be a finite number >= 0"),
    ({"finetune-cost": math.inf}, "finetune-cost=inf is not valid: must be a finite number >= 0"),
    ({"energy-price": -math.inf}, "energy-price=-inf is not valid: must be a finite number >= 0"),
    ({"cloud-mix": math.nan}, "cloud-mix=nan is not valid: must be a finite number in [0, 1]"),
    ({"val-fraction": math.nan}, "val-fraction=nan must be in the open interval (0, 1)"),
    (
        {"strategy-options": "proximal_mu=nan"},
        "strategy-options='proximal_mu=nan': proximal_mu=nan is not valid: an option value must "
        "be a finite number",
    ),
    (
        {"strategy-options": "proximal_mu=inf"},
        "strategy-options='proximal_mu=inf': proximal_mu=inf is not valid",
    ),
    (
        {"start-device": "nope"},
        "start-device='nope': unknown device profile 'nope'; valid: edge-server, phone-high",
    ),
    ({"end-device": "nope"}, "end-device='nope': unknown device profile 'nope'; valid:"),
    (
        {"peer-devices": "phone-mid,nope"},
        "peer-devices='phone-mid,nope': unknown device profile 'nope'; valid:",
    ),
    ({"edge-device": "nope"}, "edge-device='nope': unknown device profile 'nope'; valid:"),
    ({"d2d-link": "nope"}, "d2d-link='nope': unknown link profile 'nope'; valid: backhaul-1gbps"),
    ({"uplink": "nope"}, "uplink='nope': unknown link profile 'nope'; valid:"),
    ({"backhaul-link": "nope"}, "backhaul-link='nope': unknown link profile 'nope'; valid:"),
    ({"fraction-evaluate": math.nan}, "fraction-evaluate=nan is not valid: must be a finite"),
    ({"num-rounds": 10**6}, "num-rounds=1000000 is out of range: must be >= 1 and <= 10000"),
    ({"batch-size": 10**6}, "batch-size=1000000 is out of range: must be >= 1 and <= 4096"),
    ({"local-epochs": 10**6}, "local-epochs=1000000 is out of range: must be >= 1 and <= 1000"),
    ({"lr": 10**400}, "lr=" + str(10**400)[:10]),  # too large for a float, still named
    (
        {"d2d-link": "uplink-1mhz"},
        "d2d-link='uplink-1mhz' is a client-edge link; it must be a d2d link (valid: d2d-50m",
    ),
    ({"foundation-dir": "a\x00b"}, "foundation-dir='a\\x00b' is not valid: it contains a NUL"),
]


@pytest.mark.parametrize("overrides, message", ISSUE_17, ids=[repr(o)[:60] for o, _ in ISSUE_17])
def test_issue_17_values_are_refused_naming_key_value_and_what_is_valid(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_run_config(overrides)
    assert message in str(err.value)


def test_issue_17_files_are_refused_naming_the_key(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    malformed = tmp_path / "malformed.toml"
    malformed.write_text("[devices.x\nclock_hz = ")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[devices]")
    cases = [
        ({"cost-profiles": str(tmp_path / "missing.toml")}, "cost-profiles='", "no such file"),
        ({"cost-profiles": str(tmp_path)}, "cost-profiles='", "is not a file"),
        ({"cost-profiles": str(malformed)}, "cost-profiles='", "is not valid TOML"),
        ({"cost-profiles": str(binary)}, "cost-profiles='", "is not valid TOML"),
        ({"foundation-dir": str(a_file)}, "foundation-dir='", "is a file, not a folder"),
        ({"foundation-dir": str(a_file / "sub")}, "foundation-dir='", "is a file, not a folder"),
        ({"output-dir": str(a_file)}, "output-dir='", "is a file, not a folder"),
    ]
    for overrides, key, reason in cases:
        with pytest.raises(ConfigError) as err:
            check_run_config(overrides)
        assert key in str(err.value) and reason in str(err.value), str(err.value)
        assert next(iter(overrides.values())) in str(err.value)


def test_the_largest_accepted_shapes_build_on_the_meta_device_in_seconds() -> None:
    import time

    started = time.perf_counter()
    check_run_config(
        {"depth": 48, "embed-dim": 1024, "num-heads": 16, "img-size": 1024, "patch-size": 16,
         "num-prompts": 1024, "peers-per-cluster": 48}
    )  # fmt: skip
    assert time.perf_counter() - started < 10


def test_script_run_config_takes_items_or_a_toml_file_and_refuses_anything_else(
    tmp_path: Path,
) -> None:
    preset = tmp_path / "preset.toml"
    preset.write_text("edge-task = 'same-classes'\nshots = 0\n")
    assert parse_overrides(str(preset)) == {"edge-task": "same-classes", "shots": 0}
    assert parse_overrides("num-rounds=3 mode='vpt-shallow'") == {
        "num-rounds": 3,
        "mode": "vpt-shallow",
    }
    with pytest.raises(ConfigError, match="cannot read run-config file"):
        parse_overrides(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="cannot read 'oops'"):
        parse_overrides("num-rounds=3 oops")
