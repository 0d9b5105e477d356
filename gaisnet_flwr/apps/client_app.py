"""ClientApp: a fine-tuning client cluster's start point (paper Sec. III-C; clients/).

Thin by design, and light: this module imports only Flower and the message contract (no
torch). The work (read the run-config once, read the cluster's task from the message, hand it
to `clients.SplitClusterClient`, with a per-process cache of what does not change within a run)
lives in `apps/cluster_node.py`, which is imported at the first message. Flower's simulation
engine loads the ClientApp in its own process before it starts Ray, and each Ray actor loads it
again: neither waits for torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from gaisnet_flwr.contract import IDENTITY, INFER

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
            module = importlib.import_module("gaisnet_flwr.apps.cluster_node")
            made.append(module.ClusterNode(fallback_config, cache))
        return made[0]

    def handler(name: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            return getattr(node(), name)(msg, context)  # type: ignore[no-any-return]

        return handle

    client.train()(handler("train"))
    client.evaluate()(handler("evaluate"))
    client.query(INFER)(handler("infer"))
    client.query(IDENTITY)(handler("identity"))
    return client


app = create_client_app()
