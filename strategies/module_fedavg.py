"""Per-module FedAvg across client clusters (GaisNet HFSL, paper Sec. III-C.1).

"All fine-tuning client clusters upload the complete components of the edge model to the
edge server, and then FedAvg-based parameter aggregation is performed among the same modules
of different clusters, including prompt modules and MLP head modules with the same number."

Each array key (``prompt.0``, ``prompt.1``, ..., ``head.weight``, ``head.bias``) is its own
aggregation unit, so per-key aggregation is per-module aggregation. Beyond the paper, a cluster
may return a *subset* of the modules (e.g. only the prompts its chain trained); every module is
averaged over exactly the clusters that returned it.

The math lives in the pure function `aggregate_modules`; `ModuleFedAvg` only validates replies
and converts between Flower records and NumPy arrays.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore import log
from numpy.typing import NDArray

__all__ = ["ModuleAggregationError", "ModuleFedAvg", "aggregate_modules"]


class ModuleAggregationError(ValueError):
    """An update cannot be aggregated into the current modules.

    Attributes
    ----------
    key : str
        The array key (module) at fault.
    update_index : int | None
        Position of the offending update in the list passed to `aggregate_modules`, or
        ``None`` when the fault is not tied to one update.
    """

    def __init__(self, reason: str, *, key: str, update_index: int | None = None) -> None:
        super().__init__(reason)
        self.key = key
        self.update_index = update_index


def aggregate_modules(
    current: Mapping[str, NDArray],
    updates: Sequence[tuple[Mapping[str, NDArray], float]],
) -> dict[str, NDArray]:
    """Average every module over exactly the updates that contain it.

    For each key ``k`` of `current`, with ``S_k`` the updates that contain ``k``::

        result[k] = sum_{i in S_k} (w_i / W_k) * update_i[k],   W_k = sum_{i in S_k} w_i

    - A key no update contains keeps `current`'s value (a copy).
    - A key whose contributors all weigh 0 (``W_k == 0``) also keeps `current`'s value: there
      is no data behind any of its updates. (Flower's FedAvg divides by zero there.)
    - When every update contains every key this is exactly Flower's ``aggregate_arrayrecords``:
      same weight factors ``w_i / W`` and the same accumulation order, so the result is
      bitwise identical for the same update order.

    The sum runs in the order of `updates`. Reordering them changes the result only by float
    rounding; callers that need reproducible runs must pass updates in a fixed order
    (`ModuleFedAvg` sorts replies by ``partition-id``, then node id).

    Parameters
    ----------
    current : Mapping[str, NDArray]
        The modules sent to the clusters this round; defines the complete key set, shapes and
        dtypes.
    updates : Sequence[tuple[Mapping[str, NDArray], float]]
        ``(arrays, weight)`` per cluster; ``arrays`` holds a subset of `current`'s keys and
        ``weight`` is the cluster's ``num-examples`` (finite, >= 0).

    Returns
    -------
    dict[str, NDArray]
        Every key of `current`, in `current`'s order. Averaged keys have the dtype NumPy gives
        ``array * python_float`` (float arrays keep their dtype).

    Raises
    ------
    ModuleAggregationError
        An update holds a key that is not in `current` (unknown module), an array whose shape
        or dtype differs from `current`'s, or a negative / non-finite weight.
    """
    for index, (arrays, weight) in enumerate(updates):
        _check_update(current, arrays, weight, index)

    aggregated: dict[str, NDArray] = {}
    for key, value in current.items():
        contributors = [(arrays[key], weight) for arrays, weight in updates if key in arrays]
        total_weight = sum(weight for _, weight in contributors)
        if not contributors or total_weight == 0:
            aggregated[key] = np.array(value, copy=True)
            continue
        # Same arithmetic as flwr's aggregate_arrayrecords: scale each array by its weight
        # factor, then accumulate in place in the given order.
        accumulator: NDArray | None = None
        for array, weight in contributors:
            scaled = np.asarray(array) * (weight / total_weight)
            if accumulator is None:
                accumulator = scaled
            else:
                accumulator += scaled
        aggregated[key] = np.asarray(accumulator)
    return aggregated


def _check_update(
    current: Mapping[str, NDArray], arrays: Mapping[str, NDArray], weight: float, index: int
) -> None:
    """Raise `ModuleAggregationError` if update `index` does not fit `current`."""
    if not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight >= 0):
        raise ModuleAggregationError(
            f"update {index} has weight {weight!r}; the weight (num-examples) must be a "
            "finite number >= 0",
            key="",
            update_index=index,
        )
    for key, array in arrays.items():
        if key not in current:
            raise ModuleAggregationError(
                f"update {index} holds unknown module {key!r}; known modules: {sorted(current)}",
                key=key,
                update_index=index,
            )
        expected = current[key]
        if np.shape(array) != np.shape(expected):
            raise ModuleAggregationError(
                f"update {index}: module {key!r} has shape {np.shape(array)}, expected "
                f"{np.shape(expected)}",
                key=key,
                update_index=index,
            )
        if np.asarray(array).dtype != np.asarray(expected).dtype:
            raise ModuleAggregationError(
                f"update {index}: module {key!r} has dtype {np.asarray(array).dtype}, "
                f"expected {np.asarray(expected).dtype}",
                key=key,
                update_index=index,
            )


class ModuleFedAvg(FedAvg):
    """FedAvg per module, over the clusters that return each module (paper Sec. III-C.1).

    One Flower node is one client cluster. Takes exactly `FedAvg`'s arguments.

    Contract: a reply to a ``train`` message MUST carry

    - exactly one ``ArrayRecord`` (by convention under ``"arrays"``) holding a subset of the
      arrays this strategy sent that round, under the same keys (``prompt.<i>``,
      ``head.weight``, ``head.bias``) with the same shapes and dtypes. A key that was not sent
      is an error, not a new module;
    - exactly one ``MetricRecord`` with a scalar, finite, non-negative ``weighted_by_key``
      (default ``"num-examples"``) and the same metric keys as every other reply. A scalar
      ``"partition-id"`` in it, when present, fixes the summation order.

    Behaviour:

    - Each key is averaged, weighted by ``num-examples``, over the replies that hold it; a key
      no reply holds keeps the array sent this round. The returned ArrayRecord always holds
      every key sent, so the next round starts from a complete set of modules.
    - Replies are summed in ``(partition-id, node id)`` order (node id alone when a reply has no
      ``partition-id``), so a run does not depend on reply arrival order. When every reply holds
      every key the arrays are bitwise identical to `FedAvg.aggregate_train` on the replies in
      that order, and equal to float rounding in any other order.
    - Replies that carry an error are skipped and logged, exactly as `FedAvg` does. A malformed
      reply (not one ArrayRecord, bad weight, unknown key, wrong shape/dtype) raises
      ``InconsistentMessageReplies``, which stops the ServerApp like `FedAvg`'s own checks:
      skipping it would silently bias the average.
    - Metrics are aggregated by ``train_metrics_aggr_fn`` (Flower's weighted
      ``aggregate_metricrecords`` by default) over the replies in the same order.
    - `aggregate_train` needs the arrays of this round, so `configure_train` must run first
      (``Strategy.start`` does); otherwise ``AggregationError``.
    """

    # The arrays sent by the latest `configure_train`; the fallback for modules no cluster
    # returns, and the reference for key, shape and dtype checks.
    _sent_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the round like FedAvg, remembering the arrays sent."""
        self._sent_arrays = arrays.copy()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate each module over the replies that hold it; see the class docstring."""
        # FedAvg's own error filtering and logging; its all-replies-same-keys check is
        # replaced by `_validate_replies`, which allows subsets.
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid_replies:
            return None, None
        if self._sent_arrays is None:
            raise AggregationError(
                "ModuleFedAvg.aggregate_train needs the arrays sent this round: call "
                "`configure_train` before `aggregate_train`."
            )
        _validate_replies(valid_replies, self.weighted_by_key)
        ordered = sorted(valid_replies, key=_reply_order)
        contents = [msg.content for msg in ordered]

        current = {key: array.numpy() for key, array in self._sent_arrays.items()}
        updates = [
            (
                {key: array.numpy() for key, array in _only_arrayrecord(content).items()},
                _weight(content, self.weighted_by_key),
            )
            for content in contents
        ]
        try:
            aggregated = aggregate_modules(current, updates)
        except ModuleAggregationError as err:
            source = "" if err.update_index is None else _describe(ordered[err.update_index])
            reason = f"{err}{source}. Skipping aggregation."
            raise InconsistentMessageReplies(reason=reason) from err
        _log_coverage(current, updates)

        arrays = ArrayRecord({key: Array(np.asarray(value)) for key, value in aggregated.items()})
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics

    def summary(self) -> None:
        """Log FedAvg's summary, then the per-module behaviour."""
        super().summary()
        log(INFO, "\t└──> ModuleFedAvg (HFSL, per-module FedAvg):")
        log(INFO, "\t\t├── Each module averaged over the clusters that return it")
        log(INFO, "\t\t├── Modules no cluster returns keep the arrays sent that round")
        log(INFO, "\t\t└── Replies summed in (partition-id, node id) order")


def _only_arrayrecord(content: RecordDict) -> ArrayRecord:
    """The single ArrayRecord of a validated reply."""
    return next(iter(content.array_records.values()))


def _weight(content: RecordDict, weighted_by_key: str) -> float:
    """The scalar weight of a validated reply."""
    metrics = next(iter(content.metric_records.values()))
    return cast(float, metrics[weighted_by_key])


def _partition_id(msg: Message) -> int | float | None:
    """The scalar ``partition-id`` a reply reports, if any."""
    for metrics in msg.content.metric_records.values():
        value = metrics.get("partition-id")
        if isinstance(value, int | float):
            return value
    return None


def _reply_order(msg: Message) -> tuple[int, float, int]:
    """Sort key: replies with a partition-id first, by it, then by source node id."""
    partition_id = _partition_id(msg)
    node_id = msg.metadata.src_node_id
    if partition_id is None:
        return (1, 0.0, node_id)
    return (0, float(partition_id), node_id)


def _describe(msg: Message) -> str:
    """`` (reply from node N, partition-id P)`` for error messages."""
    partition_id = _partition_id(msg)
    suffix = "" if partition_id is None else f", partition-id {partition_id}"
    return f" (reply from node {msg.metadata.src_node_id}{suffix})"


def _validate_replies(replies: list[Message], weighted_by_key: str) -> None:
    """FedAvg's reply checks, except that ArrayRecords may hold different key subsets."""
    for msg in replies:
        num_records = len(msg.content.array_records)
        if num_records != 1:
            raise InconsistentMessageReplies(
                reason=f"Expected exactly one ArrayRecord in each reply, found {num_records}"
                f"{_describe(msg)}. Skipping aggregation."
            )
    # Flower's own MetricRecord checks: exactly one, same keys, scalar weight.
    validate_message_reply_consistency(
        replies=[msg.content for msg in replies],
        weighted_by_key=weighted_by_key,
        check_arrayrecord=False,
    )


def _log_coverage(
    current: Mapping[str, NDArray], updates: Sequence[tuple[Mapping[str, NDArray], float]]
) -> None:
    """Log how many modules were averaged over all, some, or none of the clusters."""
    counts = [sum(key in arrays for arrays, _ in updates) for key in current]
    num_full = sum(count == len(updates) for count in counts)
    num_kept = sum(count == 0 for count in counts)
    log(
        INFO,
        "aggregate_train: %d modules from all %d clusters, %d from a subset, %d kept",
        num_full,
        len(updates),
        len(counts) - num_full - num_kept,
        num_kept,
    )
