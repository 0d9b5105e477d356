"""The real ServerApp and ClientApp in one process: an in-process Grid, no Ray, no SuperLink.

`flwr run` (Ray simulation or deployment) stays the user's path. Experiments, benchmarks and
tests that run many short HFSL runs use this one instead: the same `ServerApp` main logic, the
same strategies and the same `ClientApp`, with Messages handed over in memory.

`InProcessGrid` follows Flower's own in-memory grid (`flwr.superlink.grid.InMemoryGrid`) and
simulation worker (`flwr.server.superlink.fleet.vce.vce_api.worker`):
  * one `Context` per node, node-config `partition-id` / `num-partitions` as the simulation
    engine sets them (or the node-configs given), the run-config, and a `state` that persists
    across the node's messages for the whole run;
  * `push_messages` gives every instruction a message id (uuid4) and checks it as the
    SuperLink does; the ClientApp gets its own copy of the message (as if it had travelled);
  * a reply is the ClientApp's `Message(..., reply_to=msg)`: run id, src/dst node ids, reply-to
    id and type come from the instruction, the message id is assigned here;
  * an exception in the ClientApp becomes an error reply (`ErrorCode.CLIENT_APP_RAISED_EXCEPTION`,
    reason `"<class ...>:<'...'>"`), logged with its traceback, and the server carries on.
Messages run one after another, in the order they were sent; `timeout` in `send_and_receive`
leaves the messages not yet started when it expires without a reply, as a real grid would.

What this needs of Flower beyond its public API (a message's id, the process's task identity)
sits in one adapter at the end of this module, checked against the Flower version it was read
from (`FLOWER_INTERNALS`); tests that build messages outside a Flower process use it too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from logging import ERROR
from pathlib import Path
from uuid import uuid4

import flwr
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from gaisnet_flwr.apps.recorder import RunResult

ConfigValue = bool | float | int | str


def simulation_node_configs(num_nodes: int) -> list[dict[str, ConfigValue]]:
    """What Flower's simulation engine gives node i: its partition id and the node count."""
    return [{PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes} for i in range(num_nodes)]


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApps in this process (see the module docstring)."""

    def __init__(
        self,
        client_app: ClientApp,
        run_config: Mapping[str, ConfigValue],
        node_configs: Sequence[Mapping[str, ConfigValue]],
        run_id: int = 1,
        seed: int = 0,
        client_threads: int | None = None,
    ) -> None:
        if not node_configs:
            raise ValueError("an in-process grid needs at least one node")
        self.client_app = client_app
        self.client_threads = client_threads
        self._run = Run.create_empty(run_id)
        rng = random.Random(seed)  # node ids as Flower draws them (positive 63-bit), replayable
        self.contexts: dict[int, Context] = {}
        for node_config in node_configs:
            node_id = rng.randrange(1, 2**63)
            self.contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self._pending: dict[str, Message] = {}  # message id -> instruction not yet run
        self._replies: dict[str, Message] = {}  # instruction id -> its reply

    # -- Grid ---------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(  # deprecated in Flower; kept for the abstract interface
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids: list[str] = []
        for msg in messages:
            assign_message_id(msg, str(uuid4()))
            meta = msg.metadata
            if meta.reply_to_message_id or meta.ttl <= 0 or meta.delivered_at:
                raise ValueError(f"Invalid message: {msg}")
            if meta.dst_node_id not in self.contexts:
                log(ERROR, "Invalid destination node ID for Message: %s", meta.dst_node_id)
                continue
            self._pending[meta.message_id] = msg
            ids.append(meta.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Run the ClientApp on every requested instruction still pending; return the replies."""
        wanted = list(message_ids)
        for message_id in wanted:
            if message_id in self._pending:
                self._deliver(self._pending.pop(message_id))
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        ids = self.push_messages(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        for message_id in ids:
            if deadline is not None and time.monotonic() > deadline:
                self._pending.pop(message_id, None)  # expired: it never gets a reply
                continue
            replies += self.pull_messages([message_id])
        return replies

    # -- the node side ------------------------------------------------------------------------
    def _deliver(self, message: Message) -> None:
        """Run the destination node's ClientApp on its own copy of `message`."""
        context = self.contexts[message.metadata.dst_node_id]
        received = copy.deepcopy(message)  # what travels is a copy: the app cannot alias ours
        try:
            with torch_threads(self.client_threads):
                reply = self.client_app(message=received, context=context)
        except Exception as app_error:  # noqa: BLE001 - Flower turns it into an error reply
            ex = ClientAppException(str(app_error))
            log(ERROR, ex)
            log(ERROR, traceback.format_exc())
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reply = Message(Error(code=code, reason=reason), reply_to=received)
        meta = reply.metadata
        if (
            meta.reply_to_message_id != message.metadata.message_id
            or meta.src_node_id != message.metadata.dst_node_id
        ):  # the SuperLink drops such a reply; so do we
            log(ERROR, "ClientApp reply does not answer message %s", message.metadata.message_id)
            return
        assign_message_id(reply, str(uuid4()))
        self._replies[message.metadata.message_id] = reply


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op threads for a ClientApp call, as a Ray actor with `num_cpus=threads`
    gets them (Ray sets OMP_NUM_THREADS): the thread count changes how float sums are split,
    so the same count is what makes results equal bit for bit. None leaves torch alone."""
    if threads is None:
        yield
        return
    from gaisnet_flwr.split.precision import torch_threads as scoped  # torch only when asked

    with scoped(threads):
        yield


def run_apps(
    server_app: ServerApp,
    client_app: ClientApp,
    run_config: Mapping[str, ConfigValue],
    node_configs: Sequence[Mapping[str, ConfigValue]],
    run_id: int = 1,
    client_threads: int | None = None,
) -> Context:
    """Run any ServerApp against ClientApps on an InProcessGrid; returns the server's Context."""
    grid = InProcessGrid(
        client_app, run_config, node_configs, run_id=run_id, client_threads=client_threads
    )
    context = Context(
        run_id=run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    with task_identity(run_id, SUPERLINK_NODE_ID):
        server_app(grid=grid, context=context)
    return context


def run_inprocess(
    run_config: Mapping[str, ConfigValue],
    num_clusters: int,
    node_configs: Sequence[Mapping[str, ConfigValue]] | None = None,
    client_threads: int | None = 1,
    log_file: Path | None = None,
) -> RunResult:
    """The GaisNet ServerApp over `num_clusters` ClientApps (one per client cluster), in this
    process; returns the run's results (the rows, modules and requests its files hold).
    `node_configs` (one per node) replace the simulation's partition-id / num-partitions, e.g.
    to give clusters fixed partitions of a larger split. `client_threads`: torch threads per
    ClientApp call, as `flwr run` with client-resources-num-cpus=1 (what scripts/run.sh uses)
    gives each ClientApp; the same count gives the same modules. `log_file`: Flower's log lines
    of the run go there instead of the terminal (`flower_log_to`)."""
    from gaisnet_flwr.apps.client_app import create_client_app
    from gaisnet_flwr.apps.server_app import create_server_app
    from gaisnet_flwr.config import RunConfig

    RunConfig.from_run_config(run_config)  # a bad key fails here, before any work
    configs = list(node_configs) if node_configs is not None else None
    if configs is not None and len(configs) != num_clusters:
        raise ValueError(f"{len(configs)} node-configs for {num_clusters} clusters")
    results: list[RunResult] = []
    with flower_log_to(log_file) if log_file is not None else contextlib.nullcontext():
        run_apps(
            create_server_app(on_result=results.append),
            create_client_app(),
            run_config,
            configs if configs is not None else simulation_node_configs(num_clusters),
            client_threads=client_threads,
        )
    return results[0]


@contextmanager
def flower_log_to(path: Path) -> Iterator[None]:
    """Flower's log lines (the ServerApp's, the strategies', Flower's own) go to the file `path`
    (appended) instead of where they went (the terminal, or an enclosing block's file) while
    the block runs: an experiment of many runs shows its own progress, each run's report stays
    in its folder, as `flwr_local.py` keeps run.log. Records still propagate to the root
    logger (pytest's caplog sees them)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    saved = list(FLOWER_LOGGER.handlers)
    for h in saved:
        FLOWER_LOGGER.removeHandler(h)
    FLOWER_LOGGER.addHandler(handler)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeHandler(handler)
        handler.close()
        for h in saved:
            FLOWER_LOGGER.addHandler(h)


# -- Flower internals: the one adapter -------------------------------------------------------------
# Read from flwr 1.42 (`flwr.server.superlink.linkstate.utils` assigns message ids this way;
# `flwr.supercore.task_identity` holds the process's identity). pyproject pins flwr to 1.42.x.
FLOWER_INTERNALS = "1.42."


def check_flower_version(version: str = flwr.__version__) -> None:
    """Refuse a Flower whose internals this adapter was not read from."""
    if not version.startswith(FLOWER_INTERNALS):
        raise RuntimeError(
            f"flwr {version} is installed; the in-process grid uses Flower internals read "
            f"from flwr {FLOWER_INTERNALS}x (gaisnet_flwr/apps/inprocess.py): install "
            f"'flwr>={FLOWER_INTERNALS}0,<1.43' or re-check the adapter"
        )


check_flower_version()


def assign_message_id(message: Message, message_id: str) -> None:
    """Give `message` its id, as the SuperLink does when it stores a message."""
    message.metadata.__dict__["_message_id"] = message_id


@contextmanager
def task_identity(run_id: int, node_id: int, task_id: int = 1) -> Iterator[None]:
    """The process's task identity (instruction Messages read it), as a Flower runtime sets it
    for a ServerApp; the previous one is restored after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
