"""What each strategy option may hold, checked at start-up against the class that takes it.

Run-config `strategy-options` ("proximal_mu=0.1, eta=0.01", TOML values) become keyword
arguments of the edge's strategy class. Flower's classes store what they are given: with
``proximal_mu=-1`` FedProx trains and ends "completed", a string reaches the ClientApp and fails
every cluster, ``min_available_nodes=-1`` passes. So every option is checked here, before any
data is read or model trained, and a refusal names the option, the value and what is valid:

* an option Flower's own classes declare (`FLOWER_OPTIONS`: the registry's classes and any
  subclass of the class that declares it) has the type and range that class's docstring states,
  or, where it states none, the one its arithmetic needs (a learning rate > 0, a momentum in
  [0, 1)); the docs table (`options_table`) lists them;
* the record keys and the loss key are fixed by the message contract: our replies carry
  ``num-examples`` and ``train-loss``, our messages ``arrays`` and ``config``;
* a function (a metrics aggregation, Bulyan's selection rule) cannot come from a run-config;
* another class's own parameter (a strategy given by dotted path) is checked against its type
  annotation, or the type of its default; its range is not known here, and `Domain.describe`
  says so (the class checks it, if at all); an option a class only takes through ``**kwargs``
  is passed as given;
* counts relate to the edge's clusters, known once the nodes are (`check_clusters`): a minimum
  above them makes the edge wait forever, a fraction that samples none trains nothing.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from gaisnet_flwr.config import ConfigError, Option, cast_scalar
from gaisnet_flwr.contract import ARRAYS, CONFIG, NUM_EXAMPLES, TRAIN_LOSS

OptionValue = float | int | str | bool
SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Domain:
    """What one option may hold: a type (None: not known), a range or choices (None: not known),
    or nothing at all (`fixed`: why it cannot be set from a run-config)."""

    kind: type | None
    rule: Option | None = None
    fixed: str = ""
    source: str = ""  # where the type and range come from, for the messages and the docs

    @property
    def settable(self) -> bool:
        """Whether a run-config can choose it: not fixed, and more than one value allowed."""
        return not self.fixed and not (self.rule is not None and len(self.rule.choices) == 1)

    def check(self, name: str, value: Any) -> Any:
        """`value` cast to the type (an int where a float is wanted); ConfigError naming the
        option and what is valid otherwise."""
        if self.fixed:
            raise ConfigError(f"{name} cannot be set in strategy-options: {self.fixed}")
        if self.kind is None:
            return value
        wrong = ConfigError(f"{name}={value!r} is not valid: must be {self.describe()}")
        if self.kind is not str and isinstance(value, str):
            raise wrong
        try:
            value = cast_scalar(name, value, self.kind)
        except ConfigError:
            raise wrong from None
        if self.rule is not None:
            try:
                self.rule.check_item(name, value)
            except ConfigError as err:
                raise ConfigError(f"{err} ({self.rule.doc})") from None
        return value

    def describe(self) -> str:
        """The domain in words: "a float >= 0", "'num-examples' (fixed by ...)", ..."""
        if self.fixed:
            return f"not settable ({self.fixed})"
        if self.kind is None:
            return "any value (type not known: passed as given)"
        kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.rule is None:
            return f"{kind} ({self.source}; range not known here: the class checks it, if at all)"
        if self.rule.choices:
            return f"{' or '.join(repr(c) for c in self.rule.choices)} ({self.rule.doc})"
        bounds = self.rule.bounds()
        return f"{kind} {bounds} ({self.rule.doc})" if bounds else f"{kind} ({self.rule.doc})"


def _number(doc: str, kind: type = float, **bounds: Any) -> Domain:
    return Domain(kind, Option(doc, **bounds), source="Flower's docstring")


def _fixed_key(value: str, why: str) -> Domain:
    return Domain(str, Option(why, choices=(value,)), source="the message contract")


FED_OPT = (FedAdagrad, FedAdam, FedYogi)  # Flower's FedOpt family (FedOpt is not exported)
_FUNCTION = "a function; a run-config holds numbers, strings and booleans only"

# Flower's own options: (the classes that declare it, its domain). Ranges from the docstrings of
# flwr 1.42's flwr/serverapp/strategy/*.py; where a docstring states none, what the arithmetic
# needs (said in the doc).
FLOWER_OPTIONS: dict[str, tuple[tuple[type[Strategy], ...], Domain]] = {
    "fraction_train": (
        (FedAvg,),
        _number(
            "share of the edge's clusters that train each round; 0 would train none",
            low=0,
            high=1,
            low_open=True,
        ),
    ),
    "fraction_evaluate": (
        (FedAvg,),
        _number("share of the edge's clusters in federated evaluation", low=0, high=1),
    ),
    "min_train_nodes": ((FedAvg,), _number("clusters that train at least", int, low=0)),
    "min_evaluate_nodes": ((FedAvg,), _number("clusters that evaluate at least", int, low=0)),
    "min_available_nodes": ((FedAvg,), _number("clusters the edge waits for", int, low=0)),
    "weighted_by_key": (
        (FedAvg,),
        _fixed_key(NUM_EXAMPLES, "the weight every cluster's reply carries"),
    ),
    "arrayrecord_key": ((FedAvg,), _fixed_key(ARRAYS, "the record the ClientApp reads")),
    "configrecord_key": ((FedAvg,), _fixed_key(CONFIG, "the record the ClientApp reads")),
    "train_metrics_aggr_fn": ((FedAvg,), Domain(None, fixed=_FUNCTION)),
    "evaluate_metrics_aggr_fn": ((FedAvg,), Domain(None, fixed=_FUNCTION)),
    "selection_rule": ((Bulyan,), Domain(None, fixed=_FUNCTION)),
    "proximal_mu": ((FedProx,), _number("FedProx: the weight of the proximal term", low=0)),
    "eta": (
        FED_OPT,
        _number("FedAdam/-Adagrad/-Yogi: the server-side learning rate", low=0, low_open=True),
    ),
    "eta_l": (
        FED_OPT,
        _number("FedAdam/-Adagrad/-Yogi: the client-side learning rate", low=0, low_open=True),
    ),
    "beta_1": (FED_OPT, _number("FedAdam/-Adagrad/-Yogi: momentum", low=0, high=1, high_open=True)),
    "beta_2": (
        FED_OPT,
        _number("FedAdam/-Adagrad/-Yogi: second moment", low=0, high=1, high_open=True),
    ),
    "tau": (
        FED_OPT,
        _number("FedAdam/-Adagrad/-Yogi: degree of adaptability", low=0, low_open=True),
    ),
    "server_learning_rate": (
        (FedAvgM,),
        _number("FedAvgM: the server-side learning rate", low=0, low_open=True),
    ),
    "server_momentum": (
        (FedAvgM,),
        _number("FedAvgM: the server-side momentum", low=0, high=1, high_open=True),
    ),
    "beta": (
        (FedTrimmedAvg,),
        _number("FedTrimmedAvg: fraction cut off each tail", low=0, high=0.5, high_open=True),
    ),
    "num_malicious_nodes": (
        (MultiKrum, Bulyan),
        _number("Krum, Bulyan: malicious clusters tolerated", int, low=0),
    ),
    "num_nodes_to_select": (
        (MultiKrum,),
        _number("MultiKrum: clusters averaged after selection", int, low=1),
    ),
    "client_learning_rate": (
        (QFedAvg,),
        _number("QFedAvg: the clients' learning rate (L = 1 / it)", low=0, low_open=True),
    ),
    "q": ((QFedAvg,), _number("QFedAvg: fairness; 0 is FedAvg", low=0)),
    "train_loss_key": (
        (QFedAvg,),
        _fixed_key(TRAIN_LOSS, "the training loss every cluster's reply carries"),
    ),
}


def domain(strategy_cls: type[Strategy], name: str) -> Domain:
    """The domain of option `name` of `strategy_cls` (see the module docstring)."""
    declared = FLOWER_OPTIONS.get(name)
    if declared is not None and issubclass(strategy_cls, declared[0]):
        return declared[1]
    parameter = inspect.signature(strategy_cls).parameters.get(name)
    if parameter is None:  # taken through **kwargs
        return Domain(None, source="not in the signature")
    try:
        hint = typing.get_type_hints(strategy_cls.__init__).get(name, parameter.annotation)
    except Exception:  # noqa: BLE001 - a hint that does not resolve: read the default instead
        hint = parameter.annotation
    return _from_hint(hint, parameter.default)


def _from_hint(hint: Any, default: Any) -> Domain:
    """A domain from a type annotation (X, X | None, Literal[...]) or else the default's type."""
    args = [a for a in typing.get_args(hint) if a is not NoneType]
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0] if len(args) == 1 else hint  # X | None: X; a wider union: not known
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if all(isinstance(c, str) for c in choices):
            return Domain(str, Option("its annotation", choices=choices), source="annotation")
    if hint in SCALARS:
        return Domain(hint, source="from its annotation")
    if typing.get_origin(hint) in (Callable, typing.Callable) or hint is Callable:
        return Domain(None, fixed=_FUNCTION)
    if hint is inspect.Parameter.empty and type(default) in SCALARS:
        return Domain(type(default), source="from its default")
    return Domain(None, source="no annotation or default of a plain type")


