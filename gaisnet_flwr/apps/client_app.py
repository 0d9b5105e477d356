"""ClientApp: a fine-tuning client cluster's start point (paper Sec. III-C; clients/).

Thin by design: read the run-config once, identify the cluster from node-config, hand the work
to `clients.SplitClusterClient`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from clients.inference import InferenceRequestError
from clients.split_client import ClusterIdentity, SplitClusterClient, TrainPool
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.deploy.remote import PeerError, PeerSettings
from gaisnet_flwr.training.loops import NonFiniteError

INFERENCE_REQUEST_ERROR = 400  # our code for "this request cannot be served", with the reason
PEER_FAILURE = 503  # a D2D peer of this cluster was down, too slow or refused: this cluster failed
NON_FINITE = 422  # the cluster's training went to NaN / inf: it stopped, this cluster failed


@functools.lru_cache(maxsize=8)
def run_config_of(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    """Parse and check a run-config once per process, not once per message: keyed by every
    key and value, so another run's config never gets this one's."""
    return RunConfig.from_run_config(dict(items))


def create_client_app(fallback_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; `fallback_config` serves `run_simulation`, which passes no run-config."""
    client = ClientApp()

    def config(context: Context) -> RunConfig:
        return run_config_of(tuple(sorted((context.run_config or fallback_config or {}).items())))

    def identify(context: Context, cfg: RunConfig) -> ClusterIdentity:
        return ClusterIdentity.from_node_config(
            dict(context.node_config), cfg.hierarchy.num_edges()
        )

    def cluster(context: Context) -> SplitClusterClient:
        cfg = config(context)
        node_config = dict(context.node_config)
        peers = PeerSettings.from_node_config(node_config)
        pool = TrainPool.from_node_config(node_config)
        return SplitClusterClient(cfg, identify(context, cfg), peers, pool)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            content = cluster(context).train(
                msg.content.array_records["arrays"], msg.content.config_records["config"]
            )
        except PeerError as err:
            # A dead or slow peer costs this cluster's contribution to the round, nothing more.
            return Message(Error(code=PEER_FAILURE, reason=str(err)), reply_to=msg)
        except NonFiniteError as err:  # so does a loss or module gone NaN / inf
            return Message(Error(code=NON_FINITE, reason=str(err)), reply_to=msg)
        return Message(content=content, reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(
            content=cluster(context).evaluate(msg.content.array_records["arrays"]), reply_to=msg
        )

    @client.query("infer")
    def infer(msg: Message, context: Context) -> Message:
        try:
            return Message(content=cluster(context).infer(msg.content), reply_to=msg)
        except InferenceRequestError as err:
            # A bad request costs only itself: a clear error reply, the node serves on.
            return Message(Error(code=INFERENCE_REQUEST_ERROR, reason=str(err)), reply_to=msg)
        except PeerError as err:
            return Message(Error(code=PEER_FAILURE, reason=str(err)), reply_to=msg)

    @client.query("identity")
    def identity(msg: Message, context: Context) -> Message:
        # Who this node is needs no data: do not load any.
        cfg = config(context)
        return Message(content=identify(context, cfg).record(cfg.cluster_layout()), reply_to=msg)

    return client


app = create_client_app()
