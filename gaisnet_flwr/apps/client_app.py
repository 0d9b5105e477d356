"""ClientApp: a fine-tuning client cluster's start point (paper Sec. III-C; clients/).

Thin by design, and light: this module imports only Flower and the message contract (no
torch). The work (read the run-config once, read the cluster's task from the message, hand it
to `clients.SplitClusterClient`, with a per-process cache of what does not change within a run)
lives in `apps/cluster_node.py`, which is imported when a message needs it. Flower's simulation
engine loads the ClientApp in its own process before it starts Ray, and each Ray actor loads it
again: neither waits for torch.

The identity query, the first message of a run, needs no torch: it is answered here at once.
In a Ray actor (one process serves message after message) answering it also starts importing
the work in a background thread, while the ServerApp loads its data and evaluates the initial
model, so that the first train message does not wait for torch and timm (seconds per actor);
a message that needs the work meanwhile waits for that import to finish (Python's import lock).
A deployment's ClientApp process serves one message and exits: no background import there.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from gaisnet_flwr.contract import IDENTITY, INFER, NodeIdentity

WORK = "gaisnet_flwr.apps.cluster_node"  # what the messages after the identity query need

if TYPE_CHECKING:
    from gaisnet_flwr.apps.cluster_node import ClientCache, ClusterNode


def create_client_app(
    fallback_config: Mapping[str, Any] | None = None, cache: ClientCache | None = None
) -> ClientApp:
    """A ClientApp; `fallback_config` serves `run_simulation`, which passes no run-config.
    `cache`: what it keeps between messages (by default the process's: `apps/cluster_node.py`
    says why not the app's)."""
    client = ClientApp()
    made: list[ClusterNode] = []

    def node() -> ClusterNode:
        if not made:  # the first message imports the work (torch, timm, the model code)
            module = importlib.import_module(WORK)
            made.append(module.ClusterNode(fallback_config, cache))
        return made[0]

    def handler(name: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            return getattr(node(), name)(msg, context)  # type: ignore[no-any-return]

        return handle

    def identity(msg: Message, context: Context) -> Message:
        # Who this node is needs no data, no config and no torch.
        if in_ray_actor():
            warm_up()
        identity = NodeIdentity.from_node_config(dict(context.node_config))
        return Message(content=identity.to_record(), reply_to=msg)

    client.train()(handler("train"))
    client.evaluate()(handler("evaluate"))
    client.query(INFER)(handler("infer"))
    client.query(IDENTITY)(identity)
    return client


def in_ray_actor() -> bool:
    """Whether this process is a Ray actor (the simulation's, serving many messages). Asks Ray
    only if this process has imported it already."""
    ray = sys.modules.get("ray")
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:  # noqa: BLE001 - not knowing means no
        return False


def warm_up() -> None:
    """Import the work in a daemon thread (once per process)."""
    if WORK not in sys.modules and not any(t.name == WORK for t in threading.enumerate()):
        thread = threading.Thread(target=importlib.import_module, args=(WORK,), name=WORK)
        thread.daemon = True
        thread.start()


app = create_client_app()
