"""Strategy registry: a name or a dotted path in run-config -> a built Flower strategy.

Every edge aggregates its clusters with a pluggable Message-API strategy
(``flwr.serverapp.strategy.Strategy``): one of the names in `STRATEGIES`, or a user's own class
given as ``"package.module:Class"``. `check_strategy` runs once, before any training, and
raises ``ValueError`` for anything it cannot build, so a typo fails at start-up, not in round 1;
its `EdgeStrategy` then gives each edge its own instance, sized to the edge's clusters
(`EdgeStrategy.build`: only the counts are checked there, against them).

The default, ``"module-fedavg"``, is the paper's per-module FedAvg (`ModuleFedAvg`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from gaisnet_flwr.config import unknown_names
from gaisnet_flwr.contract import PARTITION_ID, TRAIN_LOSS, aggregate_metrics, reply_metrics
from strategies.options import (
    FLOWER_OPTIONS,
    OptionValue,
    check_clusters,
    check_options,
    domain,
)

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "EdgeStrategy",
    "ModuleFedAvg",
    "UnknownStrategyError",
    "build_strategy",
    "check_strategy",
    "resolve_strategy",
]


class ModuleFedAvg(FedAvg):
    """Per-module FedAvg across client clusters (GaisNet HFSL, paper Sec. III-C.1): "FedAvg-based
    parameter aggregation is performed among the same modules of different clusters".

    Every array key (`prompt.0`, ..., `head.weight`) is one module, and every cluster uploads
    its complete tunable state (the train reply's contract), so per-key FedAvg is per-module
    FedAvg: Flower's FedAvg, checks included. What this adds is the order of the sum: replies
    are aggregated by partition-id, then node id, not in the order they arrive, so a round's
    modules do not depend on which cluster finished first (in-process and `flwr run` agree bit
    for bit, tests/test_flwr_run.py).
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=reply_order)
        for msg in ordered:  # FedAvg checks this too, without saying which reply
            if not msg.has_error() and (n := len(msg.content.array_records)) != 1:
                raise InconsistentMessageReplies(
                    reason=f"Expected exactly one ArrayRecord in each reply, found {n} (reply "
                    f"from node {msg.metadata.src_node_id}). Skipping aggregation."
                )
        return super().aggregate_train(server_round, ordered)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> ModuleFedAvg: per-module FedAvg, replies in (partition-id, node) order")


def reply_order(msg: Message) -> tuple[int, float, int]:
    """The fixed order of a round's replies, whichever answered first: error replies first
    (FedAvg skips them), then by partition-id, then by node id."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return (0, 0.0, node)
    partition = reply_metrics(msg).get(PARTITION_ID)
    if not isinstance(partition, int | float):
        return (2, 0.0, node)
    return (1, float(partition), node)


DEFAULT_STRATEGY = "module-fedavg"

STRATEGIES: dict[str, type[Strategy]] = {
    "module-fedavg": ModuleFedAvg,
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedadagrad": FedAdagrad,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "qfedavg": QFedAvg,
}

_DOTTED_PATH_HELP = (
    "or a dotted path 'package.module:Class' to your own subclass of "
    "flwr.serverapp.strategy.Strategy (Message API)"
)


class UnknownStrategyError(ValueError):
    """`resolve_strategy` found no strategy by that name or dotted path (the run-config's
    `strategy` is wrong, not its options)."""


def resolve_strategy(name: str) -> type[Strategy]:
    """Return the strategy class for a registry name or a ``package.module:Class`` path.

    Registry names are matched case-insensitively. A dotted path must name an importable
    module and a concrete subclass of ``flwr.serverapp.strategy.Strategy``.

    Raises
    ------
    UnknownStrategyError (a ValueError)
        Unknown name (the message lists the valid names), or a dotted path that does not
        import, has no such attribute, or is not a concrete Message-API ``Strategy`` class.
    """
    if ":" in name:
        return _import_strategy(name)
    strategy = STRATEGIES.get(name.strip().lower())
    if strategy is None:
        raise UnknownStrategyError(
            f"Unknown strategy {name!r}. Valid names: {', '.join(STRATEGIES)}; {_DOTTED_PATH_HELP}."
        )
    return strategy


@dataclass(frozen=True)
class EdgeStrategy:
    """A strategy checked once (`check_strategy`): its class and every keyword argument but the
    cluster counts, which `build` sizes to each edge's clusters."""

    name: str  # as the run-config gives it, for the messages
    cls: type[Strategy]
    kwargs: Mapping[str, object]  # the contract's, the sampling's and the options, checked
    sized: tuple[str, ...]  # the class's arguments that are the edge's clusters (`SIZED`)

    def build(self, num_clusters: int | None) -> Strategy:
        """The strategy of an edge with `num_clusters` clusters (>= 1), its counts checked
        against them (`check_clusters`); None: the clusters are not known yet (the counts are
        not checked, and the class builds with `UNKNOWN_CLUSTERS`: its own checks run)."""
        if num_clusters is not None and (
            isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1
        ):
            raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
        kwargs = {**dict.fromkeys(self.sized, num_clusters or UNKNOWN_CLUSTERS), **self.kwargs}
        if num_clusters is not None:
            check_clusters(self.cls, kwargs, num_clusters)
        try:
            return self.cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Could not build strategy {self.name!r}: {err}") from err


# Sampling arguments of Flower's FedAvg family that are the edge's clusters: every cluster
# trains every round, and the edge waits for all of them.
SIZED = ("min_train_nodes", "min_available_nodes")
# Clusters assumed while the edge's clusters are not known (the run-config's check, before any
# node is): the counts are checked once they are known.
UNKNOWN_CLUSTERS = 1000


