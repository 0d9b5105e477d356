"""Progress lines with an ETA, and turn-taking threads for fair timing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


class Progress:
    """One line per finished step with elapsed time and ETA (the mean step time so far)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.started = time.perf_counter()

    def step(self, note: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.label}] {self.done}/{self.total} {note} | {elapsed:.0f} s elapsed, "
            f"ETA {eta:.0f} s",
            flush=True,
        )


class Turns:
    """Runs jobs in their own threads but one at a time, round robin: a job calls
    `yield_turn(i)` at the end of each step (e.g. an epoch) and waits there for its next turn.

    Two trainings timed this way alternate epoch by epoch, so load from other processes on the
    machine hits both alike; their results are what running them one after the other gives.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs, self.turn = jobs, 0
        self.done: set[int] = set()
        self.cond = threading.Condition()

    def _pass(self, i: int) -> None:  # caller holds the condition
        for k in range(1, self.jobs + 1):
            if (j := (i + k) % self.jobs) not in self.done:
                self.turn = j
                break
        self.cond.notify_all()

    def yield_turn(self, i: int) -> None:
        with self.cond:
            self._pass(i)
            self.cond.wait_for(lambda: self.turn == i)

    def run(self, job: Callable[[int], None]) -> None:
        """`job(i)` for i in range(jobs), taking turns; re-raises the first job's error."""
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            with self.cond:
                self.cond.wait_for(lambda: self.turn == i)
            try:
                job(i)
            except BaseException as err:  # noqa: BLE001 - handed to the caller below
                errors.append(err)
            finally:
                with self.cond:
                    self.done.add(i)
                    self._pass(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(self.jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
