"""SL-based task inference in an inference client cluster (paper Sec. III-D, Fig. 5).

The edge delivers the fine-tuned model to the cluster's working clients, either
  * parameter-efficient: only the tunable modules (prompts + head); the frozen foundation is
    already on the devices (paper Sec. III-A.2), or
  * parameter-full: every weight, the baseline the paper compares against;
then the start point embeds its unlabeled data, the chain runs start -> peers -> end point, and
the end point sends the result back to the start point.

Contract of a `query.infer` request: an ArrayRecord "model" (the delivered weights, module keys),
an optional ArrayRecord "inputs" with one float32 array "images" [N, 3, H, W] (else the start
point uses its own held-out images), and a ConfigRecord "config" with "distribution"
("efficient" | "full"). The reply carries an ArrayRecord "predictions" and a MetricRecord
"metrics"; a bad request gets an error reply that says what was wrong.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from gaisnet_flwr.config import DISTRIBUTIONS
from gaisnet_flwr.costs.memory import segment_memory
from gaisnet_flwr.costs.pricing import ClusterProfile, inference_cost
from gaisnet_flwr.split.chain import RemotePeers, SplitChain
from gaisnet_flwr.split.flops import segment_flops
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.split.precision import FP32, Precision
from gaisnet_flwr.vit.model import ModelError, PromptedViT


class InferenceRequestError(ValueError):
    """A request this node cannot serve; the message is sent back as the error reply."""


def load_delivered_model(
    model: PromptedViT, delivered: ArrayRecord | None, distribution: str
) -> None:
    """Install what the edge delivered: the tunable modules, or the whole model's weights."""
    if distribution not in DISTRIBUTIONS:
        raise InferenceRequestError(
            f"distribution {distribution!r} is not valid; choose one of {', '.join(DISTRIBUTIONS)}"
        )
    if delivered is None or not len(delivered):
        raise InferenceRequestError(
            "this node has no model to serve the request: the edge delivered no weights "
            "(send the tunable modules under 'model')"
        )
    state = delivered.to_torch_state_dict()
    try:
        if distribution == "efficient":
            model.load_tunable_state(state)
        else:
            model.load_state_dict(state)
    except (ModelError, RuntimeError) as err:
        raise InferenceRequestError(
            f"the delivered {distribution} model does not fit: {err}"
        ) from err


def request_images(inputs: ArrayRecord | None, img_size: int) -> torch.Tensor | None:
    """Validate the images a request carries: float32 [N, 3, img_size, img_size], N >= 1."""
    if inputs is None:
        return None
    if "images" not in inputs:
        raise InferenceRequestError(f"'inputs' must hold an array 'images'; got {list(inputs)}")
    array = inputs["images"]
    expected = ["N", 3, img_size, img_size]
    shape = list(array.shape)
    if len(shape) != 4 or shape[1:] != expected[1:] or shape[0] < 1:
        raise InferenceRequestError(f"images have shape {shape}; expected {expected}")
    if array.dtype != "float32":
        raise InferenceRequestError(f"images have dtype {array.dtype}; expected float32")
    return torch.from_numpy(array.numpy().copy())


def serve(
    model: PromptedViT,
    plan: SplitPlan,
    cluster: ClusterProfile,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    download_bytes: int,
    remote: RemotePeers | None = None,
    device: torch.device | None = None,
    precision: Precision = FP32,
) -> RecordDict:
    """Run the chain on `images` (over `remote` peers in a deployment) on `device` in
    `precision`, and price the request with the cost model."""
    device = device or torch.device("cpu")
    model.to(device)
    chain = SplitChain(model, plan, remote=remote, train=False, precision=precision)
    logits = chain.infer(images.to(device))
    chain.close()
    predictions = logits.argmax(dim=1).cpu()
    stats = chain.stats()
    n = int(images.shape[0])
    cost = inference_cost(
        cluster,
        segment_flops(model, plan),
        stats.hop_bytes_forward,
        result_bytes=chain.result_link.stats.bytes_forward,
        samples=n,
        download_bytes=download_bytes,
    )
    memory = segment_memory(model, plan, n)
    metrics: dict[str, float | int] = {
        "num-samples": n,
        "latency-s": cost.latency_s,
        "energy-j": cost.energy_j,
        "d2d-bytes": cost.d2d_bytes,
        "download-bytes": download_bytes,
        "compute-flops": cost.compute_flops,
    }
    for node, footprint in zip(cost.nodes, memory, strict=True):
        metrics[f"memory-bytes/{node.name}"] = footprint.inference
        metrics[f"energy-j/{node.name}"] = node.energy_j
    if cost.edge is not None:  # the edge server held a segment: its part apart
        metrics |= {
            "edge-flops": cost.edge_flops,
            "edge-energy-j": cost.edge_energy_j,
            "edge-hop-bytes": cost.cs_hop_bytes,
        }
    if labels is not None:
        metrics["accuracy"] = float((predictions == labels).float().mean())
    return RecordDict(
        {
            "predictions": ArrayRecord({"predictions": Array(predictions.numpy())}),
            "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        }
    )
