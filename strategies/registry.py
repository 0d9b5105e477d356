"""Strategy registry: a name or a dotted path in run-config -> a built Flower strategy.

Every edge aggregates its clusters with a pluggable Message-API strategy
(``flwr.serverapp.strategy.Strategy``): one of the names in `STRATEGIES`, or a user's own class
given as ``"package.module:Class"``. `build_strategy` runs before any training and raises
``ValueError`` for anything it cannot build, so a typo fails at start-up, not in round 1.

The default, ``"module-fedavg"``, is the paper's per-module FedAvg (`ModuleFedAvg`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
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
from strategies.options import OptionValue, check_clusters, check_options, declares, domain

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "ModuleFedAvg", "build_strategy", "resolve_strategy"]


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
        ordered = sorted(replies, key=_reply_order)
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


def _reply_order(msg: Message) -> tuple[int, float, int]:
    """Error replies first (FedAvg skips them), then by partition-id, then by node id."""
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


def resolve_strategy(name: str) -> type[Strategy]:
    """Return the strategy class for a registry name or a ``package.module:Class`` path.

    Registry names are matched case-insensitively. A dotted path must name an importable
    module and a concrete subclass of ``flwr.serverapp.strategy.Strategy``.

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid names), or a dotted path that does not
        import, has no such attribute, or is not a concrete Message-API ``Strategy`` class.
    """
    if ":" in name:
        return _import_strategy(name)
    strategy = STRATEGIES.get(name.strip().lower())
    if strategy is None:
        raise ValueError(
            f"Unknown strategy {name!r}. Valid names: {', '.join(STRATEGIES)}; {_DOTTED_PATH_HELP}."
        )
    return strategy


def build_strategy(
    name: str,
    *,
    num_clusters: int | None,
    fraction_evaluate: float,
    options: Mapping[str, OptionValue] | None = None,
) -> Strategy:
    """Build the strategy `name` for an edge with `num_clusters` clusters (Flower nodes), or
    for an edge whose clusters are not known yet (None: every option checked but the counts).

    Common arguments are passed only when the class's ``__init__`` names them:
    ``fraction_train=1.0`` (every cluster trains every round), `fraction_evaluate`,
    ``min_train_nodes=num_clusters``, ``min_available_nodes=num_clusters`` and
    ``min_evaluate_nodes`` = 1 (0 when `fraction_evaluate` is 0), and what the message contract
    fixes: the metrics aggregation (`contract.aggregate_metrics`) and QFedAvg's loss key.
    Flower's defaults (2 nodes) would wait forever with a single cluster.

    Parameters
    ----------
    name : str
        A key of `STRATEGIES` or ``"package.module:Class"`` (see `resolve_strategy`).
    num_clusters : int | None
        Clusters (Flower nodes) the strategy aggregates; >= 1, or None while not known.
    fraction_evaluate : float
        Fraction of clusters sampled for federated evaluation, in [0, 1].
    options : Mapping[str, OptionValue] | None
        Extra keyword arguments for the class, e.g. ``{"proximal_mu": 0.1}`` for FedProx,
        ``{"eta": 0.01}`` for FedAdam, ``{"client_learning_rate": 0.1}`` (required) for
        QFedAvg; each checked against its domain (`strategies/options.py`). Options override
        the common arguments above.

    Raises
    ------
    ValueError
        Bad `num_clusters` / `fraction_evaluate`, an unknown strategy, an option the class
        does not accept (the message lists the accepted ones), an option outside its domain
        (`ConfigError`, naming it and what is valid), a required argument that is neither
        common nor in `options`, counts the edge's clusters cannot meet, or the class
        rejecting its arguments.
    """
    known = num_clusters is not None
    if known and (
        isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1
    ):
        raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
    if not 0.0 <= fraction_evaluate <= 1.0:
        raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate!r}")
    strategy_cls = resolve_strategy(name)

    parameters = inspect.signature(strategy_cls).parameters
    by_keyword = {
        param_name: param
        for param_name, param in parameters.items()
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    }
    takes_any_keyword = any(param.kind is param.VAR_KEYWORD for param in parameters.values())

    options = dict(options or {})
    unknown = sorted(option for option in options if option not in by_keyword)
    if unknown and not takes_any_keyword:
        settable = [n for n in by_keyword if domain(strategy_cls, n).settable]
        raise ValueError(
            f"Strategy {name!r} ({strategy_cls.__qualname__}): "
            f"{unknown_names('option', unknown, settable)}"
        )
    checked = check_options(strategy_cls, options)

    sized = num_clusters if num_clusters is not None else UNKNOWN_CLUSTERS
    common = _common_kwargs(sized, fraction_evaluate)
    kwargs: dict[str, object] = {k: v for k, v in common.items() if declares(strategy_cls, k)}
    kwargs.update(checked)

    missing = [
        param_name
        for param_name, param in parameters.items()
        if param.default is param.empty
        and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        and param_name not in kwargs
    ]
    if missing:
        raise ValueError(
            f"Strategy {name!r} ({strategy_cls.__qualname__}) requires {', '.join(missing)}; "
            "pass them as strategy options."
        )
    if num_clusters is not None:
        check_clusters(strategy_cls, kwargs, num_clusters)

    try:
        return strategy_cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Could not build strategy {name!r}: {err}") from err


# Clusters assumed while the edge's clusters are not known (the run-config's check, before any
# node is): the counts are checked once they are known.
UNKNOWN_CLUSTERS = 1000


def _common_kwargs(num_clusters: int, fraction_evaluate: float) -> dict[str, object]:
    """Sampling arguments of Flower's FedAvg family, sized to `num_clusters`, and what the
    message contract fixes."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": num_clusters,
        # FedAvg samples max(int(fraction * N), min_evaluate_nodes): at least one cluster.
        "min_evaluate_nodes": 1 if fraction_evaluate > 0 else 0,
        "min_available_nodes": num_clusters,
        # counters add up, latencies take the slowest cluster (contract.METRICS)
        "train_metrics_aggr_fn": aggregate_metrics,
        "train_loss_key": TRAIN_LOSS,  # QFedAvg's default, "train_loss", is in no reply
    }


def _import_strategy(path: str) -> type[Strategy]:
    """Import ``package.module:Class`` and check it is a concrete Message-API strategy."""
    module_name, _, attribute = path.strip().partition(":")
    if not module_name or not attribute:
        raise ValueError(f"Strategy path {path!r} must have the form 'package.module:Class'.")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing user code
        raise ValueError(
            f"Strategy path {path!r}: cannot import module {module_name!r}: {err}"
        ) from err

    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(
                f"Strategy path {path!r}: module {module_name!r} has no attribute {attribute!r}."
            )
        target = getattr(target, part)

    if not (inspect.isclass(target) and issubclass(target, Strategy)):
        raise ValueError(
            f"Strategy path {path!r} is {target!r}, not a subclass of "
            "flwr.serverapp.strategy.Strategy (legacy flwr.server.strategy classes use the "
            "old Ins/Res API and are not supported)."
        )
    if inspect.isabstract(target):
        abstract = ", ".join(sorted(getattr(target, "__abstractmethods__", ())))
        raise ValueError(
            f"Strategy path {path!r}: {target.__qualname__} is abstract; implement {abstract}."
        )
    return target
