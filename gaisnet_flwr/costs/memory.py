"""Memory per node of a split chain (paper Sec. III-C.2 / III-D.2 "memory footprint").

From the segments' description (split/segments.py) and what each piece measures on fake tensors
(split/measure.py): weights, gradients and optimizer state of each node's parameters, what
autograd saves for backward, the smashed data it holds between hops, and a no-grad forward's
working set. The saved tensors equal what a real CPU run saves (`measure_saved_activation_bytes`,
tests/test_costs.py), for any block timm builds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gaisnet_flwr.costs.profiles import CostConfigError
from gaisnet_flwr.split.flops import segment_pieces
from gaisnet_flwr.split.measure import CostMeter
from gaisnet_flwr.split.segments import describe_segments

if TYPE_CHECKING:
    from gaisnet_flwr.split.plan import SplitPlan
    from gaisnet_flwr.vit.model import PromptedViT

OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}  # buffers per tunable parameter: momentum; exp_avg(_sq)


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes one node holds for one batch (paper Sec. III-C.2 / III-D.2 "memory footprint").

    weights: every parameter of its segment (frozen and tunable).
    gradients, optimizer_state: for its tunable parameters, while training.
    activations: tensors autograd keeps for backward (training), measured.
    smashed: its input and output tensors between hops, where autograd does not already hold them.
    inference_activations: the most a no-grad forward of one of its pieces holds at once.
    """

    name: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    smashed: int
    inference_activations: int

    @property
    def training(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer_state + self.activations + self.smashed
        )

    @property
    def inference(self) -> int:
        return self.weights + self.inference_activations + self.smashed


def segment_memory(
    model: PromptedViT,
    plan: SplitPlan,
    batch_size: int,
    optimizer: str = "sgd",
    *,
    momentum: float = 0.9,
    meter: CostMeter | None = None,
) -> list[MemoryFootprint]:
    """Memory per node [start, peer 1 .. peer K, end] while training on `batch_size` samples.

    `optimizer` is one of `OPTIMIZER_STATE` ("sgd" keeps one momentum buffer unless
    `momentum` == 0; "adamw" two moments). Activations are what each of the node's pieces
    saves for backward (`meter`, a `CostMeter` of `model`, keeps its measurements for the next
    call); the tokens it receives count as smashed data unless its first piece saves them.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise CostConfigError(
            f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZER_STATE)}"
        )
    if batch_size < 1:
        raise CostConfigError(f"batch_size must be >= 1, got {batch_size}")
    meter = meter or CostMeter.of(model)
    chain = describe_segments(model, plan)
    es = next(model.parameters()).element_size()
    b = batch_size
    state_factor = 0 if (optimizer == "sgd" and momentum == 0) else OPTIMIZER_STATE[optimizer]

    footprints = []
    for seg in chain:
        pieces = segment_pieces(seg, meter, b)
        received = b * math.prod(seg.in_shape) * es  # images at the start point
        sent = b * math.prod(pieces[-1].out_shape) * es  # logits at the end point
        # The chain holds what a node received and sent for the step, unless autograd already
        # holds the received tensor (a trained embedding's convolution, a LayerNorm whose
        # input needs a gradient).
        smashed = (0 if pieces[0].saves_input else received) + sent
        tunable = seg.num_trainable * es
        footprints.append(
            MemoryFootprint(
                name=seg.name,
                weights=seg.num_params * es,
                gradients=tunable,
                optimizer_state=state_factor * tunable,
                activations=sum(p.saved for p in pieces),
                smashed=smashed,
                inference_activations=max(p.working for p in pieces),
            )
        )
    return footprints


def measure_saved_activation_bytes(
    fn: Callable[..., Any], *inputs: Any, exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes of the storages autograd saves for backward while running `fn(*inputs)`.

    Counted with `torch.autograd.graph.saved_tensors_hooks`, once per storage (views share
    one), leaving out the storages of `exclude` (pass the model's parameters: weights saved for
    backward are already counted as weights).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    total = sum(storages.values())
    del out  # held until here: a live graph keeps saved storages (and their addresses) unique
    return total
