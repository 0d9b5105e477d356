"""Seeds, spreads and verdicts, and the paper's Section V reference numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# The paper's Section V numbers (ViT-B/16 on Oxford Flowers, RTX 4060, lr 0.001, batch 10,
# train:val 4:1), as quoted in the paper's Section V text. These are the reference
# the report compares against, never results of ours.
PAPER: dict[str, Any] = {
    "fig6_pretrained_epoch1": 0.968,
    "fig6_pretrained_epoch10": 0.975,
    "fig6_random_converged": 0.570,
    "fig7_prompt_epoch_s": 35.0,
    "fig7_full_epoch_s": 210.0,
    # Table III: classes in the fine-tuning data -> (first, end) accuracy
    "table3": {
        1: (0.200, 0.200),
        2: (0.397, 0.397),
        3: (0.575, 0.595),
        4: (0.753, 0.767),
        5: (0.933, 0.967),
    },  # fmt: skip
    "table5": {"rs": -75.0, "msip": 500.0, "mlcp": 650.0},
}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, sd


def pm(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± sd' over seeds, e.g. '0.612 ± 0.014' (scale=100: points)."""
    mean, sd = mean_sd([scale * v for v in values])
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def beyond_noise(effects: Sequence[float]) -> bool:
    """Whether per-seed effects (differences measured seed by seed) stand out of their own
    spread: |mean| > 2 sd. With identical effects (sd 0) any non-zero mean does."""
    mean, sd = mean_sd(effects)
    return abs(mean) > 2 * sd and mean != 0


def verdict(effects: Sequence[float], paper_sign: int) -> str:
    """'agrees' / 'differs' with the paper's direction (`paper_sign` +1 or -1) when the
    per-seed effects exceed their spread (`beyond_noise`), else 'within noise'."""
    if not beyond_noise(effects):
        return "within noise"
    return "agrees" if mean_sd(effects)[0] * paper_sign > 0 else "differs"


NOISE_RULE = (
    "A verdict compares per-seed effects with their own spread: *agrees* or *differs* (with the "
    "paper's direction) only when |mean| > 2 sd over the seeds, else *within noise*."
)
