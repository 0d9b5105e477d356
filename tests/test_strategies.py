"""Tests for per-module FedAvg (`ModuleFedAvg`) and the strategy registry.

Every cluster uploads its complete tunable state, so per-module FedAvg is Flower's FedAvg with
the replies in a fixed order (issue 30 dropped the partial-module aggregation no cluster used,
and its tests: a subset of modules per reply, modules no reply holds, checks against the sent
arrays)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, FedProx

from strategies import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    ModuleFedAvg,
    build_strategy,
    resolve_strategy,
)
from tests.conftest import make_error_reply, make_reply

pytestmark = pytest.mark.usefixtures("task_identity")

# A tiny prompted ViT's tunable modules: 3 prompt modules (4 tokens x 8 dims) and a 5-class head.
PROMPT_KEYS = ["prompt.0", "prompt.1", "prompt.2"]
HEAD_KEYS = ["head.weight", "head.bias"]
ALL_KEYS = PROMPT_KEYS + HEAD_KEYS
SHAPES = {**{key: (4, 8) for key in PROMPT_KEYS}, "head.weight": (5, 8), "head.bias": (5,)}


def make_arrays(seed: int, keys: Iterable[str] = ALL_KEYS) -> dict[str, np.ndarray]:
    """Random float32 modules for `keys`."""
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(SHAPES[key]).astype(np.float32) for key in keys}


def configured(strategy: ModuleFedAvg, current: Mapping[str, np.ndarray]) -> ModuleFedAvg:
    """Run `configure_train` with `current` against a mock grid, as `Strategy.start` does."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [100, 101, 102]
    arrays = ArrayRecord({key: Array(value) for key, value in current.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    return strategy


def to_numpy(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    """An aggregated ArrayRecord as NumPy arrays."""
    assert record is not None
    return {key: array.numpy() for key, array in record.items()}


def new_strategy() -> ModuleFedAvg:
    """A ModuleFedAvg sized for a few clusters."""
    return ModuleFedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)


# --- ModuleFedAvg -------------------------------------------------------------------------------


def test_full_replies_equal_fedavg_bitwise() -> None:
    """Every cluster returns every module: exactly Flower's FedAvg, bit for bit."""
    # Prepare
    current = make_arrays(0)
    replies = [make_reply(make_arrays(pid + 1), 10 * (pid + 1), pid) for pid in range(4)]

    # Execute
    arrays, metrics = configured(new_strategy(), current).aggregate_train(1, replies)
    fedavg_arrays, fedavg_metrics = FedAvg().aggregate_train(1, replies)

    # Assert
    result, expected = to_numpy(arrays), to_numpy(fedavg_arrays)
    assert result.keys() == expected.keys()
    for key in ALL_KEYS:
        np.testing.assert_array_equal(result[key], expected[key])
        assert result[key].dtype == expected[key].dtype
    assert metrics == fedavg_metrics


def test_identical_replies_return_them() -> None:
    """Aggregating identical updates returns them unchanged (to float32 rounding)."""
    # Prepare
    current, same = make_arrays(0), make_arrays(1)
    replies = [make_reply(same, n, pid) for pid, n in enumerate([3, 5, 7])]

    # Execute
    arrays, _ = configured(new_strategy(), current).aggregate_train(1, replies)

    # Assert
    result = to_numpy(arrays)
    for key in ALL_KEYS:
        np.testing.assert_allclose(result[key], same[key], rtol=1e-6, atol=1e-7)


def test_reply_order_does_not_change_result() -> None:
    """Replies are summed in partition-id order, so arrival order is irrelevant (bitwise)."""
    # Prepare
    current = make_arrays(0)
    replies = [make_reply(make_arrays(pid + 1), 7 * pid + 3, pid) for pid in range(6)]
    shuffled = replies[:]
    random.Random(0).shuffle(shuffled)

    # Execute
    in_order, metrics_in_order = configured(new_strategy(), current).aggregate_train(1, replies)
    out_of_order, metrics_shuffled = configured(new_strategy(), current).aggregate_train(
        1, shuffled
    )

    # Assert
    assert shuffled != replies
    for key in ALL_KEYS:
        np.testing.assert_array_equal(to_numpy(in_order)[key], to_numpy(out_of_order)[key])
    assert metrics_in_order == metrics_shuffled


def test_replies_without_partition_id_are_ordered_by_node_id() -> None:
    """Without partition-id the node id fixes the order (bitwise again)."""
    # Prepare
    current = make_arrays(0)
    replies = []
    for pid in range(4):
        reply = make_reply(make_arrays(pid + 1), pid + 1, pid, node_id=50 - pid)
        del reply.content.metric_records["metrics"]["partition-id"]
        replies.append(reply)

    # Execute
    forward, _ = configured(new_strategy(), current).aggregate_train(1, replies)
    backward, _ = configured(new_strategy(), current).aggregate_train(1, replies[::-1])

    # Assert
    for key in ALL_KEYS:
        np.testing.assert_array_equal(to_numpy(forward)[key], to_numpy(backward)[key])


def test_error_replies_are_skipped() -> None:
    """Replies carrying an error are skipped and logged, as in FedAvg."""
    # Prepare
    current = make_arrays(0)
    good = [make_reply(make_arrays(pid + 1), 10, pid) for pid in range(2)]

    # Execute
    with_errors, _ = configured(new_strategy(), current).aggregate_train(
        1, [make_error_reply(5), *good, make_error_reply(6)]
    )
    without, _ = configured(new_strategy(), current).aggregate_train(1, good)

    # Assert
    for key in ALL_KEYS:
        np.testing.assert_array_equal(to_numpy(with_errors)[key], to_numpy(without)[key])


def test_only_error_replies_return_none() -> None:
    """No valid reply: nothing to aggregate, as in FedAvg."""
    # Prepare
    strategy = configured(new_strategy(), make_arrays(0))

    # Execute
    result = strategy.aggregate_train(1, [make_error_reply(0), make_error_reply(1)])

    # Assert
    assert result == (None, None)


def _two_arrayrecords() -> Message:
    reply = make_reply(make_arrays(1), 5, 0)
    reply.content["extra"] = ArrayRecord({"prompt.0": Array(make_arrays(2)["prompt.0"])})
    return reply


def _without_num_examples() -> Message:
    reply = make_reply(make_arrays(1), 5, 0)
    del reply.content.metric_records["metrics"]["num-examples"]
    return reply


def _list_num_examples() -> Message:
    reply = make_reply(make_arrays(1), 5, 0)
    reply.content.metric_records["metrics"]["num-examples"] = [1, 2]
    return reply


@pytest.mark.parametrize(
    ("make_bad_reply", "match"),
    [
        (_two_arrayrecords, "exactly one ArrayRecord in each reply, found 2"),
        (_without_num_examples, "Missing required key `num-examples`"),
        (_list_num_examples, "must be a single value"),
    ],
    ids=["two-arrayrecords", "no-num-examples", "list-num-examples"],
)
def test_malformed_reply_raises(make_bad_reply: Callable[[], Message], match: str) -> None:
    """Malformed replies stop the ServerApp with Flower's own exception, as FedAvg does."""
    # Prepare
    strategy = configured(new_strategy(), make_arrays(0))
    replies = [make_bad_reply()]

    # Execute / Assert
    with pytest.raises(InconsistentMessageReplies, match=match):
        strategy.aggregate_train(1, replies)


def test_configure_train_is_fedavgs() -> None:
    """configure_train sends FedAvg's messages: the arrays and config to every sampled node."""
    # Prepare
    current = make_arrays(0)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [100, 101]
    strategy = ModuleFedAvg(min_train_nodes=2, min_available_nodes=2)

    # Execute
    messages = list(
        strategy.configure_train(
            3, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord(), grid
        )
    )

    # Assert
    assert sorted(msg.metadata.dst_node_id for msg in messages) == [100, 101]
    for msg in messages:
        assert msg.metadata.message_type == MessageType.TRAIN
        assert msg.content["config"]["server-round"] == 3
        assert set(msg.content["arrays"].keys()) == set(ALL_KEYS)


def test_runs_inside_strategy_start() -> None:
    """Flower's own loop feeds each round's aggregate back as the next round's arrays."""
    # Prepare: clusters 0 and 1 (nodes 100, 101) each add (partition-id + 1) to every module.
    current = make_arrays(0)
    num_examples = {100: 10, 101: 30}

    def send_and_receive(messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            sent = msg.content.array_records["arrays"]
            trained = {key: sent[key].numpy() + (node_id - 99) for key in ALL_KEYS}
            replies.append(make_reply(trained, num_examples[node_id], node_id - 100))
        return replies

    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [100, 101]
    grid.send_and_receive.side_effect = send_and_receive
    strategy = ModuleFedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)

    # Execute
    result = strategy.start(
        grid, ArrayRecord({k: Array(v) for k, v in current.items()}), num_rounds=2
    )

    # Assert
    final = to_numpy(result.arrays)
    step = np.average([1.0, 2.0], weights=[10, 30])
    for key in ALL_KEYS:
        np.testing.assert_allclose(final[key], current[key] + 2 * step, rtol=1e-5, atol=1e-5)
    assert sorted(result.train_metrics_clientapp) == [1, 2]


def test_summary_logs_module_behaviour(caplog: pytest.LogCaptureFixture) -> None:
    """summary() logs FedAvg's settings and then the per-module behaviour."""
    # Prepare
    strategy = new_strategy()

    # Execute
    with caplog.at_level(logging.INFO, logger="flwr"):
        strategy.summary()

    # Assert
    text = caplog.text
    assert "Weighted by" in text
    assert text.index("Weighted by") < text.index("ModuleFedAvg")


# --- registry -----------------------------------------------------------------------------------

# Options a registry strategy cannot be built without.
REQUIRED_OPTIONS: dict[str, dict[str, float | int | str | bool]] = {
    "qfedavg": {"client_learning_rate": 0.1},
}


class CustomStrategy(FedAvg):
    """A user's own Message-API strategy, reached by dotted path."""

    def __init__(self, *, min_train_nodes: int = 2, smoothing: float = 0.0) -> None:
        super().__init__(min_train_nodes=min_train_nodes)
        self.smoothing = smoothing


NOT_A_STRATEGY = 42


def test_default_strategy_is_module_fedavg() -> None:
    """The registry default is the per-module FedAvg."""
    assert STRATEGIES[DEFAULT_STRATEGY] is ModuleFedAvg


@pytest.mark.parametrize(
    ("name", "num_clusters"),
    # Bulyan needs >= 3 clusters: see test_bulyan_with_too_few_clusters_raises.
    [(name, n) for name in sorted(STRATEGIES) for n in (1, 4) if (name, n) != ("bulyan", 1)],
)
def test_every_name_builds(name: str, num_clusters: int) -> None:
    """Every strategy builds, sized so a single cluster does not wait forever."""
    # Execute
    strategy = build_strategy(
        name,
        num_clusters=num_clusters,
        fraction_evaluate=0.5,
        options=REQUIRED_OPTIONS.get(name),
    )

    # Assert
    assert isinstance(strategy, STRATEGIES[name])
    assert isinstance(strategy, FedAvg)  # all of Flower's are; they share the sampling knobs
    assert strategy.fraction_train == 1.0
    assert strategy.fraction_evaluate == 0.5
    assert strategy.min_train_nodes == num_clusters
    assert strategy.min_available_nodes == num_clusters
    assert strategy.min_evaluate_nodes == 1


def test_bulyan_with_too_few_clusters_raises() -> None:
    """Bulyan skips every round below 4f + 3 replies: refuse at build time."""
    with pytest.raises(ValueError, match="at least 4 \\* num_malicious_nodes \\+ 3 = 3"):
        build_strategy("bulyan", num_clusters=2, fraction_evaluate=1.0)


def test_fraction_evaluate_zero_needs_no_evaluate_nodes() -> None:
    """No federated evaluation: no minimum of evaluate nodes."""
    # Execute
    strategy = build_strategy("fedavg", num_clusters=3, fraction_evaluate=0.0)

    # Assert
    assert isinstance(strategy, FedAvg)
    assert strategy.min_evaluate_nodes == 0


def test_options_are_forwarded() -> None:
    """Strategy options reach the class; names are matched case-insensitively."""
    # Execute
    strategy = build_strategy(
        "FedProx", num_clusters=2, fraction_evaluate=1.0, options={"proximal_mu": 0.1}
    )

    # Assert
    assert isinstance(strategy, FedProx)
    assert strategy.proximal_mu == 0.1


def test_dotted_path_to_user_strategy() -> None:
    """A dotted path builds the user's class, with common and extra arguments it accepts."""
    # Prepare
    path = f"{__name__}:CustomStrategy"

    # Execute
    strategy = build_strategy(
        path, num_clusters=3, fraction_evaluate=1.0, options={"smoothing": 0.25}
    )

    # Assert
    assert resolve_strategy(path) is CustomStrategy
    assert isinstance(strategy, CustomStrategy)
    assert strategy.min_train_nodes == 3
    assert strategy.smoothing == 0.25


def test_unknown_name_lists_valid_names() -> None:
    """An unknown name says which names exist and how to give a dotted path."""
    with pytest.raises(ValueError, match="Unknown strategy 'fedavgx'") as info:
        resolve_strategy("fedavgx")
    message = str(info.value)
    assert all(name in message for name in STRATEGIES)
    assert "package.module:Class" in message


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("no_such_package_xyz.mod:Thing", "cannot import module 'no_such_package_xyz.mod'"),
        (f"{__name__}:Missing", "has no attribute 'Missing'"),
        (f"{__name__}:NOT_A_STRATEGY", "not a subclass of flwr.serverapp.strategy.Strategy"),
        ("flwr.server.strategy:FedAvg", "legacy flwr.server.strategy"),
        ("flwr.serverapp.strategy:Strategy", "is abstract; implement aggregate_evaluate"),
        (":FedAvg", "must have the form 'package.module:Class'"),
    ],
    ids=["no-module", "no-attribute", "not-a-class", "legacy-api", "abstract", "no-module-name"],
)
def test_bad_dotted_path_raises(path: str, match: str) -> None:
    """A dotted path that cannot give a concrete Message-API strategy is named in the error."""
    with pytest.raises(ValueError, match=match) as info:
        resolve_strategy(path)
    assert path in str(info.value)