def check_options(
    strategy_cls: type[Strategy], options: Mapping[str, OptionValue]
) -> dict[str, OptionValue]:
    """Every option checked against its domain and cast (ConfigError naming the first bad one)."""
    return {name: domain(strategy_cls, name).check(name, v) for name, v in options.items()}


def unknown_ranges(strategy_cls: type[Strategy], options: Mapping[str, Any]) -> list[str]:
    """What cannot be known about the given options: "name: why", one per option whose range
    (or type) is not declared anywhere this module can read."""
    notes = []
    for name in options:
        d = domain(strategy_cls, name)
        if d.settable and (d.kind is None or d.rule is None):
            notes.append(f"{name}: {d.describe()}")
    return notes


def check_clusters(
    strategy_cls: type[Strategy], kwargs: Mapping[str, Any], num_clusters: int
) -> None:
    """The counts against the edge's `num_clusters` clusters (ConfigError with the reason)."""
    for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        count = kwargs.get(name)
        if isinstance(count, int) and count > num_clusters:
            raise ConfigError(
                f"{name}={count} is more than the edge's {num_clusters} cluster(s): the edge "
                f"would wait for them forever; must be <= {num_clusters}"
            )
    fraction = kwargs.get("fraction_train")
    if isinstance(fraction, float) and issubclass(strategy_cls, FedAvg):
        sampled = max(int(fraction * num_clusters), int(kwargs.get("min_train_nodes", 0)))
        if sampled < 1:
            raise ConfigError(
                f"fraction_train={fraction} of {num_clusters} cluster(s) samples none to train "
                f"(FedAvg samples int(fraction x clusters)); raise it to >= "
                f"{1 / num_clusters:.3g} or set min_train_nodes >= 1"
            )
    selected = kwargs.get("num_nodes_to_select")
    if (
        isinstance(selected, int)
        and issubclass(strategy_cls, MultiKrum)
        and (selected > num_clusters)
    ):
        raise ConfigError(
            f"num_nodes_to_select={selected} is more than the edge's {num_clusters} cluster(s)"
        )
    malicious = kwargs.get("num_malicious_nodes", 0)
    if not isinstance(malicious, int):
        return
    # Bulyan skips every round with fewer than 4f + 3 replies (El Mhamdi et al., 2018); Krum's
    # guarantee needs n >= 2f + 3 (Blanchard et al., 2017), which Flower does not check.
    if issubclass(strategy_cls, Bulyan):
        required, rule, why = 4 * malicious + 3, "4", "it would skip every round"
    elif issubclass(strategy_cls, MultiKrum) and malicious:
        required, rule, why = 2 * malicious + 3, "2", "its selection would not hold"
    else:
        return
    if num_clusters < required:
        raise ConfigError(
            f"num_malicious_nodes={malicious}: {strategy_cls.__name__} needs at least {rule} * "
            f"num_malicious_nodes + 3 = {required} clusters per edge, got {num_clusters}; {why}"
        )


def options_table() -> str:
    """The docs' table of Flower's options (docs/configure.md, kept equal by a test)."""
    rows = ["| option | strategies | valid |", "|---|---|---|"]
    for name, (owners, d) in FLOWER_OPTIONS.items():
        classes = ", ".join(o.__name__ for o in owners)
        if owners == (FedAvg,):
            classes = "all (FedAvg's)"
        rows.append(f"| `{name}` | {classes} | {d.describe()} |")
    return "\n".join(rows)
