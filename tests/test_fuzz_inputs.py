"""Seeded fuzzers for what a user brings (issue 29, Build 6): checkpoint bytes, population CSVs,
strategy options and the run-config's data sizes. (Peer calls are fuzzed in
tests/test_peer_contract.py.)

Each generator starts from valid files and breaks them the ways files break (truncated,
flipped bytes, junk, the wrong container, wrong or non-finite tensors; for CSVs other
delimiters, a BOM, duplicate, unknown and missing columns, ragged rows, odd cells). Every case
must end in one of two ways:

  * refused with the project's own error type (`CheckpointFileError` / `CheckpointError` /
    `PopulationError`) whose message names the file, and where the case carries a known defect
    the message names that defect;
  * accepted, and then everything accepted is usable: every tensor finite, float32 and shaped
    as the model's (nothing non-finite would be trained on), every device's position finite.

For strategy options and data sizes the refusal is a `ConfigError` naming the run-config key
(and the option a case knowingly broke); what is accepted must then work: a strategy runs a
round over that many clusters (no wait for clusters that do not exist, no value a ClientApp
cannot read, a finite aggregate), and every cluster the ClientApps will form holds an image to
train on (and, with federated evaluation, some cluster one to validate on).

Any other exception (an AttributeError, IndexError, EOFError, a library's bare message) fails.
The cases are fixed by the seed, so the time is bounded by their number; each fuzzer prints it
(`pytest -s -m fuzz`) and asserts a generous ceiling.
"""

from __future__ import annotations

import inspect
import io
import math
import pickle
import random
import struct
import time
import types
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from unittest.mock import Mock

import numpy as np
import pytest
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from clients.split_client import ClusterData, EdgeDataKey
from gaisnet_flwr.apps.server_app import build_edge_strategy, edge_strategy
from gaisnet_flwr.cloud.foundation import CheckpointError, read_checkpoint, save_checkpoint
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.contract import TrainRequest
from gaisnet_flwr.costs.profiles import load_profiles
from gaisnet_flwr.data.images import partition_indices
from gaisnet_flwr.derived import derive
from gaisnet_flwr.population.devices import KEYS, Population, PopulationError, load_population
from gaisnet_flwr.training.loops import build_model
from gaisnet_flwr.vit.checkpoint import CheckpointFileError, read_weights_file
from strategies.edge import EdgeServer
from strategies.options import FLOWER_OPTIONS, domain
from strategies.registry import STRATEGIES, resolve_strategy
from tests.conftest import make_reply, make_task

pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("one_thread")]

TINY: dict[str, Any] = {
    "depth": 2, "embed-dim": 32, "num-heads": 2, "img-size": 16, "patch-size": 8,
    "peers-per-cluster": 1, "device": "cpu",
}  # fmt: skip
CHECKPOINT_CASES = 1000
CSV_CASES = 2000
CEILING_S = 60.0  # each fuzzer; measured far below (module docstring of the report)


# -- checkpoint bytes ----------------------------------------------------------------------------
def reference_state() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    cfg = RunConfig.from_run_config(TINY)
    state = build_model(cfg.model, cfg.cloud, 5, 0).backbone.state_dict()
    return state, derive(cfg).meta.backbone


def to_bytes(save: Callable[[Any, io.BytesIO], None], obj: Any) -> bytes:
    buffer = io.BytesIO()
    save(obj, buffer)
    return buffer.getvalue()