def test_bad_option_is_named_with_accepted_ones() -> None:
    """An option the class does not take is named, with its close match and the valid ones
    (those a run-config may set: not the record keys the message contract fixes)."""
    with pytest.raises(ValueError) as info:
        build_strategy(
            "fedprox", num_clusters=2, fraction_evaluate=1.0, options={"proximal_muu": 1}
        )
    assert str(info.value) == (
        "Strategy 'fedprox' (FedProx): unknown option 'proximal_muu' (did you mean "
        "'proximal_mu'?); valid options: fraction_evaluate, fraction_train, min_available_nodes, "
        "min_evaluate_nodes, min_train_nodes, proximal_mu"
    )


def test_missing_required_argument_raises() -> None:
    """QFedAvg cannot be built without its client learning rate."""
    with pytest.raises(ValueError, match="requires client_learning_rate"):
        build_strategy("qfedavg", num_clusters=2, fraction_evaluate=1.0)


class PickyStrategy(FedAvg):
    """A user's strategy that checks its own option."""

    def __init__(self, *, smoothing: float = 0.0, **kwargs: object) -> None:
        if smoothing > 1:
            raise ValueError("smoothing must be at most 1")
        super().__init__(**kwargs)  # type: ignore[arg-type]


def test_class_rejecting_its_options_raises() -> None:
    """A value the class itself rejects surfaces as a ValueError naming the strategy."""
    with pytest.raises(ValueError, match=f"Could not build strategy '{__name__}:PickyStrategy': "):
        build_strategy(
            f"{__name__}:PickyStrategy",
            num_clusters=4,
            fraction_evaluate=1.0,
            options={"smoothing": 1.5},
        )


@pytest.mark.parametrize(
    ("num_clusters", "fraction_evaluate", "match"),
    [(0, 1.0, "num_clusters"), (True, 1.0, "num_clusters"), (2, 1.5, "fraction_evaluate")],
)
def test_bad_sizes_raise(num_clusters: int, fraction_evaluate: float, match: str) -> None:
    """Cluster count and evaluation fraction are checked before anything is built."""
    with pytest.raises(ValueError, match=match):
        build_strategy("fedavg", num_clusters=num_clusters, fraction_evaluate=fraction_evaluate)
