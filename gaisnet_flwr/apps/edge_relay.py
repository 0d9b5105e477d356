"""The ClientApp of an edge server's cloud-facing SuperNode (under the cloud's run, tier 'cloud').

The cloud's ServerApp (`apps/cloud_app.py`) sees each edge server as one SuperNode of its own
SuperLink. Flower runs that SuperNode's ClientApp as a fresh process per message, so it holds
nothing: it relays each cloud message to the edge's long-lived ServerApp through the edge's
folder (node-config `edge-dir`, `apps/bridge.py`) and answers with what the edge server wrote:

  query.identity    which edge this is (node-config `edge-id`) and the foundation checkpoints
                    its folder holds (name -> SHA-256)
  query.foundation  the cloud's foundation checkpoint: checked by SHA-256, then installed in
                    edge-dir/foundation (a mismatch is refused, naming the file)
  train             a cloud round: the edge trains its rounds first..last from the modules the
                    cloud sent; the answer is the edge's modules, its weight, metrics, failures
  evaluate          the cloud's delivery: the edge takes it and evaluates it on its domain

An edge server that stopped while serving, or did not answer before the cloud round's deadline,
is answered as an error (code `EDGE_FAILED`, the reason naming the edge): it costs the cloud that
edge's contribution, nothing more. Imports Flower, the contract, the bridge and the shipping
module only: no torch, so each message's fresh process starts in about a second.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict

from gaisnet_flwr import contract as c
from gaisnet_flwr.apps.bridge import EdgeBridge, EdgeUnavailable
from gaisnet_flwr.contract import EdgeIdentity, EdgeReport, EdgeRequest
from gaisnet_flwr.deploy.shipping import ShippingError, held

# The relay stops waiting this share of the cloud's timeout after the cloud sent the message, so
# that its "missed the deadline" answer reaches the cloud before the cloud stops listening.
DEADLINE_SHARE = 0.9


def identity(msg: Message, context: Context) -> Message:
    ident = EdgeIdentity.from_node_config(dict(context.node_config))
    content = c.with_held(ident.to_record(), held(EdgeBridge(ident.edge_dir).foundation_dir))
    return Message(content=content, reply_to=msg)


def foundation(msg: Message, context: Context) -> Message:
    ident = EdgeIdentity.from_node_config(dict(context.node_config))
    try:
        shipped = c.shipped_of(msg.content)
        shipped.install(EdgeBridge(ident.edge_dir).foundation_dir)
    except (ShippingError, ValueError) as err:
        return Message(Error(code=c.FOUNDATION_REFUSED, reason=str(err)), reply_to=msg)
    return Message(content=c.with_held(RecordDict(), {shipped.name: shipped.sha256}), reply_to=msg)


def infer(msg: Message, context: Context) -> Message:
    reason = "an edge server's cloud-facing SuperNode serves no inference requests"
    return Message(Error(code=c.INFERENCE_REQUEST_ERROR, reason=reason), reply_to=msg)


def relay(msg: Message, context: Context) -> Message:
    """A train or evaluate message: through the edge's folder and back."""
    node_config = dict(context.node_config)
    ident = EdgeIdentity.from_node_config(node_config)
    request = EdgeRequest.from_message(msg)
    bridge = EdgeBridge(Path(ident.edge_dir))
    deadline = msg.metadata.created_at + DEADLINE_SHARE * request.timeout_s
    rid = bridge.submit(
        request.kind,
        request.cloud_round,
        request.first,
        request.last,
        request.final,
        {k: v.numpy() for k, v in request.modules.items()},
        deadline,
        request.shared,
    )
    what = f"edge {ident.edge}"
    try:
        answer = bridge.wait(rid, deadline, what)
    except EdgeUnavailable as err:
        return Message(Error(code=c.EDGE_FAILED, reason=str(err)), reply_to=msg)
    if answer.error:  # the edge server's own failure (the cloud names the edge)
        return Message(Error(code=c.EDGE_FAILED, reason=answer.error), reply_to=msg)
    report = EdgeReport.of(answer.modules, answer.weight, answer.metrics, answer.failures)
    return Message(content=report.content(), reply_to=msg)


train = evaluate = relay  # a cloud round's two phases take the same way
