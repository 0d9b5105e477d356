"""SL-based task inference in an inference client cluster (paper Sec. III-D, Fig. 5).

The edge delivers the fine-tuned model to the cluster's working clients, either
  * parameter-efficient: only the tunable modules (prompts + head); the frozen foundation is
    already on the devices (paper Sec. III-A.2), or
  * parameter-full: every weight, the baseline the paper compares against;
then the start point embeds its unlabeled data, the chain runs start -> peers -> end point, and
the end point sends the result back to the start point.

What a request holds and its reply carry is `contract.InferRequest` and
`contract.predictions_content`; a bad request gets an error reply that says what was wrong.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from gaisnet_flwr.config import DISTRIBUTIONS
from gaisnet_flwr.contract import (
    ACCURACY,
    COMPUTE_FLOPS,
    D2D_BYTES,
    DOWNLOAD,
    EDGE_ENERGY,
    EDGE_FLOPS,
    EDGE_HOP_BYTES,
    ENERGY,
    IMAGES,
    LATENCY,
    MEMORY,
    NUM_SAMPLES,
)
from gaisnet_flwr.costs.memory import segment_memory
from gaisnet_flwr.costs.pricing import inference_cost
from gaisnet_flwr.costs.profiles import ClusterProfile
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
    if IMAGES not in inputs:
        raise InferenceRequestError(f"'inputs' must hold an array 'images'; got {list(inputs)}")
    array = inputs[IMAGES]
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
) -> tuple[np.ndarray, dict[str, float | int]]:
    """Run the chain on `images` (over `remote` peers in a deployment) on `device` in
    `precision`, and price the request with the cost model: the predicted classes and the
    request's metrics."""
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
        NUM_SAMPLES: n,
        LATENCY: cost.latency_s,
        ENERGY: cost.energy_j,
        D2D_BYTES: cost.d2d_bytes,
        DOWNLOAD: download_bytes,
        COMPUTE_FLOPS: cost.compute_flops,
    }
    for node, footprint in zip(cost.nodes, memory, strict=True):
        metrics[f"{MEMORY}/{node.name}"] = footprint.inference
        metrics[f"{ENERGY}/{node.name}"] = node.energy_j
    if cost.edge is not None:  # the edge server held a segment: its part apart
        metrics |= {
            EDGE_FLOPS: cost.edge_flops,
            EDGE_ENERGY: cost.edge_energy_j,
            EDGE_HOP_BYTES: cost.cs_hop_bytes,
        }
    if labels is not None:
        metrics[ACCURACY] = float((predictions == labels).float().mean())
    return predictions.numpy(), metrics
