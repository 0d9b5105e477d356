"""Flower strategies for GaisNet: per-module FedAvg and a registry for pluggable strategies."""

from .module_fedavg import ModuleAggregationError, ModuleFedAvg, aggregate_modules
from .registry import DEFAULT_STRATEGY, STRATEGIES, build_strategy, resolve_strategy

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "ModuleAggregationError",
    "ModuleFedAvg",
    "aggregate_modules",
    "build_strategy",
    "resolve_strategy",
]
