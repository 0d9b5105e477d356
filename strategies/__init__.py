"""Flower strategies for GaisNet: one edge server's round, the cloud-edge hierarchy, serving, the
integrated service, and the registry of the edges' pluggable strategies."""

from .registry import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    EdgeStrategy,
    ModuleFedAvg,
    build_strategy,
    check_strategy,
    resolve_strategy,
)

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "EdgeStrategy",
    "ModuleFedAvg",
    "build_strategy",
    "check_strategy",
    "resolve_strategy",
]
