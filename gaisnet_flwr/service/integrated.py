"""The integrated service's learning curve: how much one fine-tuning round is worth.

Paper Sec. IV-C and V-F. The integrated strategy (`strategies/integrated.py`) asks the
scheduler each round whether to fine-tune an edge model or serve a request; the scheduler's
prediction of what fine-tuning edge e achieves rests on the gain fitted here from the
improvements measured so far.
"""

from __future__ import annotations

PRIOR_GAIN = 0.3  # fraction of the accuracy gap one round closes, until measured


def fitted_gain(history: list[tuple[float, float]]) -> float:
    """Mean measured fraction of the gap closed per fine-tuning round, clipped to [0.01, 0.9]."""
    if not history:
        return PRIOR_GAIN
    fractions = [(after - before) / max(1e-6, 1.0 - before) for before, after in history]
    return min(0.9, max(0.01, sum(fractions) / len(fractions)))