class CheckpointFuzzer:
    """Seeded: a valid file in one of four containers, then one to three breakages."""

    def __init__(self, seed: int, state: dict[str, torch.Tensor]) -> None:
        self.rng = random.Random(seed)
        self.state = state

    def tensor(self, like: torch.Tensor) -> Any:
        r = self.rng
        kind = r.randrange(9)
        if kind == 0:  # a NaN or an infinity somewhere
            t = like.clone()
            t.view(-1)[r.randrange(t.numel())] = r.choice([math.nan, math.inf, -math.inf])
            return t
        if kind == 1:
            return like.to(r.choice([torch.float64, torch.int64, torch.bool, torch.uint8]))
        if kind == 2:
            return like.to(r.choice([torch.float16, torch.bfloat16]))  # convertible
        if kind == 3:
            return like.reshape(-1)[: max(1, like.numel() // 2)].clone()  # wrong shape
        if kind == 4:
            return r.choice([None, 3, "w", [1.0, 2.0], {"a": 1}, (1, 2)])  # not a tensor
        if kind == 5:
            return like.double() * 1e300  # float64 beyond float32
        if kind == 6:
            return torch.zeros(0)
        return like.clone()

    def state_dict(self) -> Any:
        r = self.rng
        state: dict[Any, Any] = {k: v.clone() for k, v in self.state.items()}
        for _ in range(r.randrange(3)):
            key = r.choice(sorted(self.state))
            action = r.randrange(5)
            if action == 0:
                state.pop(key, None)
            elif action == 1:
                state[f"extra.{r.randrange(99)}"] = torch.zeros(2)
            elif action == 2:
                state[r.choice([1, ("a",), None])] = torch.zeros(1)  # not a name
            else:
                state[key] = self.tensor(self.state[key])
        wrap = r.randrange(8)
        if wrap == 0:
            return {"state_dict": state, "epoch": 3}
        if wrap == 1:
            return {f"module.{k}": v for k, v in state.items() if isinstance(k, str)}
        if wrap == 2:
            return r.choice([list(state.values()), tuple(state), "weights", 7, None, {}])
        return state

    def container(self, obj: Any) -> tuple[str, bytes]:
        r = self.rng
        kind = r.randrange(5)
        try:
            if kind == 0 and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) and v.numel()
                for k, v in (obj.items() if isinstance(obj, dict) else [(0, 0)])
            ):
                return "safetensors", safetensors.torch.save(obj)
            if kind == 1 and isinstance(obj, dict):
                arrays = {str(k): np.asarray(v) for k, v in obj.items()
                          if isinstance(v, torch.Tensor) and v.dtype != torch.bfloat16}  # fmt: skip
                return "npz", to_bytes(lambda o, b: np.savez(b, **o), arrays)
            if kind == 2:
                return "torch-pickle", to_bytes(
                    lambda o, b: torch.save(o, b, _use_new_zipfile_serialization=False), obj
                )
            return "torch-zip", to_bytes(torch.save, obj)
        except (TypeError, ValueError, RuntimeError, pickle.PicklingError):
            return "torch-zip", to_bytes(torch.save, {"x": torch.zeros(1)})

    def breakage(self, data: bytes) -> tuple[bytes, str]:
        """The bytes broken (or not) and the defect a refusal must name ("" when any reason)."""
        r = self.rng
        kind = r.randrange(10)
        if kind == 0:
            return b"", "is empty (0 bytes)"
        if kind == 1:
            return data[: r.randrange(1, max(2, len(data)))], ""
        if kind == 2:
            i = r.randrange(len(data))
            return data[:i] + bytes([data[i] ^ (1 << r.randrange(8))]) + data[i + 1 :], ""
        if kind == 3:
            return bytes(r.randrange(256) for _ in range(r.randrange(1, 300))), ""
        if kind == 4:
            return b"\x80\x02" + bytes(r.randrange(256) for _ in range(40)), ""
        if kind == 5:  # a safetensors header claiming more than the file holds
            return struct.pack("<Q", r.randrange(2**20, 2**62)) + b"{" + data[:50], ""
        if kind == 6:  # a zip of something else
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as z:
                z.writestr(r.choice(["a.txt", "x/data.pkl", "w.npy"]), data[:100])
            return buffer.getvalue(), ""
        return data, ""

    def case(self) -> tuple[str, bytes, str]:
        kind, data = self.container(self.state_dict())
        broken, defect = self.breakage(data)
        return kind, broken, defect


