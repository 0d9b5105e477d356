"""One edge server: its strategy over its own client clusters (paper Sec. III-B, edge-end).

`EdgeServer` is a Flower strategy itself: the one-ServerApp hierarchy composes one per edge
(`strategies/cloud_edge.py`), a deployed edge process runs its own the same way (a
`CloudEdgeStrategy` over that one edge: apps/edge_app.py), and the integrated service fine-tunes
through it (`strategies/integrated.py`). It wraps the edge's pluggable strategy (any
Message-API strategy; per-module FedAvg by default) and adds what the edge owns:

  * its nodes only: the wrapped strategy sees a `GridView` of the grid with the edge's nodes;
  * each node's cluster task, attached to every message it sends (`contract.ClusterTask`);
  * the round's failures, computed here and only here: an error reply, no reply from a node
    the round was sent to, and an aggregate that is not finite (refused: the edge keeps what
    it sent);
  * its weight for the cloud: the training examples of the clusters that trained.

`GridView` is the one Grid wrapper: a subset of the nodes, and at most K messages in flight.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from gaisnet_flwr.contract import (
    AGGREGATE_REFUSED,
    CLUSTERS,
    NON_FINITE_AGGREGATE,
    ClusterTask,
    attach_task,
    failure,
    failures_of,
    num_examples,
)
from gaisnet_flwr.split.precision import non_finite
from strategies.registry import reply_order

# Between pulls. In simulation: short enough that a finished message's slot is refilled before
# the engine's next 0.1 s sweep; a pull of K ids costs O(K). Deployed, a pull is an HTTP request
# to the SuperLink: every 0.2 s, a tenth of the requests, while the SuperNodes ask for work only
# every 3 s (flwr 1.42); Flower's own deployed grid waits 3 s between pulls.
PULL_INTERVAL_S = 0.02
DEPLOYED_PULL_INTERVAL_S = 0.2


def is_http_grid(grid: Grid) -> bool:
    """Whether `grid` is Flower's deployed grid, which reaches its SuperLink over HTTP. Its
    module is looked up, not imported: a deployed ServerApp has imported it to make the grid,
    and importing it elsewhere took 0.7 s on this project's 2-core CPU."""
    http_grid = sys.modules.get("flwr.superlink.grid.http_grid")
    return http_grid is not None and isinstance(grid, http_grid.HttpGrid)


class GridView(Grid):
    """`grid` as one part of the ServerApp sees it: only `nodes` (all when None), and in
    simulation at most `max_in_flight` messages of a `send_and_receive` in flight (0: Flower's
    own, all at once).

    Why the window: Flower's simulation engine asks its LinkState every 0.1 s for each node's
    next message, and each ask scans every stored message (flwr 1.42,
    `vce_api.add_messages_to_queue` -> `InMemoryLinkState.get_message_ins`): with a round's N
    messages stored a sweep costs O(N^2) (about 2 s at N = 1000 on this project's CPU), under
    the LinkState's lock. With K in flight it costs O(N K). The window pushes the first K
    messages with the grid's own `push_messages`, pulls every `pull_interval_s`, and tops up as
    replies come in, until every message has its reply or the timeout passes; replies come back
    in the order they arrive, as Flower's do.

    Deployed (Flower's HttpGrid) every SuperNode is a device of its own, and a window would only
    make devices wait their turn: every message goes out at once, and replies are pulled every
    `DEPLOYED_PULL_INTERVAL_S`.
    """

    def __init__(
        self,
        grid: Grid,
        nodes: Iterable[int] | None = None,
        max_in_flight: int = 0,
        pull_interval_s: float | None = None,
    ) -> None:
        if max_in_flight < 0:
            raise ValueError(f"max-in-flight={max_in_flight} must be >= 0 (0 = no limit)")
        self.grid = grid
        self.nodes = None if nodes is None else sorted(nodes)
        self.deployed = is_http_grid(grid)
        self.max_in_flight = 0 if self.deployed else max_in_flight
        default_interval = DEPLOYED_PULL_INTERVAL_S if self.deployed else PULL_INTERVAL_S
        self.pull_interval_s = default_interval if pull_interval_s is None else pull_interval_s

    # -- the wrapped Grid -----------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids() if self.nodes is None else list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # -- the window -----------------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        if self.max_in_flight == 0 and not self.deployed:
            return self.grid.send_and_receive(messages, timeout=timeout)
        waiting = list(messages)  # sent in the caller's order
        window = self.max_in_flight or len(waiting)
        deadline = None if timeout is None else time.monotonic() + timeout
        in_flight: set[str] = set()
        replies: list[Message] = []
        while waiting or in_flight:
            if (room := window - len(in_flight)) > 0 and waiting:
                in_flight.update(self.grid.push_messages(waiting[:room]))
                del waiting[:room]
            got = list(self.grid.pull_messages(in_flight)) if in_flight else []
            replies += got
            in_flight.difference_update(m.metadata.reply_to_message_id for m in got)
            if deadline is not None and time.monotonic() >= deadline:
                break  # as Flower's: what has no reply by now gets none
            if in_flight and (not got or not waiting):
                time.sleep(self.pull_interval_s)
        return replies


