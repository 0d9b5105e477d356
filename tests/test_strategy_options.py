"""Strategy options checked at start-up (issue 29, Build 2): every option of every registry
strategy against its domain, a dotted-path class's own options against their annotations, the
counts against the edge's clusters, and the issue's cases refused at the ServerApp's boundary
before any data is read. (The seeded fuzzer over the same surface is in test_fuzz_inputs.py.)"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg, FedProx, QFedAvg

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.apps.server_app import check_run_config
from gaisnet_flwr.config import ConfigError
from gaisnet_flwr.contract import TRAIN_LOSS
from strategies.options import FLOWER_OPTIONS, check_options, domain, options_table
from strategies.registry import STRATEGIES, build_strategy, check_strategy
from tests.conftest import make_reply

REPO = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = {
    "depth": 2, "embed-dim": 32, "num-heads": 2, "peers-per-cluster": 1, "img-size": 16,
    "patch-size": 8, "num-rounds": 1, "inference-requests": 0, "foundation": "none",
    "device": "cpu",
}  # fmt: skip


# -- the issue's cases, at the ServerApp's boundary --------------------------------------------
ISSUE_CASES = [
    ("fedprox", "proximal_mu=-1", "proximal_mu=-1.0 is not valid: must be a finite number >= 0"),
    ("fedprox", "proximal_mu='x'", "proximal_mu='x' is not valid: must be a number >= 0"),
    ("fedavg", "min_available_nodes=-1", "min_available_nodes=-1 is out of range: must be >= 0"),
    ("fedavg", "fraction_train=0", "fraction_train=0.0 is not valid: must be a finite number > 0"),
    ("fedavg", "min_train_nodes=2.5", "min_train_nodes=2.5 is not valid: must be an integer >= 0"),
    ("fedadam", "eta=0", "eta=0.0 is not valid: must be a finite number > 0"),
    ("fedyogi", "beta_2=1", "beta_2=1.0 is not valid: must be a finite number >= 0 and < 1"),
    ("fedavgm", "server_momentum=true", "server_momentum=True is not valid: must be a number"),
    ("fedtrimmedavg", "beta=0.5", "beta=0.5 is not valid: must be a finite number >= 0 and < 0.5"),
    ("multikrum", "num_nodes_to_select=0", "num_nodes_to_select=0 is out of range: must be >= 1"),
    ("qfedavg", "client_learning_rate=-0.1", "client_learning_rate=-0.1 is not valid"),
    ("fedavg", "weighted_by_key='loss'", "weighted_by_key='loss' is not valid; choose one of "
     "num-examples (the weight every cluster's reply carries)"),
    ("qfedavg", "client_learning_rate=0.1, train_loss_key='train_loss'",
     "train_loss_key='train_loss' is not valid; choose one of train-loss"),
    ("bulyan", "selection_rule='max'", "selection_rule cannot be set in strategy-options: a "
     "function"),
]  # fmt: skip


@pytest.mark.parametrize(("strategy", "options", "message"), ISSUE_CASES)
def test_a_bad_option_is_refused_at_the_boundary_naming_it_and_its_range(
    strategy: str, options: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_run_config({**TINY, "strategy": strategy, "strategy-options": options})
    text = str(info.value)
    # the options as the run-config holds them after parsing (TOML values), then the strategy
    assert text.startswith("strategy-options=") and f" (strategy={strategy!r}): " in text, text
    assert message in text, text


def test_a_bad_option_stops_the_run_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's first case trained and ended 'completed'; now it never starts."""
    import gaisnet_flwr.apps.server_app as server_app

    loaded: list[int] = []
    monkeypatch.setattr(server_app, "load_image_data", lambda spec: loaded.append(1))
    config = {**TINY, "output-dir": str(tmp_path), "strategy": "fedprox",
              "strategy-options": "proximal_mu=-1"}  # fmt: skip
    with pytest.raises(ConfigError, match="proximal_mu=-1.0 is not valid"):
        run_inprocess(config, num_clusters=2)
    assert not loaded


# -- every option of every registry strategy ---------------------------------------------------
def registry_options() -> list[tuple[str, str]]:
    import inspect

    return [
        (name, option)
        for name, cls in STRATEGIES.items()
        for option in inspect.signature(cls).parameters
    ]


