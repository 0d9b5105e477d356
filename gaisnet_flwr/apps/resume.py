"""Go on with a fine-tuning run after its last completed round (run-config `resume = true`).

A run keeps, as it goes, its run-config (config.json), each round's global modules
(rounds/round-NNN.npz) and then the round's row (metrics.json). Submitted again with
`resume = true` and the same output-dir, the ServerApp (tier 'hierarchy') starts from the last
round the folder holds: that round's modules, the rows so far, and round numbers that go on
from there (`strategies.edge.RoundOffset`). Each cluster's data shuffle is seeded by its round
number (clients/split_client.py: `round_seed`), so the resumed rounds are those an
uninterrupted run trains, bit for bit (tests/test_resume.py). What a strategy keeps on the
server between rounds is not in the folder: the strategies whose server optimizer carries
state (FedAdam, FedYogi, FedAdagrad, FedAvgM) are refused, and a user's own class is told that
its state, if any, starts afresh. The deployed cloud has its own state file (apps/cloud_app.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from gaisnet_flwr import contract as c
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
# Flower strategies that keep server state between rounds (an optimizer's moments, momentum).
STATEFUL: tuple[type[Strategy], ...] = (FedOpt, FedAvgM)


@dataclass(frozen=True)
class Resumed:
    """The last completed round of an earlier run in the same output-dir."""

    completed: int  # its round number (0: only the initial model was recorded)
    rows: list[dict[str, Any]]  # metrics.json's rows 0..completed
    modules: ArrayRecord  # the global modules after it (`edge<e>/<module>` keys)

    @classmethod
    def load(cls, output_dir: Path, run_config: dict[str, Any], num_rounds: int) -> Resumed | None:
        """The folder's last completed round, or None where it holds none (the run starts
        afresh). A folder made by another run-config (but for `MAY_CHANGE`), or one that holds
        every round already, is refused, naming why."""
        metrics = output_dir / "metrics.json"
        if not metrics.is_file():
            return None
        rows: list[dict[str, Any]] = json.loads(metrics.read_text())
        completed = int(rows[-1]["round"])
        path = output_dir / "rounds" / f"round-{completed:03d}.npz"
        for needed in (output_dir / "config.json", path):
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
        return cls(completed, rows, modules)


def check_resumable(strategy: type[Strategy]) -> None:
    """Refuse a strategy whose server state a resumed run would lose; warn for a user's own."""
    if issubclass(strategy, STATEFUL):
        raise ConfigError(
            f"resume=true: strategy {strategy.__name__} keeps server state between rounds "
            f"(its optimizer's moments or momentum), which the run's folder does not hold; a "
            f"resumed run would start it afresh. Resumable: "
            f"{sorted(n for n, s in STRATEGIES.items() if not issubclass(s, STATEFUL))}"
        )
    if strategy not in STRATEGIES.values():
        log(
            WARNING,
            "resume: strategy %s is resumed from the modules alone; any state it keeps on the "
            "server between rounds starts afresh",
            strategy.__name__,
        )


def _kept(run_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run_config.items() if k not in MAY_CHANGE}
