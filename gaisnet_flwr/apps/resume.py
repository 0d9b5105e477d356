"""Go on with a fine-tuning run after its last completed round (run-config `resume = true`).

A run keeps, as it goes, its run-config (config.json), each round's global modules
(rounds/round-NNN.npz) and then the round's row (metrics.json); with a strategy that keeps
state on the server between rounds, that state too (rounds/server-state-NNN.npz,
`server_state`). Submitted again with `resume = true` and the same output-dir, the ServerApp
(tier 'hierarchy') starts from the last round the folder holds: that round's modules and
server state, the rows so far, and round numbers that go on from there
(`strategies.edge.RoundOffset`). Each cluster's data shuffle is seeded by its round number
(clients/split_client.py: `round_seed`), so the resumed rounds are those an uninterrupted run
trains, bit for bit (tests/test_resume.py). A user's own strategy class is told that state
other than `SERVER_STATE` starts afresh. The deployed cloud has its own state file
(apps/cloud_app.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.recorder import round_file
from gaisnet_flwr.config import ConfigError, differing
from strategies.registry import STRATEGIES

# What a resumed run may change: it goes on in the same folder, for as many rounds as it says,
# and may watch and stop it otherwise; none of these changes what a round trains.
MAY_CHANGE = frozenset(
    {
        "resume",
        "num-rounds",
        "output-dir",
        "central-eval-every",
        "target-accuracy",
        "patience",
        "server-threads",
        "max-in-flight",
        "mlflow-tracking-uri",
    }
)
# What Flower 1.42's strategies keep on the server between rounds, by attribute: FedOpt's
# optimizer moments (FedAdam, FedYogi, FedAdagrad) and FedAvgM's momentum, and the arrays each
# last stepped from (FedAvgM's are its own aggregate, not what the cloud delivered back).
STATEFUL: tuple[type[Strategy], ...] = (FedOpt, FedAvgM)
SERVER_STATE = ("m_t", "v_t", "momentum_vector", "current_arrays")
STATE = "server-state"  # its file after each round: rounds/server-state-NNN.npz (`round_file`)


@dataclass(frozen=True)
class Resumed:
    """The last completed round of an earlier run in the same output-dir."""

    completed: int  # its round number (0: only the initial model was recorded)
    rows: list[dict[str, Any]]  # metrics.json's rows 0..completed
    modules: ArrayRecord  # the global modules after it (`edge<e>/<module>` keys)
    server_state: dict[str, np.ndarray] = field(default_factory=dict)  # `server_state`'s

    @classmethod
    def load(
        cls, output_dir: Path, run_config: dict[str, Any], num_rounds: int, stateful: bool = False
    ) -> Resumed | None:
        """The folder's last completed round, or None where it holds none (the run starts
        afresh). A folder made by another run-config (but for `MAY_CHANGE`), one that holds
        every round already, or one without the files the round needs is refused, naming why.
        `stateful`: the strategy keeps server state, so the round's state file must be there
        (the check at the boundary, which knows the strategy; read wherever it is)."""
        metrics = output_dir / "metrics.json"
        if not metrics.is_file():
            return None
        rows: list[dict[str, Any]] = json.loads(metrics.read_text())
        completed = int(rows[-1]["round"])
        path, state = round_file(output_dir, completed), round_file(output_dir, completed, STATE)
        for needed in (output_dir / "config.json", path, *([state] if stateful else [])):
            if not needed.is_file():
                raise ConfigError(
                    f"resume=true: {output_dir} is not a whole run's folder: it has "
                    f"metrics.json but no {needed.relative_to(output_dir)}; resume in the "
                    f"folder of the run to go on with, or start afresh (resume=false)"
                )
        saved = json.loads((output_dir / "config.json").read_text())
        if keys := differing(_kept(saved), _kept(run_config)):
            raise ConfigError(
                f"resume=true: {output_dir} holds a run of another run-config (it differs in "
                f"{keys}); resume with that run's values (only {sorted(MAY_CHANGE)} may "
                f"change), or start afresh in another output-dir"
            )
        if completed >= num_rounds:
            raise ConfigError(
                f"resume=true: {output_dir} holds {completed} completed round(s) already, "
                f"num-rounds={num_rounds}; give num-rounds > {completed} to go on"
            )
        with np.load(path) as data:
            modules = c.arrays_of({k: data[k] for k in data.files})
        if not state.is_file():
            return cls(completed, rows, modules)
        with np.load(state) as data:
            return cls(completed, rows, modules, {k: data[k] for k in data.files})


def check_resumable(strategy: type[Strategy]) -> None:
    """Warn where a strategy is not one of ours: state it keeps beyond `SERVER_STATE`
    starts afresh."""
    if strategy not in STRATEGIES.values():
        log(
            WARNING,
            "resume: strategy %s is resumed from the modules and its %s, if it keeps them; any "
            "other state it keeps on the server between rounds starts afresh",
            strategy.__name__,
            ", ".join(SERVER_STATE),
        )


def server_state(strategies: Mapping[int, Strategy]) -> dict[str, np.ndarray]:
    """The edges' strategies' `SERVER_STATE` as arrays by name: `edge<e>/<attribute>/<kind>/
    <name>`, a dict's keys, a list's indexes or an ArrayRecord's keys by `kind`."""
    out: dict[str, np.ndarray] = {}
    for e, strategy in strategies.items():
        for attribute in SERVER_STATE:
            value = getattr(strategy, attribute, None)
            items: list[tuple[Any, Any]]
            if isinstance(value, ArrayRecord):
                kind, items = "record", [(k, v.numpy()) for k, v in value.items()]
            elif isinstance(value, dict):
                kind, items = "dict", list(value.items())
            elif isinstance(value, list):
                kind, items = "list", list(enumerate(value))
            else:
                continue  # not kept (yet), or not a kind this file holds
            for name, array in items:
                out[c.edge_key(e, f"{attribute}/{kind}/{name}")] = np.asarray(array)
    return out


def restore_server_state(strategies: Mapping[int, Strategy], saved: Mapping[str, Any]) -> None:
    """Give the edges' strategies back what `server_state` saved."""
    grouped: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
    for e, record in c.split_edges(c.arrays_of(saved)).items():
        for key, array in record.items():
            attribute, kind, name = key.split("/", 2)
            grouped.setdefault((e, attribute, kind), {})[name] = array.numpy()
    for (e, attribute, kind), values in grouped.items():
        if kind == "record":
            value: Any = c.arrays_of(values)
        elif kind == "list":
            value = [values[str(i)] for i in range(len(values))]
        else:
            value = dict(values)
        setattr(strategies[e], attribute, value)


def _kept(run_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run_config.items() if k not in MAY_CHANGE}