def check_strategy(
    name: str, *, fraction_evaluate: float, options: Mapping[str, OptionValue] | None = None
) -> EdgeStrategy:
    """The strategy `name` with its options checked, before any work; `EdgeStrategy.build`
    then gives each edge its own.

    Arguments are passed only when the class takes them (it names them, or passes its
    ``**kwargs`` on to the Flower class that declares them):
    ``fraction_train=1.0`` (every cluster trains every round), `fraction_evaluate`,
    ``min_evaluate_nodes`` = 1 (0 when `fraction_evaluate` is 0), the counts in `SIZED` = the
    edge's clusters, and what the message contract fixes: the metrics aggregation
    (`contract.aggregate_metrics`) and QFedAvg's loss key. Flower's defaults (2 nodes) would
    wait forever with a single cluster.

    Parameters
    ----------
    name : str
        A key of `STRATEGIES` or ``"package.module:Class"`` (see `resolve_strategy`).
    fraction_evaluate : float
        Fraction of clusters sampled for federated evaluation, in [0, 1].
    options : Mapping[str, OptionValue] | None
        Extra keyword arguments for the class, e.g. ``{"proximal_mu": 0.1}`` for FedProx,
        ``{"eta": 0.01}`` for FedAdam, ``{"client_learning_rate": 0.1}`` (required) for
        QFedAvg; each checked against its domain (`strategies/options.py`). Options override
        the arguments above.

    Raises
    ------
    ValueError
        A bad `fraction_evaluate`, an unknown strategy (`UnknownStrategyError`), an option the
        class does not accept (the message lists the accepted ones), an option outside its
        domain (`ConfigError`, naming it and what is valid), or a required argument that is
        neither given above nor in `options`.
    """
    if not 0.0 <= fraction_evaluate <= 1.0:
        raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate!r}")
    strategy_cls = resolve_strategy(name)

    parameters = inspect.signature(strategy_cls).parameters
    named = [
        n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def takes(arg: str) -> bool:
        """Named by the class, or passed on through its ``**kwargs`` to the Flower class that
        declares it (a user's FedAvg subclass, say)."""
        owners = FLOWER_OPTIONS[arg][0] if arg in FLOWER_OPTIONS else ()
        return arg in named or (takes_any_keyword and issubclass(strategy_cls, owners))

    options = dict(options or {})
    unknown = sorted(option for option in options if option not in named)
    if unknown and not takes_any_keyword:
        settable = [n for n in named if domain(strategy_cls, n).settable]
        raise ValueError(
            f"Strategy {name!r} ({strategy_cls.__qualname__}): "
            f"{unknown_names('option', unknown, settable)}"
        )
    kwargs = {k: v for k, v in _common_kwargs(fraction_evaluate).items() if takes(k)}
    kwargs.update(check_options(strategy_cls, options))
    sized = tuple(k for k in SIZED if k not in kwargs and takes(k))

    missing = [
        n
        for n, p in parameters.items()
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and n not in kwargs
        and n not in sized
    ]
    if missing:
        raise ValueError(
            f"Strategy {name!r} ({strategy_cls.__qualname__}) requires {', '.join(missing)}; "
            "pass them as strategy options."
        )
    return EdgeStrategy(name, strategy_cls, kwargs, sized)


def build_strategy(
    name: str,
    *,
    num_clusters: int | None,
    fraction_evaluate: float,
    options: Mapping[str, OptionValue] | None = None,
) -> Strategy:
    """`check_strategy` and `EdgeStrategy.build` in one: the strategy `name` for an edge with
    `num_clusters` clusters (None: not known yet, every option checked but the counts)."""
    checked = check_strategy(name, fraction_evaluate=fraction_evaluate, options=options)
    return checked.build(num_clusters)


def _common_kwargs(fraction_evaluate: float) -> dict[str, object]:
    """Sampling arguments of Flower's FedAvg family but the edge's clusters (`SIZED`), and what
    the message contract fixes."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": fraction_evaluate,
        # FedAvg samples max(int(fraction * N), min_evaluate_nodes): at least one cluster.
        "min_evaluate_nodes": 1 if fraction_evaluate > 0 else 0,
        # counters add up, latencies take the slowest cluster (contract.METRICS)
        "train_metrics_aggr_fn": aggregate_metrics,
        "train_loss_key": TRAIN_LOSS,  # QFedAvg's default, "train_loss", is in no reply
    }


def _import_strategy(path: str) -> type[Strategy]:
    """Import ``package.module:Class`` and check it is a concrete Message-API strategy."""
    module_name, _, attribute = path.strip().partition(":")
    if not module_name or not attribute:
        raise UnknownStrategyError(
            f"Strategy path {path!r} must have the form 'package.module:Class'."
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing user code
        raise UnknownStrategyError(
            f"Strategy path {path!r}: cannot import module {module_name!r}: {err}"
        ) from err

    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UnknownStrategyError(
                f"Strategy path {path!r}: module {module_name!r} has no attribute {attribute!r}."
            )
        target = getattr(target, part)

    if not (inspect.isclass(target) and issubclass(target, Strategy)):
        raise UnknownStrategyError(
            f"Strategy path {path!r} is {target!r}, not a subclass of "
            "flwr.serverapp.strategy.Strategy (legacy flwr.server.strategy classes use the "
            "old Ins/Res API and are not supported)."
        )
    if inspect.isabstract(target):
        abstract = ", ".join(sorted(getattr(target, "__abstractmethods__", ())))
        raise UnknownStrategyError(
            f"Strategy path {path!r}: {target.__qualname__} is abstract; implement {abstract}."
        )
    return target