@dataclass
class EdgeRound:
    """What one edge's latest training round came to."""

    sent: list[int] = field(default_factory=list)  # the nodes it was sent to
    failures: list[dict[str, int | str]] = field(default_factory=list)
    trained: int = 0  # clusters that replied with modules
    weight: float = 0.0  # their training examples (0 when the aggregate was refused)


class EdgeServer(Strategy):
    """Edge server `edge`: `strategy` over the clusters in `tasks` (node id -> its task)."""

    def __init__(self, edge: int, strategy: Strategy, tasks: Mapping[int, ClusterTask]) -> None:
        if not tasks:
            raise ValueError(f"edge {edge} has no client cluster")
        self.edge = edge
        self.strategy = strategy
        self.tasks = dict(sorted(tasks.items()))
        self.last = EdgeRound()

    @property
    def nodes(self) -> list[int]:
        """The edge's nodes (client clusters), in id order."""
        return list(self.tasks)

    def _with_tasks(self, messages: Iterable[Message]) -> list[Message]:
        return [attach_task(m, self.tasks[m.metadata.dst_node_id]) for m in messages]

    # -- train ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        view = GridView(grid, self.nodes)
        messages = self.strategy.configure_train(
            server_round, arrays, ConfigRecord(dict(config)), view
        )
        messages = self._with_tasks(messages)
        self.last = EdgeRound(sent=sorted(m.metadata.dst_node_id for m in messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's aggregate; None when no cluster trained or the aggregate is not
        finite (the edge keeps its modules). The metrics: `aggregate-refused` (if so), the
        clusters that trained, and the strategy's own numbers."""
        replies = list(replies)
        # A failed cluster costs its own contribution: the round goes on with the others.
        failures = failures_of(replies, self.last.sent, self.edge)
        log_failures(f"round {server_round}: edge {self.edge}", failures)
        # The failures are this edge's to report (once per reason, above); the strategy gets
        # the replies that carry modules (Flower's would log each error again), in a fixed
        # order whichever cluster answered first: float sums then do not depend on it, for any
        # strategy (Flower's FedAdam under `flwr run` differed in the last bits run to run).
        ok = sorted((r for r in replies if not r.has_error()), key=reply_order)
        arrays, metrics = self.strategy.aggregate_train(server_round, ok)
        weight = float(sum(num_examples(r) for r in ok))
        out: dict[str, float | int] = {}
        if arrays is not None and (bad := non_finite({k: v.numpy() for k, v in arrays.items()})):
            reason = (
                f"edge {self.edge}'s aggregate is not finite (NaN or inf in {bad[:4]}); the edge "
                f"keeps its previous modules"
            )
            log(WARNING, "round %d: %s", server_round, reason)
            failures.append(failure(-1, self.edge, NON_FINITE_AGGREGATE, reason))
            out[AGGREGATE_REFUSED] = 1
            arrays, weight = None, 0.0
        out[CLUSTERS] = len(ok)
        out.update((k, v) for k, v in (metrics or {}).items() if isinstance(v, int | float))
        self.last = EdgeRound(self.last.sent, failures, len(ok), weight)
        return arrays, MetricRecord(out)  # type: ignore[arg-type]

    # -- evaluate -------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        view = GridView(grid, self.nodes)
        config = ConfigRecord(dict(config))
        return self._with_tasks(
            self.strategy.configure_evaluate(server_round, arrays, config, view)
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        failed = failures_of([r for r in replies if r.has_error()], [], self.edge)
        log_failures(f"round {server_round}: edge {self.edge}'s evaluation", failed)
        return self.strategy.aggregate_evaluate(
            server_round, sorted((r for r in replies if not r.has_error()), key=reply_order)
        )

    def summary(self) -> None:
        log(INFO, "\t├── edge %d: %d cluster(s), strategy:", self.edge, len(self.tasks))
        self.strategy.summary()


def log_failures(what: str, failures: list[dict[str, int | str]], shown: int = 3) -> None:
    """One warning per distinct reason, however many clusters share it: a failure every cluster
    meets (1000 clusters) is one line, not a thousand."""
    by_reason: dict[str, list[int | str]] = {}
    for f in failures:
        by_reason.setdefault(str(f["reason"]), []).append(f["node"])
    for reason, nodes in by_reason.items():
        more = f" and {len(nodes) - shown} more" if len(nodes) > shown else ""
        log(
            WARNING,
            "%s: %d cluster(s) left out (node %s%s): %s",
            what,
            len(nodes),
            ", ".join(str(n) for n in nodes[:shown]),
            more,
            reason,
        )


class RoundOffset(Strategy):
    """`strategy` run `offset` rounds on: Flower's `Strategy.start` numbers its rounds from 1,
    while a deployed edge server runs the hierarchy's rounds first..last of each cloud round
    (apps/edge_app.py). The wrapped strategy sees the hierarchy's round numbers (the seeds of
    its clusters' training follow them), and so does `evaluate_fn` (`evaluate`)."""

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy = strategy
        self.offset = offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def evaluate(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]
    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """`evaluate_fn` called with the hierarchy's round numbers."""
        return lambda server_round, arrays: evaluate_fn(server_round + self.offset, arrays)

    def summary(self) -> None:
        log(INFO, "\t├── rounds %d and on of the hierarchy", self.offset + 1)
        self.strategy.summary()
