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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gaisnet_flwr.split.plan import SplitPlan
    from gaisnet_flwr.vit.model import PromptedViT


@dataclass(frozen=True)
class ViTShape:
    """What FLOPs depend on: token counts and widths of a (prompted) ViT."""

    num_patches: int
    patch_dim: int  # in_chans * patch_area: inputs per patch of the embedding convolution
    num_prefix_tokens: int
    num_prompts: int
    embed_dim: int
    mlp_dim: int
    depth: int
    num_classes: int
    num_heads_out: int = 1  # 2 for DeiT-distilled (head and head_dist)

    @property
    def block_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_prompts + self.num_patches

    @classmethod
    def of(cls, model: PromptedViT) -> ViTShape:
        bb = model.backbone
        heads = list(model.head_modules().values())
        return cls(
            num_patches=bb.patch_embed.num_patches,
            patch_dim=bb.patch_embed.proj.in_channels * math.prod(bb.patch_embed.patch_size),
            num_prefix_tokens=model.num_prefix_tokens,
            num_prompts=model.num_prompts,
            embed_dim=bb.embed_dim,
            mlp_dim=int(bb.blocks[0].mlp.fc1.out_features),  # type: ignore[union-attr,arg-type]
            depth=model.depth,
            num_classes=getattr(heads[0], "out_features", 0),
            num_heads_out=len(heads),
        )


@dataclass(frozen=True)
class SegmentFlops:
    """FLOPs per sample of one segment: forward, and backward in a training step."""

    forward: int
    backward: int


def embed_flops(s: ViTShape) -> int:
    return 2 * s.num_patches * s.patch_dim * s.embed_dim


def block_linear_flops(s: ViTShape) -> int:
    t, d, h = s.block_tokens, s.embed_dim, s.mlp_dim
    return 2 * t * (4 * d * d + 2 * d * h)


def block_attention_flops(s: ViTShape) -> int:
    t, d = s.block_tokens, s.embed_dim
    return 4 * t * t * d


def block_flops(s: ViTShape) -> int:
    return block_linear_flops(s) + block_attention_flops(s)


def head_flops(s: ViTShape) -> int:
    return 2 * s.embed_dim * s.num_classes * s.num_heads_out


def model_forward_flops(s: ViTShape) -> int:
    return embed_flops(s) + s.depth * block_flops(s) + head_flops(s)


def segment_flops(model: PromptedViT, plan: SplitPlan) -> list[SegmentFlops]:
    """Per-sample FLOPs of [start, peer 1 .. peer K, end] for a training step of `model`."""
    s = ViTShape.of(model)
    full = model.mode == "full"
    # A block's input needs a gradient once anything at or before it trains: a prompt it or an
    # earlier block receives (vpt-*), or every weight (full). `linear` trains only the head.
    first_grad_block = 0 if (full or s.num_prompts) else s.depth
    segments = [SegmentFlops(embed_flops(s), embed_flops(s) if full else 0)]
    for start, stop in plan.ranges:
        backward = 0
        for i in range(start, stop):
            if i >= first_grad_block:
                backward += block_linear_flops(s) + 2 * block_attention_flops(s)
            if full:
                backward += block_linear_flops(s)  # weight gradients
        segments.append(SegmentFlops((stop - start) * block_flops(s), backward))
    head_backward = head_flops(s) * (2 if first_grad_block < s.depth else 1)
    segments.append(SegmentFlops(head_flops(s), head_backward))
    return segments
