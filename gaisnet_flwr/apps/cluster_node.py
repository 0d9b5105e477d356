"""What the ClientApp does with each message, once its heavy parts are imported.

`apps/client_app.py` imports only Flower, so loading the ClientApp is instant (Flower's
simulation engine loads it once in its own process before starting Ray, and every Ray actor
loads it again); this module, with torch, timm and the model code, is imported at the first
message. It reads the run-config once per process, identifies the cluster from node-config and
hands the work to `clients.SplitClusterClient`, with the per-process cache of what does not
change within a run (`apps/client_cache.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Error, Message

from clients.inference import InferenceRequestError
from clients.split_client import ClusterIdentity, SplitClusterClient, TrainPool
from gaisnet_flwr.apps.client_app import INFERENCE_REQUEST_ERROR, NON_FINITE, PEER_FAILURE
from gaisnet_flwr.apps.client_cache import ClientCache
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.deploy.remote import PeerError, PeerSettings
from gaisnet_flwr.training.loops import NonFiniteError

# One per process. Flower's simulation engine pickles the ClientApp with every message it hands
# a Ray actor (`RayBackend.process_message` -> `ClientAppActor.run(app_fn, ...)`), so each message
# meets a fresh copy of the app: a cache held by the app would start empty every time. This one
# lives as long as the actor's process (and, in a deployment, that is one message).
PROCESS_CACHE = ClientCache()


@functools.lru_cache(maxsize=8)
def run_config_of(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    """Parse and check a run-config once per process, not once per message: keyed by every
    key and value, so another run's config never gets this one's."""
    return RunConfig.from_run_config(dict(items))


class ClusterNode:
    """The handlers of one ClientApp; `fallback_config` serves `run_simulation`, which passes
    no run-config; `cache` defaults to the process's."""

    def __init__(
        self, fallback_config: Mapping[str, Any] | None = None, cache: ClientCache | None = None
    ) -> None:
        self.fallback_config = fallback_config
        self.cache = cache if cache is not None else PROCESS_CACHE

    def config(self, context: Context) -> RunConfig:
        given = context.run_config or self.fallback_config or {}
        return run_config_of(tuple(sorted(given.items())))

    def identify(self, context: Context, cfg: RunConfig) -> ClusterIdentity:
        return ClusterIdentity.from_node_config(
            dict(context.node_config), cfg.hierarchy.num_edges()
        )

    def cluster(self, context: Context) -> SplitClusterClient:
        cfg = self.config(context)
        node_config = dict(context.node_config)
        peers = PeerSettings.from_node_config(node_config)
        pool = TrainPool.from_node_config(node_config)
        identity = self.identify(context, cfg)
        foundation = Foundation.of(cfg)
        return SplitClusterClient(
            cfg,
            identity,
            peers,
            pool,
            data=self.cache.cluster_data(cfg, identity, pool),
            foundation=lambda num_classes: self.cache.model(foundation, num_classes),
        )

    def train(self, msg: Message, context: Context) -> Message:
        try:
            content = self.cluster(context).train(
                msg.content.array_records["arrays"], msg.content.config_records["config"]
            )
        except PeerError as err:
            # A dead or slow peer costs this cluster's contribution to the round, nothing more.
            return Message(Error(code=PEER_FAILURE, reason=str(err)), reply_to=msg)
        except NonFiniteError as err:  # so does a loss or module gone NaN / inf
            return Message(Error(code=NON_FINITE, reason=str(err)), reply_to=msg)
        return Message(content=content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        return Message(content=self.cluster(context).evaluate(arrays), reply_to=msg)

    def infer(self, msg: Message, context: Context) -> Message:
        try:
            return Message(content=self.cluster(context).infer(msg.content), reply_to=msg)
        except InferenceRequestError as err:
            # A bad request costs only itself: a clear error reply, the node serves on.
            return Message(Error(code=INFERENCE_REQUEST_ERROR, reason=str(err)), reply_to=msg)
        except PeerError as err:
            return Message(Error(code=PEER_FAILURE, reason=str(err)), reply_to=msg)

    def identity(self, msg: Message, context: Context) -> Message:
        # Who this node is needs no data: do not load any.
        cfg = self.config(context)
        record = self.identify(context, cfg).record(cfg.cluster_layout())
        return Message(content=record, reply_to=msg)