@pytest.mark.parametrize(("strategy", "option"), registry_options())
def test_every_registry_option_has_a_declared_domain(strategy: str, option: str) -> None:
    """No option of a strategy the registry offers is passed unchecked: each has Flower's
    declared domain (a type and a range or choices), or is not settable at all."""
    d = domain(STRATEGIES[strategy], option)
    assert d.fixed or (d.kind is not None and d.rule is not None), (option, d)
    assert option in FLOWER_OPTIONS


@pytest.mark.parametrize(("strategy", "option"), registry_options())
def test_wrong_types_are_refused_for_every_registry_option(strategy: str, option: str) -> None:
    cls = STRATEGIES[strategy]
    d = domain(cls, option)
    if not d.settable:
        return
    wrong: list[Any] = [[1], None] + (["x", True] if d.kind is not str else [1, 0.5])
    for value in wrong:
        with pytest.raises(ConfigError, match=f"^{option}="):
            check_options(cls, {option: value})


def test_an_int_is_taken_where_a_number_is_wanted_and_cast() -> None:
    assert check_options(FedProx, {"proximal_mu": 1}) == {"proximal_mu": 1.0}
    strategy = build_strategy(
        "fedprox", num_clusters=2, fraction_evaluate=1.0, options={"proximal_mu": 1}
    )
    assert isinstance(strategy, FedProx) and strategy.proximal_mu == 1.0


