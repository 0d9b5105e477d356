"""What a person reads while a run goes: a round in one line; the numbers in the files.

Flower's `Strategy.start` logs every aggregated MetricRecord whole (with 40-odd metrics per
edge, a train round's line ran to ~2,000 characters) and, at the end, every round's metrics
again ("Final results", some 70 lines a round): run.log held 46 KB for 5 rounds. The same
numbers are in metrics.csv / metrics.json and TensorBoard (`apps/recorder.py`, which logs the
round's one-line summary). `quiet_strategy_log` drops exactly those records while the ServerApp
runs: the ones Flower's `Strategy.start` (its own source file) logs with one of the formats
below. Everything else, Flower's round markers, sampling and failure lines included, stays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import strategy as flower_strategy

# What `Strategy.start` logs (flwr 1.42) that metrics.csv holds: the aggregated metrics of each
# round's train and evaluate replies, the central evaluation, and the final report's lines.
METRIC_DUMPS = frozenset(
    {
        "\t└──> Aggregated MetricRecord: %s",
        "Initial global evaluation results: %s",
        "Global evaluation",
        "\t└──> MetricRecord: %s",
        "Final results:",
        "\t%s",
    }
)
STRATEGY_SOURCE = str(Path(flower_strategy.__file__).resolve())


class MetricDumps(logging.Filter):
    """Drops `Strategy.start`'s metric dumps (module docstring); passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in METRIC_DUMPS:
            return True
        return str(Path(record.pathname).resolve()) != STRATEGY_SOURCE


@contextmanager
def quiet_strategy_log() -> Iterator[None]:
    """Flower's logger without `Strategy.start`'s metric dumps inside the block."""
    dumps = MetricDumps()
    FLOWER_LOGGER.addFilter(dumps)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(dumps)