def judge(
    outcomes: dict[str, int],
    path: Path,
    defect: str,
    load: Callable[[Path], Any],
    error: type[Exception],
    usable: Callable[[Any], None],
    named_first: bool = True,
) -> None:
    """One case: refused with `error` naming the file (first, when `named_first`) and the
    `defect`, or accepted with no defect and `usable`; counted in `outcomes`."""
    try:
        got = load(path)
    except error as err:
        message = str(err)
        named = message.startswith(f"{path}: ") if named_first else str(path) in message
        assert named and defect in message, (path.name, defect, message)
        outcomes["refused"] = outcomes.get("refused", 0) + 1
    else:
        assert not defect, (path.name, defect, path.read_bytes()[:200])
        usable(got)
        outcomes["accepted"] = outcomes.get("accepted", 0) + 1


def assert_usable(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        assert key in reference, key
        assert value.dtype == torch.float32 and value.shape == reference[key].shape, key
        assert bool(torch.isfinite(value).all()), key


def test_fuzzing_checkpoint_bytes_ends_in_a_named_refusal_or_usable_weights(
    tmp_path: Path,
) -> None:
    state, meta = reference_state()
    reference = meta.state_dict()
    fuzzer = CheckpointFuzzer(seed=29, state=state)
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(CHECKPOINT_CASES):
        kind, data, defect = fuzzer.case()
        path = tmp_path / f"case-{i}{fuzzer.rng.choice(['.pt', '.bin', '.safetensors', '.npz'])}"
        path.write_bytes(data)
        judge(
            outcomes,
            path,
            defect,
            lambda p: read_weights_file(p, meta),
            CheckpointFileError,
            lambda got: assert_usable(got, reference),
        )
        if i % 40 == 0:  # the start-up check: the key, the file, before any work
            try:
                derive(RunConfig.from_run_config({**TINY, "foundation": "file",
                                                  "checkpoint-path": str(path)}))  # fmt: skip
            except ConfigError as err:
                assert str(err).startswith(f"checkpoint-path: {path}: "), str(err)
        path.unlink()
    elapsed = time.perf_counter() - started
    print(f"\ncheckpoint fuzz: {CHECKPOINT_CASES} files in {elapsed:.1f} s: {outcomes}")
    assert outcomes.get("refused", 0) > CHECKPOINT_CASES // 2, outcomes
    assert outcomes.get("accepted", 0) > 0, outcomes
    assert elapsed < CEILING_S, elapsed


def test_fuzzing_the_clouds_checkpoint_ends_in_a_named_refusal_or_usable_weights(
    tmp_path: Path,
) -> None:
    """The cloud's own format ({meta, state} with a matching SHA-256 sidecar, so only the
    content is wrong): every case a `CheckpointError` naming the file, or usable weights."""
    state, meta = reference_state()
    shipped = {k: v for k, v in state.items() if not k.startswith("head.")}
    reference = {k: v for k, v in meta.state_dict().items() if not k.startswith("head.")}
    fuzzer = CheckpointFuzzer(seed=30, state=shipped)
    config = {"format": 1, "model-name": "vit_tiny_patch16_224"}
    path = tmp_path / "foundation.pt"
    outcomes: dict[str, int] = {}
    for _ in range(CHECKPOINT_CASES // 4):
        saved_meta: Any = fuzzer.rng.choice([config, config, "format=1", [1], None, {**config,
                                             "format": 2}])  # fmt: skip
        save_checkpoint(path, fuzzer.state_dict(), saved_meta)
        judge(
            outcomes,
            path,
            "",
            lambda p: read_checkpoint(p, config, reference),
            CheckpointError,
            lambda got: assert_usable(got, reference),
            named_first=False,
        )
    assert outcomes.get("refused", 0) > 0 and outcomes.get("accepted", 0) > 0, outcomes


# -- population CSVs -----------------------------------------------------------------------------
PROFILES = load_profiles()
REQUIRED = ("name", "x_m", "y_m", "profile")


class CsvFuzzer:
    """Seeded population CSVs: a header (sometimes with a defect) and rows of odd cells."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def cell(self, column: str, i: int, odd: float) -> str:
        r = self.rng
        if r.random() >= odd:  # plausible
            return {
                "name": f"d{i}",
                "x_m": f"{30.0 * i:g}",
                "y_m": f"{r.uniform(0, 20):.1f}",
                "profile": r.choice(["phone-low", "phone-mid", "phone-high"]),
                "d2d_range_m": "100",
                "data": r.choice(["true", "false", "1", "0", ""]),
                "requests": r.choice(["false", ""]),
            }.get(column, "x")
        return r.choice(["", " ", "nan", "inf", "-inf", "1e400", "-5", "0", "north", "true",
                         '"a,b"', "d0", "ü", "\x00", "9" * 400, "phone-xl"])  # fmt: skip

    def header(self) -> tuple[list[str], str]:
        """Columns and the defect a refusal must name ("" when the header is sound)."""
        r = self.rng
        columns = list(REQUIRED) + r.sample(KEYS[4:], r.randrange(4))
        r.shuffle(columns)
        kind = r.randrange(8)
        if kind == 0:
            columns.append(r.choice(columns))
            return columns, "appear more than once in the header"
        if kind == 1:
            columns.append(r.choice(["colour", "X_m", "nom"]))
            return columns, "unknown column(s)"
        if kind == 2:
            missing = r.choice(REQUIRED)
            return [c for c in columns if c != missing], f"lacks column(s) {missing}"
        return columns, ""

    def case(self) -> tuple[bytes, str]:
        r = self.rng
        columns, defect = self.header()
        odd = r.choice([0.0, 0.0, 0.03, 0.3])  # the share of odd cells in this file
        sizes = [0, 2, 3, 5, 8]
        rows = [columns] + [[self.cell(c, i, odd) for c in columns] for i in range(r.choice(sizes))]
        if r.random() < 0.15:  # a ragged row
            ragged = [f"r{i}" for i in range(len(columns) + r.choice([-1, 1]))]
            rows.append(ragged)
            defect = defect or "value"
        delimiter = ","
        if not defect and r.random() < 0.1:
            delimiter = r.choice([";", "\t", "|"])
            name = {";": "semicolons", "\t": "tabs", "|": "bars"}[delimiter]
            defect = f"separated by {name}"
        newline = r.choice(["\n", "\r\n"])
        text = newline.join(delimiter.join(row) for row in rows) + newline
        data = text.encode("utf-8")
        if r.random() < 0.08:
            data, defect = b"\xef\xbb\xbf" + data, "byte-order mark"
        elif r.random() < 0.05:
            data, defect = data + bytes([0xFF, 0xFE]), "is not UTF-8 text"
        elif r.random() < 0.03:
            data, defect = b"", "is empty"
        return data, defect


def positions_finite(population: Population) -> None:
    for d in population.devices:
        assert math.isfinite(d.x_m) and math.isfinite(d.y_m) and d.d2d_range_m > 0, d


def test_fuzzing_population_csvs_ends_in_a_named_refusal_or_usable_devices(
    tmp_path: Path,
) -> None:
    fuzzer = CsvFuzzer(seed=29)
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(CSV_CASES):
        data, defect = fuzzer.case()
        path = tmp_path / f"cell-{i}.csv"
        path.write_bytes(data)
        judge(
            outcomes,
            path,
            defect,
            lambda p: load_population(p, PROFILES),
            PopulationError,
            positions_finite,
        )
        path.unlink()
    elapsed = time.perf_counter() - started
    print(f"\npopulation CSV fuzz: {CSV_CASES} files in {elapsed:.1f} s: {outcomes}")
    assert outcomes.get("refused", 0) > CSV_CASES // 4, outcomes
    assert outcomes.get("accepted", 0) > CSV_CASES // 20, outcomes
    assert elapsed < CEILING_S, elapsed


# -- strategy options ----------------------------------------------------------------------------
OPTION_CASES = 2000


class Smoothed(FedAvg):
    """A user's strategy by dotted path: annotated options, one unannotated, the rest FedAvg's."""

    def __init__(  # type: ignore[no-untyped-def]
        self,
        *,
        smoothing: float = 0.1,
        mode: Literal["mean", "median"] = "mean",
        window=3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.smoothing, self.mode, self.window = smoothing, mode, window


OPTION_STRATEGIES = [*STRATEGIES, f"{__name__}:Smoothed"]
# Values no Flower option takes (each is >= 0, a number or one fixed key): the defect a refusal
# must name. Options of a user's class have no known range, so there only a type is known.
SURELY_BAD = ["'x'", "true", "-1", "-0.5", "'1'"]
MAYBE = ["0", "1", "0.0", "0.5", "1.0", "2", "3", "0.25", "0.001", "7", "1e9", "false",
         "'num-examples'", "'train-loss'", "'arrays'", "'config'", "'mean'", "'median'",
         "1e-300", "0.4999", "9999999999999999999999"]  # fmt: skip
MANGLED = ["proximal_mu", "=1", "a=b=c", "x=[1, 2]", "y=nan", "z=inf", "mu=1e400", "q='a",
           "eta=0.1,,", "tau=0x10", "beta=--1", "{}=1"]  # fmt: skip


class OptionsFuzzer:
    """Seeded: a strategy, one to three options (names it takes, Flower's it may not, typos,
    junk) with values (surely bad, maybe good), sometimes mangled text; a cluster count."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def name(self, strategy_cls: type) -> str:
        r = self.rng
        taken = list(inspect.signature(strategy_cls).parameters)
        kind = r.randrange(10)
        if kind < 7:
            return r.choice(taken)
        if kind < 9:
            return r.choice(list(FLOWER_OPTIONS))
        base = r.choice(taken)
        return r.choice([base + "x", base[:-1], base.upper(), "foo", "mu"])

    def plausible(self, strategy_cls: type, name: str) -> str:
        """Mostly a value at or near its declared range's ends (valid or just outside), else
        any of MAYBE: the check decides, the round judges what it accepts."""
        r = self.rng
        rule = domain(strategy_cls, name).rule if name in FLOWER_OPTIONS else None
        if rule is None or r.random() < 0.3:
            return r.choice(MAYBE)
        if rule.choices:
            return repr(r.choice(rule.choices))
        ends = [b for b in (rule.low, rule.high) if b is not None]
        base = r.choice(ends) if ends else 1.0
        value = base + r.choice([0, 0, 0.5, 1, -1e-9, 1e-9, 0.25, 3])
        return str(int(value)) if float(value).is_integer() and r.random() < 0.7 else repr(value)

    def case(self) -> tuple[str, str, set[str], int | None]:
        """(strategy, strategy-options, the options a refusal may name, clusters per edge)."""
        r = self.rng
        strategy = r.choice(OPTION_STRATEGIES)
        clusters = r.choice([None, 1, 2, 3, 5, 8, 64])
        if r.random() < 0.08:
            return strategy, r.choice(MANGLED), set(), clusters
        cls = resolve_strategy(strategy)
        takes = inspect.signature(cls).parameters
        items: dict[str, str] = {}
        defects: set[str] = set()
        for _ in range(r.choice([1, 1, 2, 3])):
            name = self.name(cls)
            defects.discard(name)  # a name drawn again: its last value counts
            if r.random() < 0.25:
                value = r.choice(SURELY_BAD)
                flowers = name in FLOWER_OPTIONS and issubclass(cls, FLOWER_OPTIONS[name][0])
                if flowers or name not in takes or value in ("'x'", "'1'", "true"):
                    defects.add(name)  # (a user's unannotated `window` takes any int)
            else:
                value = self.plausible(cls, name)
            if name not in takes and not issubclass(cls, Smoothed):
                defects.add(name)
            items[name] = value
        if issubclass(cls, Smoothed) and "window" in items and items["window"] == "-1":
            defects.discard("window")  # an int of unknown range
        return strategy, ", ".join(f"{k}={v}" for k, v in items.items()), defects, clusters


def run_one_round(strategy: Any, clusters: int) -> None:
    """What an edge does with the strategy in a round, against stand-in replies: it samples
    nodes that exist (waiting for more would hang: refused by the fake sleep), every message
    reads as a ClientApp reads it, and the aggregate is finite."""
    tasks = {100 + k: make_task(0, k, clusters) for k in range(clusters)}
    edge = EdgeServer(0, strategy, tasks)
    start = {"prompt.0": np.zeros((2, 4), np.float32), "head.weight": np.ones((3, 4), np.float32)}
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    messages = list(edge.configure_train(1, arrays, ConfigRecord(), Mock(spec=Grid)))
    assert messages, "no cluster sampled to train"
    replies = []
    for k, message in enumerate(messages):
        request = TrainRequest.from_message(message)
        assert math.isfinite(request.proximal_mu) and request.proximal_mu >= 0
        trained = {key: value + 0.1 * (k + 1) for key, value in start.items()}
        replies.append(make_reply(trained, 10 + k, k, node_id=message.metadata.dst_node_id))
    out, _ = edge.aggregate_train(1, replies)
    assert out is not None and all(np.isfinite(v.numpy()).all() for v in out.values())


class WouldWait(Exception):
    """The strategy waited for clusters that are not there (Flower sleeps and asks again)."""


@pytest.mark.usefixtures("task_identity")
def test_fuzzing_strategy_options_ends_in_a_named_refusal_or_a_working_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flwr.serverapp.strategy.strategy_utils as strategy_utils

    def sleep(seconds: float) -> None:
        raise WouldWait(f"slept {seconds} s waiting for nodes")

    monkeypatch.setattr(strategy_utils, "sleep", sleep)
    # Flower's aggregation collects garbage after every ArrayRecord it converts (arrayrecord.py:
    # gc.collect()), ~0.3 s each in a process holding torch and the test suite: 40 of 50 s here.
    import flwr.app.message.arrayrecord as arrayrecord

    monkeypatch.setattr(arrayrecord, "gc", types.SimpleNamespace(collect=lambda: 0))
    fuzzer = OptionsFuzzer(seed=29)
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for _ in range(OPTION_CASES):
        strategy, text, defects, clusters = fuzzer.case()
        case = (strategy, text, clusters)
        try:
            cfg = RunConfig.from_run_config({"strategy": strategy, "strategy-options": text})
            built = build_edge_strategy(cfg, edge_strategy(cfg), clusters)
        except ConfigError as err:
            message = str(err)
            assert message.startswith("strategy-options="), (case, message)
            assert not defects or any(d in message for d in defects), (case, defects, message)
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            continue
        assert not defects, (case, defects)
        if clusters is not None:  # the counts were checked against these clusters: it runs
            run_one_round(built, clusters)
        outcomes["accepted"] = outcomes.get("accepted", 0) + 1
    elapsed = time.perf_counter() - started
    print(f"\nstrategy option fuzz: {OPTION_CASES} cases in {elapsed:.1f} s: {outcomes}")
    assert outcomes.get("refused", 0) > OPTION_CASES // 4, outcomes
    assert outcomes.get("accepted", 0) > OPTION_CASES // 10, outcomes
    assert elapsed < CEILING_S, elapsed


# -- data sizes: clusters, edges, partitioning, cluster-samples ---------------------------------
SIZE_CASES = 60


def size_case(r: random.Random) -> tuple[dict[str, Any], int]:
    """A run-config of data settings and a number of simulated SuperNodes."""
    edges = r.choice([1, 1, 2, 3])
    config: dict[str, Any] = {
        **TINY,
        "edge-domains": ",".join(r.choice(["none", "invert", "rotate"]) for _ in range(edges)),
        "edge-shares": r.choice(["", ",".join(r.choice(["1", "0.2", "0.01"]) for _ in
                                                   range(edges))]),
        "partitioning": r.choice(["iid", "iid", "dirichlet", "classes"]),
        "classes-per-cluster": r.choice([1, 2, 5, 6]),
        "dirichlet-alpha": r.choice([0.05, 0.5, 100.0]),
        "cluster-samples": r.choice([0, 0, 0, 2, 7, 40]),
        "shots": r.choice([0, 1, 10]),
        "fraction-evaluate": r.choice([0.0, 1.0]),
    }  # fmt: skip
    nodes = r.choice([1, 2, 3, 7, 20, 60, 150, 247, 248, 400, 496, 497, 700])
    return config, max(nodes, edges)


def usable_clusters(derived: Any, tasks: dict[int, Any]) -> None:
    """Every cluster the simulated nodes will run holds a training image, as the ClientApp
    builds it, and with federated evaluation some cluster of each edge a validation image."""
    from gaisnet_flwr.apps.server_app import edge_pools

    _, edges = edge_pools(derived)
    cfg = derived.cfg
    validation: dict[int, int] = {}
    partitions: dict[tuple[int, int], list[np.ndarray]] = {}
    for task in tasks.values():
        key = EdgeDataKey.of(derived.spec, task, None)
        n = task.num_partitions

        def split(key: Any = key, n: int = n, edge: int = task.edge) -> list[np.ndarray]:
            if (edge, n) not in partitions:
                labels = edges[edge].train_labels
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    partitions[(edge, n)] = partition_indices(labels, n, key.spec)
            return partitions[(edge, n)]

        data = ClusterData.build(
            key, task.partition, n, cfg.data.cluster_samples,
            edge_data=edges[task.edge], partitions=split,
        )  # fmt: skip
        assert len(data.train_set) > 0, task
        validation[task.edge] = validation.get(task.edge, 0) + len(data.val_set)
    if cfg.hierarchy.fraction_evaluate > 0:
        assert all(v > 0 for v in validation.values()), validation


def test_fuzzing_data_sizes_ends_in_a_named_refusal_or_clusters_that_can_train(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gaisnet_flwr.apps.server_app import TaskBuilder, check_simulation

    # Every case has the same model and plan: their FLOPs and memory (a FakeTensor count,
    # 0.3 s) once, not once per case.
    costs: dict[Any, Any] = {}
    real_costs = TaskBuilder.costs

    def memo(self: Any, plan: Any) -> Any:
        if plan not in costs:
            costs[plan] = real_costs(self, plan)
        return costs[plan]

    monkeypatch.setattr(TaskBuilder, "costs", memo)
    r = random.Random(29)
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for _ in range(SIZE_CASES):
        config, nodes = size_case(r)
        try:
            derived = derive(RunConfig.from_run_config(config))
            clusters = check_simulation(derived, nodes)
        except ConfigError as err:
            message = str(err)
            keys = ("cluster-samples", "classes-per-cluster", "dirichlet-alpha", "edge-shares",
                    "fraction-evaluate", "num-supernodes")  # fmt: skip
            assert any(k in message for k in keys), (config, nodes, message)
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            continue
        usable_clusters(derived, clusters.tasks)
        outcomes["accepted"] = outcomes.get("accepted", 0) + 1
    elapsed = time.perf_counter() - started
    print(f"\ndata size fuzz: {SIZE_CASES} cases in {elapsed:.1f} s: {outcomes}")
    assert outcomes.get("refused", 0) > SIZE_CASES // 10, outcomes
    assert outcomes.get("accepted", 0) > SIZE_CASES // 4, outcomes
    assert elapsed < CEILING_S, elapsed
