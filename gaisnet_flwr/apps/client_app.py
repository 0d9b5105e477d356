"""ClientApp: a fine-tuning client cluster's start point (paper Sec. III-C; clients/).

Thin by design, and light: this module imports only Flower and the message contract (no
torch). The work (read the run-config once, read the cluster's task from the message, hand it
to `clients.SplitClusterClient`, with a per-process cache of what does not change within a run)
lives in `apps/cluster_node.py`, which is imported at the first train, evaluate or infer
message. Flower's simulation engine loads the ClientApp in its own process before it starts
Ray, and each Ray actor loads it again: neither waits for torch.

Two queries need no torch at all, and are answered here: `query.identity` (who this node is,
and the foundation checkpoints its folder holds) and `query.foundation` (the checkpoint shipped
to it, checked by SHA-256 and installed in the node's foundation folder: node-config
`foundation-dir`, else the run-config's). In a Ray actor (one process serves message after
message) the identity query, the run's first message, also starts importing the work in a
background thread while the ServerApp loads its data and evaluates the initial model, so that
the first train message does not wait for torch and timm (seconds per actor); a message that
needs the work meanwhile waits for that import to finish (Python's import lock). A
deployment's ClientApp process serves one message and exits: no background import there.
Under the cloud's run (tier 'cloud') this node is an edge server's cloud-facing SuperNode, and
every message goes to the relay (`apps/edge_relay.py`).
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from gaisnet_flwr import contract as c
from gaisnet_flwr.contract import FOUNDATION, IDENTITY, INFER, NodeIdentity
from gaisnet_flwr.deploy.shipping import ShippingError, foundation_folder, held

WORK = "gaisnet_flwr.apps.cluster_node"  # what train, evaluate and infer need (torch, timm)


def create_client_app(fallback_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; `fallback_config` serves `run_simulation`, which passes no run-config."""
    client = ClientApp()

    def handler(name: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            run_config = node_run_config(context, fallback_config)
            if run_config.get("tier") == "cloud":  # an edge server's cloud-facing SuperNode
                relay = importlib.import_module("gaisnet_flwr.apps.edge_relay")
                return getattr(relay, name)(msg, context)  # type: ignore[no-any-return]
            if name in LIGHT:  # answered without torch
                return LIGHT[name](msg, context, run_config)
            # the first such message imports the work (torch, timm, the model code)
            work = importlib.import_module(WORK)
            return getattr(work, name)(msg, context, run_config)  # type: ignore[no-any-return]

        return handle

    client.train()(handler("train"))
    client.evaluate()(handler("evaluate"))
    client.query(INFER)(handler("infer"))
    client.query(IDENTITY)(handler(IDENTITY))
    client.query(FOUNDATION)(handler(FOUNDATION))
    return client


def node_run_config(context: Context, fallback: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The run-config this node works with, read once per message: the run's (`fallback` when
    `run_simulation` passes none), with node-config `foundation-dir` (a device's own folder,
    where the checkpoint is shipped) in place of the run's."""
    given = context.run_config or fallback or {}
    own = context.node_config.get("foundation-dir")
    return given if own is None else {**given, "foundation-dir": own}


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


def node_foundation_folder(run_config: Mapping[str, Any]) -> Path:
    """This node's foundation folder ('' = ~/.cache/gaisnet-flwr)."""
    return foundation_folder(str(run_config.get("foundation-dir", "")))


def identity(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """Who this node is (its node-config) and the checkpoints it holds; no data, no model. The
    run's first message: in a Ray actor, the work starts importing now (the module docstring)."""
    if in_ray_actor():
        warm_up()
    ident = NodeIdentity.from_node_config(dict(context.node_config))
    files = held(node_foundation_folder(run_config))
    return Message(content=c.with_held(ident.to_record(), files), reply_to=msg)


def foundation(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """Take the shipped checkpoint: its bytes must hash to the SHA-256 sent with them."""
    try:
        shipped = c.shipped_of(msg.content)
        shipped.install(node_foundation_folder(run_config))
    except (ShippingError, ValueError) as err:
        return Message(Error(code=c.FOUNDATION_REFUSED, reason=str(err)), reply_to=msg)
    return Message(content=c.with_held(RecordDict(), {shipped.name: shipped.sha256}), reply_to=msg)


# The queries this module answers itself (no torch); train, evaluate and infer go to the work.
LIGHT: dict[str, Callable[[Message, Context, Mapping[str, Any]], Message]] = {
    IDENTITY: identity,
    FOUNDATION: foundation,
}

app = create_client_app()