# -- a strategy given by dotted path -------------------------------------------------------------
class Smoothed(FedAvg):
    """A user's strategy: annotated options, one without annotation, the rest to FedAvg."""

    def __init__(  # type: ignore[no-untyped-def]
        self,
        *,
        smoothing: float = 0.1,
        mode: Literal["mean", "median"] = "mean",
        window=3,
        anything=None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.smoothing, self.mode, self.window, self.anything = smoothing, mode, window, anything


PATH = f"{__name__}:Smoothed"


def test_a_dotted_path_class_is_checked_by_its_annotations_and_defaults() -> None:
    def refused(options: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as info:
            build_strategy(PATH, num_clusters=2, fraction_evaluate=1.0, options=options)
        return str(info.value)

    assert refused({"smoothing": "x"}) == (
        "smoothing='x' is not valid: must be a number (from its annotation; range not known "
        "here: the class checks it, if at all)"
    )
    assert "choose one of mean, median" in refused({"mode": "max"})
    assert "window=0.5 is not valid: must be an integer (from its default" in refused(
        {"window": 0.5}
    )
    # what reaches FedAvg through **kwargs has FedAvg's domain
    assert "proximal" not in refused({"fraction_evaluate": 2})
    assert "fraction_evaluate=2.0 is not valid" in refused({"fraction_evaluate": 2})
    strategy = build_strategy(
        PATH,
        num_clusters=2,
        fraction_evaluate=1.0,
        options={"smoothing": 3, "mode": "median", "anything": "ok", "min_train_nodes": 1},
    )
    assert isinstance(strategy, Smoothed)
    assert (strategy.smoothing, strategy.mode, strategy.anything) == (3.0, "median", "ok")


def test_what_cannot_be_known_is_stated_once_at_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="flwr"):
        check_run_config(
            {**TINY, "strategy": PATH, "strategy-options": "smoothing=0.5, anything=1"}
        )
    notes = [r.getMessage() for r in caplog.records if "strategy option" in r.getMessage()]
    assert notes == [
        "strategy option smoothing: a number (from its annotation; range not known here: the "
        "class checks it, if at all)",
        "strategy option anything: any value (type not known: passed as given)",
    ]


# -- counts against the edge's clusters ----------------------------------------------------------
COUNT_CASES = [
    ("fedavg", {"min_train_nodes": 3}, 2, "min_train_nodes=3 is more than the edge's 2"),
    ("fedavg", {"min_available_nodes": 5}, 4, "the edge would wait for them forever"),
    ("fedavg", {"fraction_train": 0.4, "min_train_nodes": 0}, 2, "samples none to train"),
    ("multikrum", {"num_nodes_to_select": 3}, 2, "num_nodes_to_select=3 is more than"),
    ("krum", {"num_malicious_nodes": 1}, 4, "Krum needs at least 2 * num_malicious_nodes + 3 = 5"),
    ("bulyan", {}, 2, "Bulyan needs at least 4 * num_malicious_nodes + 3 = 3"),
]  # fmt: skip


@pytest.mark.parametrize(("strategy", "options", "clusters", "message"), COUNT_CASES)
def test_counts_the_edges_clusters_cannot_meet_are_refused(
    strategy: str, options: dict[str, Any], clusters: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_strategy(strategy, num_clusters=clusters, fraction_evaluate=1.0, options=options)
    # the same options pass while the clusters are not known, and with enough of them
    build_strategy(strategy, num_clusters=None, fraction_evaluate=1.0, options=options)
    build_strategy(strategy, num_clusters=64, fraction_evaluate=1.0, options=options)


def test_one_check_serves_every_edge_which_gets_its_own_instance_sized_to_its_clusters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`check_strategy` checks the options once; `EdgeStrategy.build` only sizes the strategy
    to an edge's clusters and checks the counts against them."""
    import strategies.registry as registry

    checked = check_strategy("fedprox", fraction_evaluate=1.0, options={"proximal_mu": 1})
    fixed = check_strategy("fedavg", fraction_evaluate=1.0, options={"min_train_nodes": 3})
    rechecked: list[object] = []
    monkeypatch.setattr(registry, "check_options", lambda *args: rechecked.append(args))
    two, three = checked.build(2), checked.build(3)
    assert isinstance(two, FedProx) and isinstance(three, FedProx) and two is not three
    assert (two.min_train_nodes, two.min_available_nodes, two.proximal_mu) == (2, 2, 1.0)
    assert (three.min_train_nodes, three.min_available_nodes) == (3, 3)
    assert fixed.build(4).min_train_nodes == 3  # an option is not the edge's size
    with pytest.raises(ConfigError, match=re.escape("min_train_nodes=3 is more than the edge's 2")):
        fixed.build(2)
    assert not rechecked


def test_counts_are_checked_once_the_nodes_are_known_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gaisnet_flwr.cloud.foundation import Foundation

    trained: list[int] = []
    monkeypatch.setattr(Foundation, "ensure", lambda *args: trained.append(1))
    config = {**TINY, "output-dir": str(tmp_path), "strategy-options": "min_train_nodes=3"}
    with pytest.raises(ConfigError, match=r"2 cluster\(s\) per edge\): min_train_nodes=3 is more"):
        run_inprocess(config, num_clusters=2)
    assert not trained


# -- what the contract fixes -------------------------------------------------------------------
@pytest.mark.usefixtures("task_identity")
def test_qfedavg_reads_the_loss_our_replies_carry() -> None:
    """Flower's QFedAvg looks for 'train_loss' by default, which no reply of ours carries: every
    round failed. The registry gives it the contract's key."""
    strategy = build_strategy(
        "qfedavg", num_clusters=2, fraction_evaluate=0.0, options={"client_learning_rate": 0.1}
    )
    assert isinstance(strategy, QFedAvg) and strategy.train_loss_key == TRAIN_LOSS
    current = {"head.weight": np.zeros((2, 3), dtype=np.float32)}
    strategy.current_arrays = ArrayRecord(
        {k: Array(v) for k, v in current.items()}
    )  # what configure_train keeps
    replies = [
        make_reply({"head.weight": np.full((2, 3), k, dtype=np.float32)}, 10, k) for k in (1, 2)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and np.isfinite(arrays["head.weight"].numpy()).all()
    assert metrics is not None and TRAIN_LOSS in metrics


# -- the docs --------------------------------------------------------------------------------------
OPTIONS_START = "<!-- strategy options: generated from strategies/options.py (options_table) -->"


def test_the_docs_table_of_strategy_options_is_the_declared_one() -> None:
    text = (REPO / "docs" / "configure.md").read_text()
    assert OPTIONS_START in text
    table = text.split(OPTIONS_START, 1)[1].split("<!-- end of strategy options -->")[0].strip()
    assert table == options_table(), f"docs/configure.md should hold:\n{options_table()}"
