"""When fine-tuning stops before `num-rounds`: "the above process iterates until the model
converges or a predefined number of rounds is reached" (paper Sec. III-C.1).

Two rules on the central accuracy (the mean over the edges' test sets), each off at 0:
`target-accuracy` stops after the first round that reaches it; `patience` stops after that
many central evaluations in a row without a better accuracy than the best so far (the initial
model's included). They read the recorded rows only, so a resumed run (apps/resume.py) goes on
counting where the stopped one was. The rows' `total-latency-s` and `total-energy-j` then give
the paper's convergence latency and energy cost.

Deployed (apps/cloud_app.py), the cloud decides, on its own rows: one per cloud round, with the
mean of the accuracies its edges report for the delivered modules (no initial model's row), and
it tells every edge that the delivery it holds is the final one. The edges never stop on their
own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord

from gaisnet_flwr.contract import ACCURACY

if TYPE_CHECKING:
    from gaisnet_flwr.config import HierarchySection


class Converged(Exception):  # noqa: N818 - an outcome, not an error
    """Raised by the central evaluation of the round that met a rule: Flower's `Strategy.start`
    has no early stop, and by then the round is complete (trained, aggregated, recorded)."""

    def __init__(self, server_round: int, arrays: ArrayRecord, why: str) -> None:
        super().__init__(f"round {server_round}: {why}")
        self.server_round = server_round
        self.arrays = arrays  # the global modules after it
        self.why = why


def stop_if_converged(
    rows: Sequence[dict[str, Any]], h: HierarchySection, server_round: int, arrays: ArrayRecord
) -> None:
    """Raise `Converged` if a rule stops fine-tuning after the last of `rows`, the record of
    round `server_round`, which ended with `arrays`."""
    if why := stop_reason(rows, h.target_accuracy, h.patience):
        raise Converged(server_round, arrays, why)


def stop_reason(
    rows: Sequence[dict[str, Any]], target_accuracy: float, patience: int
) -> str | None:
    """Why fine-tuning stops after the last of `rows` (metrics.json's), or None to go on."""
    if not rows or rows[-1]["round"] == 0 or ACCURACY not in rows[-1]:  # round 0, not evaluated
        return None
    evaluated = [float(r[ACCURACY]) for r in rows if ACCURACY in r]
    last = evaluated[-1]
    if target_accuracy and last >= target_accuracy:
        return f"central accuracy {last:.4f} reached target-accuracy {target_accuracy}"
    best = evaluated.index(max(evaluated))
    if patience and len(evaluated) - 1 - best >= patience:
        return (
            f"no better central accuracy than {evaluated[best]:.4f} in {patience} "
            f"evaluation(s) (patience {patience})"
        )
    return None
