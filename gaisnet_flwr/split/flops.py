"""FLOPs per segment, counted from the model's shape (paper Sec. III-C.2: computing cost).

We count matrix-multiply FLOPs (2 per multiply-accumulate), as `torch.utils.flop_counter` does;
LayerNorm, softmax and GELU are a few percent at most and are left out like there. Per sample,
for a block with T tokens, width D and MLP width H:

    linear layers   qkv 2T*D*3D + proj 2T*D*D + fc1 2T*D*H + fc2 2T*H*D  =  2T(4D^2 + 2DH)
    attention       Q K^T 2T*T*D + A V 2T*T*D                            =  4T^2 D

An attention pool (MAP) at the end point, with L latent queries (width Ld, projected to E by q)
over T tokens of width D, output width O and MLP width H:

    kv 2T*D*2E + q 2L*Ld*E + attention 4L*T*E + proj 2L*E*O + MLP 4L*O*H

Backward: every linear layer costs its forward again for the input gradient (when anything
upstream trains) and again for the weight gradient (when its weights train); each attention
matmul costs twice its forward (both operands are activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gaisnet_flwr.split.segments import AttnPoolShape, ChainSpec, ViTShape, describe_segments

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


@dataclass(frozen=True)
class AttnPoolFlops:
    """An attention pool's forward FLOPs per sample, by part."""

    kv: int  # keys and values from the tokens
    q: int  # queries from the learned latents
    attention: int  # Q K^T and A V
    out: int  # proj and the MLP, on the pooled latents

    @classmethod
    def of(cls, p: AttnPoolShape) -> AttnPoolFlops:
        return cls(
            kv=2 * p.tokens * p.in_dim * 2 * p.dim,
            q=2 * p.latents * p.latent_dim * p.dim if p.q_proj else 0,
            attention=4 * p.latents * p.tokens * p.dim,
            out=2 * p.latents * p.dim * p.out_dim + 4 * p.latents * p.out_dim * p.mlp_dim,
        )

    @property
    def forward(self) -> int:
        return self.kv + self.q + self.attention + self.out

    def backward(self, trains: bool, input_needs_grad: bool) -> int:
        """Weight gradients where the pool trains; input gradients where a gradient flows: into
        the tokens (kv) where something upstream trains, into the latents (q) where they train,
        through proj and the MLP where anything before them needs one. Attention: dA, dK and
        dV wherever a gradient flows, dQ where the pool trains."""
        t, i = int(trains), int(input_needs_grad)
        g = int(trains or input_needs_grad)
        weights = t * (self.kv + self.q + self.out)
        inputs = i * self.kv + t * self.q + g * self.out
        return weights + inputs + self.attention // 2 * (t + 3 * g)


def pool_forward_flops(s: ViTShape) -> int:
    return AttnPoolFlops.of(s.attn_pool).forward if s.attn_pool is not None else 0


def model_forward_flops(s: ViTShape) -> int:
    return embed_flops(s) + s.depth * block_flops(s) + pool_forward_flops(s) + head_flops(s)


def segment_flops(model: PromptedViT, plan: SplitPlan) -> list[SegmentFlops]:
    """Per-sample FLOPs of [start, peer 1 .. peer K, end] for a training step of `model`."""
    return chain_flops(describe_segments(model, plan))


def chain_flops(chain: ChainSpec) -> list[SegmentFlops]:
    """Per-sample FLOPs of each described segment: backward only where a gradient flows.

    Start point: the patch convolution; its backward is its weight gradient, where it trains
    (images need no gradient). Peers: every block forward; input gradients (linear layers once,
    attention twice) through the blocks a gradient flows through, weight gradients (linear layers
    once more) where the blocks' weights train. End point: the attention pool (MAP models,
    trained with the head, `AttnPoolFlops.backward`) and the head: its weight gradient where it
    trains, its input gradient where a gradient must flow back into the pool or the tokens.
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
            head = head_flops(s)
            forward, backward = head, head * int(seg.trains)
            if s.attn_pool is not None:
                pool = AttnPoolFlops.of(s.attn_pool)
                forward += pool.forward
                backward += pool.backward(seg.trains, seg.input_needs_grad)
                backward += head * int(seg.trains or seg.input_needs_grad)  # into the pool
            else:
                backward += head * int(seg.input_needs_grad)
        flops.append(SegmentFlops(forward, backward))
    return flops
