"""A Grid that keeps at most K messages in flight: Flower's loop stays cheap at thousands of
client clusters.

Flower's `send_and_receive` pushes a whole round at once and then pulls every 0.1 s (simulation;
3 s in a deployment). The simulation engine, meanwhile, asks its LinkState every 0.1 s for each
node's next message, and each ask scans every stored message (flwr 1.42,
`vce_api.add_messages_to_queue` -> `InMemoryLinkState.get_message_ins`): with all N messages of a
round stored, one sweep costs O(N^2) (21 ms at N = 100, 195 ms at 300, about 2 s at 1000 on this
project's CPU), all under the LinkState's lock. With K in flight a sweep costs O(N K).

`InFlightWindow` wraps whatever Grid the ServerApp is given and implements `send_and_receive`
with the Grid's own `push_messages` / `pull_messages`: it pushes the first K messages, pulls
replies every `pull_interval_s`, and tops the window up as replies come in, until every message
has its reply or the timeout passes. Replies come back in the order they arrive, as Flower's
do. Everything else is the wrapped Grid's. K = 0 is Flower's own behaviour (everything at once).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

# Between pulls: short enough that a finished message's slot is refilled before the simulation
# engine's next 0.1 s sweep; a pull of K ids costs O(K).
PULL_INTERVAL_S = 0.02


class InFlightWindow(Grid):
    """`grid`, with at most `max_in_flight` messages of a `send_and_receive` in flight."""

    def __init__(
        self, grid: Grid, max_in_flight: int, pull_interval_s: float = PULL_INTERVAL_S
    ) -> None:
        if max_in_flight < 0:
            raise ValueError(f"max-in-flight={max_in_flight} must be >= 0 (0 = no limit)")
        self.grid = grid
        self.max_in_flight = max_in_flight
        self.pull_interval_s = pull_interval_s

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
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # -- the window -----------------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        if self.max_in_flight == 0:
            return self.grid.send_and_receive(messages, timeout=timeout)
        waiting = list(messages)
        waiting.reverse()  # pop() from the end sends them in the caller's order
        deadline = None if timeout is None else time.monotonic() + timeout
        in_flight: set[str] = set()
        replies: list[Message] = []
        while waiting or in_flight:
            got: list[Message] = []
            room = self.max_in_flight - len(in_flight)
            if room > 0 and waiting:
                batch = [waiting.pop() for _ in range(min(room, len(waiting)))]
                in_flight.update(self.grid.push_messages(batch))
            if in_flight:
                got = list(self.grid.pull_messages(in_flight))
                replies += got
                in_flight.difference_update(m.metadata.reply_to_message_id for m in got)
            if deadline is not None and time.monotonic() >= deadline:
                break  # as Flower's: what has no reply by now gets none
            if in_flight and (not got or not waiting):
                time.sleep(self.pull_interval_s)
        return replies
