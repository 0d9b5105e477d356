"""FLOPs per segment, counted from the model's shape (paper Sec. III-C.2: computing cost).

We count matrix-multiply FLOPs (2 per multiply-accumulate), as `torch.utils.flop_counter` does;
LayerNorm, softmax and GELU are a few percent at most and are left out like there. Per sample,
for a block with T tokens, width D and MLP width H:

    linear layers   qkv 2T*D*3D + proj 2T*D*D + fc1 2T*D*H + fc2 2T*H*D  =  2T(4D^2 + 2DH)
    attention       Q K^T 2T*T*D + A V 2T*T*D                            =  4T^2 D

Backward: every linear layer costs its forward again for the input gradient (when anything
upstream trains) and again for the weight gradient (when its weights train); each attention
matmul costs twice its forward (both operands are activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gaisnet_flwr.split.segments import ChainSpec, ViTShape, describe_segments

if TYPE_CHECKING:
    from gaisnet_flwr.split.plan import SplitPlan
    from gaisnet_flwr.vit.model import PromptedViT


@dataclass(frozen=True)
class SegmentFlops:
    """FLOPs per sample of one segment: forward, and backward in a training step."""

    forward: int
    backward: int


def embed_flops(s: ViTShape) -> int:
    return 2 * s.num_patches * s.patch_dim * s.embed_dim


def block_linear_flops(s: ViTShape, tokens: int | None = None) -> int:
    t, d, h = (s.block_tokens if tokens is None else tokens), s.embed_dim, s.mlp_dim
    return 2 * t * (4 * d * d + 2 * d * h)


def block_attention_flops(s: ViTShape, tokens: int | None = None) -> int:
    t, d = (s.block_tokens if tokens is None else tokens), s.embed_dim
    return 4 * t * t * d


def block_flops(s: ViTShape) -> int:
    return block_linear_flops(s) + block_attention_flops(s)


def head_flops(s: ViTShape) -> int:
    return 2 * s.embed_dim * s.num_classes * s.num_heads_out


def model_forward_flops(s: ViTShape) -> int:
    return embed_flops(s) + s.depth * block_flops(s) + head_flops(s)


def segment_flops(model: PromptedViT, plan: SplitPlan) -> list[SegmentFlops]:
    """Per-sample FLOPs of [start, peer 1 .. peer K, end] for a training step of `model`."""
    return chain_flops(describe_segments(model, plan))


def chain_flops(chain: ChainSpec) -> list[SegmentFlops]:
    """Per-sample FLOPs of each described segment: backward only where a gradient flows.

    Start point: the patch convolution; its backward is its weight gradient, where it trains
    (images need no gradient). Peers: every block forward; input gradients (linear layers once,
    attention twice) through the blocks a gradient flows through, weight gradients (linear layers
    once more) where the blocks' weights train. End point: the head's weight gradient where it
    trains, its input gradient where a gradient must flow back.
    """
    s = chain.shape
    flops = []
    for seg in chain:
        if seg.role == "start":
            forward = embed_flops(s)
            backward = forward if seg.trains else 0
        elif seg.role == "peer":
            linear = block_linear_flops(s, seg.block_tokens)
            attention = block_attention_flops(s, seg.block_tokens)
            forward = seg.num_blocks * (linear + attention)
            backward = seg.grad_blocks * (linear + 2 * attention) + seg.weight_grad_blocks * linear
        else:
            forward = head_flops(s)
            backward = forward * (int(seg.trains) + int(seg.input_needs_grad))
        flops.append(SegmentFlops(forward, backward))
    return flops
