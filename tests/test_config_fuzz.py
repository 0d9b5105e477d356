"""Property-based fuzzing of the run-config (issue 17, "Hardening").

`test_every_generated_run_config_is_refused_by_key_or_accepted`: Hypothesis changes 1-4 keys of
the default run-config at a time (wrong types, nan / inf, zero, negative, huge and boundary
numbers, valid and invalid names, paths to nothing, to a folder, to a file, malformed TOML) and
puts each through the ServerApp's boundary (`apps/server_app.py: check_run_config`: every key, the
environment, the model on the meta device, the strategy built once). Every case must end in a
`ConfigError` whose message names one of the keys it changed, or be accepted; any other
exception (a traceback from torch, timm, numpy or Flower) fails the test. 500 cases, derandomised
(the same cases every run).

`test_accepted_random_configs_train_to_finite_values`: a few accepted random configs at tiny
shapes, each run for real in process (`run_inprocess`, 2 clusters, 1 round): every metric and
every module finite, no cluster failed.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.server_app import check_run_config
from gaisnet_flwr.config import DEVICES, EDGE_OFFLOAD, TIERS, ConfigError, RunConfig
from gaisnet_flwr.costs.profiles import DEVICE_PRESETS, LINK_PRESETS
from gaisnet_flwr.data.images import DATASETS, DOMAINS, EDGE_TASKS, PARTITIONINGS
from gaisnet_flwr.service.scheduler import POLICIES
from gaisnet_flwr.split.chain import OPTIMIZERS
from gaisnet_flwr.split.plan import PLANNERS
from gaisnet_flwr.split.precision import PRECISIONS, SMASHED_DTYPES
from gaisnet_flwr.vit.model import MODES
from strategies.registry import STRATEGIES

DEFAULTS = RunConfig().to_dict()
EXAMPLE_POPULATION = Path(__file__).resolve().parents[1] / "conf" / "population-example.toml"
FUZZED_KEYS = sorted(k for k in DEFAULTS if k != "mlflow-tracking-uri")  # checked by Tracking
CASES = 500
NAN, INF = math.nan, math.inf

WRONG_TYPES = st.one_of(st.booleans(), st.text(max_size=6), st.none())
INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, 48, 49, 64, 1024, 1025, 4096, 10**4, 10**6]),
    st.sampled_from([2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63)]),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-6, 0.1, 0.5, 0.9, 1.0, 10.0, 10.5, -1.0, NAN, INF, -INF, 1e308]),
    st.integers(-5, 10**20),
)
NUMBER_TEXT = st.sampled_from(["1", "2", "0", "-1", "nan", "inf", "1e400", "0.5", "x", " "])
NUMBER_LISTS = st.lists(NUMBER_TEXT, min_size=0, max_size=4).map(",".join)


def choices(*valid: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(valid), st.text(max_size=8))


def names(presets: Any) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([*presets, "nope", ""]), st.text(max_size=6))


def string_values(files: dict[str, str]) -> dict[str, st.SearchStrategy[str]]:
    paths = st.sampled_from(["", files["missing"], files["folder"], files["file"], files["under"]])
    return {
        "model-name": st.sampled_from(
            [
                "vit_tiny_patch16_224",
                "deit_tiny_patch16_224",
                "deit_tiny_distilled_patch16_224",
                "vit_small_patch16_224",
                "resnet18",
                "vit_nope",
                "",
                "vit_base_patch16_rope_224",
            ]
        ),  # fmt: skip
        "mode": choices(*MODES),
        "foundation": choices("cloud", "timm", "file", "none"),
        "checkpoint-path": paths,
        "foundation-dir": paths,
        "edge-dir": paths,
        "tier": choices(*TIERS),
        "output-dir": paths,
        "data-dir": paths,
        "peer-speeds": NUMBER_LISTS,
        "edge-shares": NUMBER_LISTS,
        "demand": NUMBER_LISTS,
        "planner": choices(*PLANNERS),
        "edge-offload": choices(*EDGE_OFFLOAD),
        "population": st.one_of(
            st.sampled_from(
                [
                    "",
                    "generated:60:0",
                    "generated:12:3",
                    "generated:2:0",
                    "generated:x:1",
                    "cells.txt",
                    files["missing"] + ".toml",
                    files["file"],
                    str(EXAMPLE_POPULATION),
                    str(EXAMPLE_POPULATION.with_suffix(".csv")),
                ]
            ),
            st.text(max_size=8),
        ),
        "optimizer": choices(*OPTIMIZERS),
        "dataset": choices(*DATASETS),
        "partitioning": choices(*PARTITIONINGS),
        "edge-task": choices(*EDGE_TASKS),
        "cost-profiles": st.sampled_from(
            [
                "",
                files["missing"],
                files["folder"],
                files["malformed"],
                files["binary"],
                files["profiles"],
                files["bad-profiles"],
            ]
        ),  # fmt: skip
        "start-device": names(DEVICE_PRESETS),
        "end-device": names(DEVICE_PRESETS),
        "edge-device": names(DEVICE_PRESETS),
        "peer-devices": st.lists(names(DEVICE_PRESETS), max_size=3).map(",".join),
        "d2d-link": names(LINK_PRESETS),
        "uplink": names(LINK_PRESETS),
        "backhaul-link": names(LINK_PRESETS),
        "distribution": choices("efficient", "full"),
        "service": choices("fine-tuning", "integrated"),
        "policy": choices(*POLICIES),
        "edge-domains": st.lists(choices(*DOMAINS), min_size=0, max_size=3).map(",".join),
        "cloud-modules": choices("prompts", "all"),
        "strategy": st.one_of(
            st.sampled_from(
                [
                    *STRATEGIES,
                    "nope",
                    "",
                    "os:path",
                    "no.such.module:X",
                    "strategies.module_fedavg:ModuleFedAvg",
                    "strategies.registry:x",
                ]
            ),
            st.text(max_size=8),
        ),  # fmt: skip
        "strategy-options": st.sampled_from(
            [
                "",
                "proximal_mu=0.1",
                "proximal_mu=nan",
                "proximal_mu=inf",
                "proximal_mu=-1",
                "bogus=1",
                "eta=",
                "x=[1,2]",
                "a.b=1",
                "client_learning_rate=0.1",
                "eta=0.01",
                "num_malicious_nodes=1",
                "beta=0.2",
                "server_learning_rate='x'",
            ]
        ),  # fmt: skip
        "device": choices(*DEVICES),
        "precision": choices(*PRECISIONS),
        "smashed-dtype": choices(*SMASHED_DTYPES),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "folder").mkdir()
    (root / "file").write_text("a file, not a folder")
    (root / "malformed.toml").write_text("[devices.x\nclock_hz = ")
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00[devices]")
    (root / "profiles.toml").write_text("[devices.phone-mid]\nclock_hz = 1.5e9\n")
    (root / "bad-profiles.toml").write_text("[devices.phone-mid]\nclock_hz = nan\n")
    return {
        "missing": str(root / "missing"),
        "folder": str(root / "folder"),
        "file": str(root / "file"),
        "under": str(root / "file" / "below"),
        "malformed": str(root / "malformed.toml"),
        "binary": str(root / "binary.toml"),
        "profiles": str(root / "profiles.toml"),
        "bad-profiles": str(root / "bad-profiles.toml"),
    }


def value_for(key: str, strings: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[Any]:
    default = DEFAULTS[key]
    if isinstance(default, bool):
        typed: st.SearchStrategy[Any] = st.booleans()
    elif isinstance(default, int):
        typed = st.one_of(st.integers(1, 8), INTS)  # often plausible, often not
    elif isinstance(default, float):
        typed = st.one_of(st.floats(0.01, 0.99), FLOATS)
    else:
        typed = strings[key]
    return st.one_of(typed, typed, typed, WRONG_TYPES)  # mostly the right type


@st.composite
def run_configs(draw: st.DrawFn, strings: dict[str, st.SearchStrategy[str]]) -> dict[str, Any]:
    size = draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))
    keys = draw(st.lists(st.sampled_from(FUZZED_KEYS), min_size=size, max_size=size, unique=True))
    changed = {key: draw(value_for(key, strings)) for key in keys}
    if draw(st.integers(0, 19)) == 0:
        changed[draw(st.sampled_from(["num-round", "lr_", "seed ", "", "x"]))] = 1
    return changed


def test_every_generated_run_config_is_refused_by_key_or_accepted(files: dict[str, str]) -> None:
    strings = string_values(files)
    outcomes: dict[str, int] = {"accepted": 0, "refused": 0}

    @settings(
        max_examples=CASES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(run_configs(strings))
    def check(changed: dict[str, Any]) -> None:
        try:
            check_run_config(changed)
        except ConfigError as err:
            message = str(err)
            named = [k for k in changed if k and k.strip() in message]
            assert named, f"{changed}: the refusal names none of the keys: {message}"
            outcomes["refused"] += 1
        else:
            outcomes["accepted"] += 1

    started = time.perf_counter()
    check()
    elapsed = time.perf_counter() - started
    total = outcomes["accepted"] + outcomes["refused"]
    print(f"\n{total} run-configs in {elapsed:.1f} s: {outcomes}")
    assert total >= CASES
    assert outcomes["accepted"] >= CASES // 10 and outcomes["refused"] >= CASES // 2, outcomes


# -- accepted random configs train ----------------------------------------------------------------
@st.composite
def tiny_run_configs(draw: st.DrawFn) -> dict[str, Any]:
    depth = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([1, 2, 4]))
    mode = draw(st.sampled_from(MODES))
    prompts = 0 if mode in ("linear", "full") else draw(st.integers(0, 4))
    optimizer = draw(st.sampled_from(OPTIMIZERS))
    strategy = draw(st.sampled_from(["module-fedavg", "fedavg", "fedprox", "fedavgm"]))
    partitioning = draw(st.sampled_from(PARTITIONINGS))
    return {
        "model-name": draw(st.sampled_from(["vit_tiny_patch16_224", "deit_tiny_patch16_224"])),
        "img-size": 16,
        "patch-size": draw(st.sampled_from([4, 8, 16])),
        "depth": depth,
        "embed-dim": heads * draw(st.sampled_from([4, 8])),
        "num-heads": heads,
        "mode": mode,
        "num-prompts": prompts,
        "foundation": draw(st.sampled_from(["none", "cloud"])),
        "pretrain-epochs": 0,
        "peers-per-cluster": draw(st.integers(1, depth)),
        "planner": draw(st.sampled_from(PLANNERS)),
        "optimizer": optimizer,
        "lr": draw(st.floats(1e-4, 0.2)),
        "momentum": draw(st.floats(0.0, 0.9)),
        "weight-decay": draw(st.floats(0.0, 0.1)),
        "batch-size": draw(st.integers(16, 256)),
        "partitioning": partitioning,
        "classes-per-cluster": draw(st.integers(3, 5)),  # of the default 5 edge classes
        "dirichlet-alpha": draw(st.floats(0.5, 100.0)),
        "val-fraction": draw(st.floats(0.05, 0.5)),
        "edge-domains": draw(st.sampled_from(["none", "none,invert"])),
        "cloud-every": draw(st.integers(0, 2)),
        "cloud-mix": draw(st.floats(0.0, 1.0)),
        "strategy": strategy,
        "strategy-options": f"proximal_mu={draw(st.floats(0.0, 1.0))}"
        if strategy == "fedprox"
        else "",
        "fraction-evaluate": draw(st.floats(0.0, 1.0)),
        "inference-requests": draw(st.integers(0, 1)),
        "seed": draw(st.sampled_from([0, 7, 2**32 - 1])),
        "num-rounds": 1,
        "device": "cpu",
    }


def test_accepted_random_configs_train_to_finite_values() -> None:
    trained: list[dict[str, Any]] = []

    @settings(
        max_examples=6,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(tiny_run_configs())
    def train(config: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            config = {**config, "output-dir": f"{tmp}/out", "foundation-dir": f"{tmp}/fm"}
            check_run_config(config)  # accepted: these are all within the bounds
            run = run_inprocess(config, num_clusters=2)
            rows = run.metrics()
            for row in rows:
                numbers = {k: v for k, v in row.items() if isinstance(v, float)}
                assert all(math.isfinite(v) for v in numbers.values()), (config, row)
            assert rows[-1]["failed-clusters"] == 0, (config, rows[-1]["failures"])
            assert all(np.isfinite(v).all() for v in run.modules().values()), config
            trained.append(config)
            assert Path(tmp, "out", "final_tunable.npz").is_file()

    train()
    assert len(trained) >= 5
