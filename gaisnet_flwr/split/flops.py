"""FLOPs per segment (paper Sec. III-C.2: computing cost).

We count matrix-multiply FLOPs (2 per multiply-accumulate), as `torch.utils.flop_counter` does;
LayerNorm, softmax and activations are a few percent at most and are left out like there. Each
piece a segment runs (the embedding, a block with its prompt, the head and loss) is measured on
fake tensors by `split.measure.CostMeter`, forward and, where a gradient flows, backward, with
the model's own trainable flags: a frozen linear layer's backward computes only its input
gradient, and a block nothing before trains runs no backward at all. For a timm `Block` with T
tokens, width D and MLP width H that is the familiar

    forward    2T(4D^2 + 2DH) + 4T^2 D       (qkv, proj, fc1, fc2; Q K^T and A V)
    backward   the linear part once per gradient it computes (input, weights), attention twice

and for any other block (SwiGLU, parallel blocks, RoPE attention, ...) whatever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gaisnet_flwr.split.measure import CostMeter, PieceCost
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.split.segments import ChainSpec, SegmentSpec, describe_segments

if TYPE_CHECKING:
    from gaisnet_flwr.vit.model import PromptedViT


@dataclass(frozen=True)
class SegmentFlops:
    """FLOPs per sample of one segment: forward, and backward in a training step."""

    forward: int
    backward: int


def segment_pieces(seg: SegmentSpec, meter: CostMeter, batch: int = 1) -> list[PieceCost]:
    """What `seg` runs in a training step, piece by piece, at `batch` samples: the embedding
    (start point), each block with its prompt (peers), or the head and loss (end point)."""
    if seg.role == "start":
        return [meter.start(batch)]
    if seg.role == "end":
        return [meter.end(seg.input_needs_grad, batch)]
    lo, hi = seg.blocks
    grads = zip(range(lo, hi), seg.block_input_grads, strict=True)
    return [meter.block(i, grad, batch) for i, grad in grads]


def segment_flops_of(seg: SegmentSpec, meter: CostMeter, batch: int = 1) -> SegmentFlops:
    """Per-sample FLOPs of one described segment: backward only where a gradient flows
    (measured at `batch` samples: the same per sample at any batch)."""
    pieces = segment_pieces(seg, meter, batch)
    return SegmentFlops(sum(p.forward for p in pieces), sum(p.backward for p in pieces))


def chain_flops(chain: ChainSpec, meter: CostMeter, batch: int = 1) -> list[SegmentFlops]:
    """Per-sample FLOPs of each described segment (`meter` measures `chain`'s model)."""
    return [segment_flops_of(seg, meter, batch) for seg in chain]


def segment_flops(model: PromptedViT, plan: SplitPlan) -> list[SegmentFlops]:
    """Per-sample FLOPs of [start, peer 1 .. peer K, end] for a training step of `model`."""
    return chain_flops(describe_segments(model, plan), CostMeter.of(model))


def model_forward_flops(model: PromptedViT) -> int:
    """Per-sample FLOPs of the whole model's forward (any plan: the pieces are the same)."""
    return sum(f.forward for f in segment_flops(model, SplitPlan.from_sizes([model.depth])))
