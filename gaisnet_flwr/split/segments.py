"""One description of a split model's segments, read by the chain, the FLOP count and the memory
estimate (paper Sec. III-C, Fig. 4).

`describe_segments(model, plan)` says, for the start point, each peer and the end point: which
parameters it holds and which of them train, whether a gradient must reach its input (something
before it trains, so it sends a gradient back over the previous hop), how many of its blocks a
gradient flows through and how many train their own weights, and the per-sample shapes it
receives and sends (prompt tokens included where VPT carries them). Everything is read off the
model's `requires_grad` flags and token layout, never off its mode's name, so a new mode only
has to set those right; what each piece computes and keeps is measured (split/measure.py), so
nothing here reads a block's insides.

    chain.build_segments   the segments' parameters, optimizers and gradient hops
    flops.chain_flops      forward FLOPs, and backward FLOPs only where a gradient flows
    costs.memory           weights, gradients, saved activations and smashed data per node

Works on the meta device (shapes only), as the cost report builds ViT-B/16 there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from torch import nn

from gaisnet_flwr.split.plan import SplitPlan, node_names
from gaisnet_flwr.vit.model import PromptedViT

Role = Literal["start", "peer", "end"]


@dataclass(frozen=True)
class ViTShape:
    """The token counts and widths the segments exchange, read off timm's common attributes
    (what each piece computes is measured: split/measure.py)."""

    image: tuple[int, ...]  # one sample's input: (channels, height, width)
    num_patches: int
    num_prefix_tokens: int
    num_prompts: int
    embed_dim: int
    depth: int
    num_classes: int

    @property
    def block_tokens(self) -> int:
        """Tokens inside a block: prefix, prompts (where the mode has any) and patches."""
        return self.num_prefix_tokens + self.num_prompts + self.num_patches

    @property
    def plain_tokens(self) -> int:
        """Prefix and patch tokens: the embedding's output, what the head normalises and pools."""
        return self.num_prefix_tokens + self.num_patches

    @classmethod
    def of(cls, model: PromptedViT) -> ViTShape:
        bb = model.backbone
        return cls(
            image=model.image_shape,
            num_patches=model.num_patches,
            num_prefix_tokens=model.num_prefix_tokens,
            num_prompts=model.num_prompts,
            embed_dim=int(bb.embed_dim),
            depth=model.depth,
            num_classes=int(bb.num_classes),
        )


@dataclass(frozen=True)
class SegmentSpec:
    """One node's segment as a training step sees it.

    Attributes:
        index, name, role: position in chain order (`node_names`), start / peer / end.
        blocks: the Transformer blocks [lo, hi) it runs; (0, 0) at the start point and
            (depth, depth) at the end point.
        params: every parameter it holds, by `model.named_parameters()` name (the
            `state_dict` key), in the order its optimizer takes them.
        trainable: those of `params` that train (`requires_grad`), same order.
        num_params, num_trainable: their element counts.
        input_needs_grad: an earlier segment trains, so backward must flow into this segment's
            input and it sends that gradient back over the previous hop.
        grad_blocks: blocks a gradient flows through (something at or before them trains,
            their own prompt included); their backward computes input gradients.
        block_input_grads: per block, whether a gradient flows into the tokens it receives
            (something before it trains; its own prompt does not count here).
        weight_grad_blocks: blocks whose own weights train (full fine-tuning).
        in_shape, out_shape: one sample's tensor received and sent: the image (C, H, W) at the
            start point, (tokens, D) between segments, the end point's logits (classes,).
        block_tokens: tokens inside its blocks (inserted or travelling prompts included); 0
            without blocks.
        edits_input: its first step builds a new tensor from the received one, inserting a
            prompt (vpt-deep; vpt-shallow before block 0) or dropping travelling prompt slots
            (the end point under vpt-shallow), so autograd does not hold the received tensor.
    """

    index: int
    name: str
    role: Role
    blocks: tuple[int, int]
    params: tuple[str, ...]
    trainable: tuple[str, ...]
    num_params: int
    num_trainable: int
    input_needs_grad: bool
    grad_blocks: int
    block_input_grads: tuple[bool, ...]
    weight_grad_blocks: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    block_tokens: int
    edits_input: bool

    @property
    def trains(self) -> bool:
        return bool(self.trainable)

    @property
    def sends_grad(self) -> bool:
        """Whether a gradient goes back from here to the previous node (never from the start)."""
        return self.input_needs_grad and self.role != "start"

    @property
    def runs_backward(self) -> bool:
        """Whether a training step runs any backward here: it trains or must pass a gradient on."""
        return self.trains or self.input_needs_grad

    @property
    def num_blocks(self) -> int:
        return self.blocks[1] - self.blocks[0]

    @property
    def tokens_in(self) -> int:
        """Tokens per sample received (0 at the start point, which receives images)."""
        return self.in_shape[0] if self.role != "start" else 0

    @property
    def tokens_out(self) -> int:
        """Tokens per sample sent on (0 at the end point, which sends logits)."""
        return self.out_shape[0] if self.role != "end" else 0


@dataclass(frozen=True)
class ChainSpec:
    """The model's shape and its segments in chain order: start, peer 1 .. peer K, end."""

    shape: ViTShape
    segments: tuple[SegmentSpec, ...]

    def __iter__(self) -> Iterator[SegmentSpec]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, index: int) -> SegmentSpec:
        return self.segments[index]

    @property
    def first_grad_block(self) -> int:
        """Where the gradient starts: the first block a gradient flows through (depth if none;
        the blocks a gradient flows through are always a suffix)."""
        return self.shape.depth - sum(s.grad_blocks for s in self.segments)

    def hop_shape(self, hop: int) -> tuple[int, ...]:
        """One sample's smashed data on hop `hop` (node hop -> hop + 1)."""
        return self.segments[hop].out_shape

    def hop_sends_grad(self, hop: int) -> bool:
        """Whether hop `hop` carries a gradient back (node hop + 1 -> hop)."""
        return self.segments[hop + 1].sends_grad


def describe_segments(model: PromptedViT, plan: SplitPlan) -> ChainSpec:
    """The segments of `model` split by `plan`, read off its parameters and token layout."""
    if plan.num_blocks != model.depth:
        raise ValueError(f"plan covers {plan.num_blocks} blocks, the model has {model.depth}")
    shape = ViTShape.of(model)
    bb = model.backbone
    dim = shape.embed_dim
    names = {id(p): n for n, p in model.named_parameters()}
    image = shape.image
    groups = segment_parameters(model, plan)
    specs = []
    upstream_trains = False  # does anything before the current point train?
    for k, (name, params) in enumerate(zip(node_names(plan.num_peers), groups, strict=True)):
        trainable = [p for p in params if p.requires_grad]
        input_needs_grad = upstream_trains
        grad_blocks = weight_grad_blocks = block_tokens = 0
        input_grads: list[bool] = []
        if k == 0:
            role: Role = "start"
            blocks = (0, 0)
            in_shape: tuple[int, ...] = image
            out_shape: tuple[int, ...] = (model.tokens_before(0), dim)
            edits_input = False
        elif k <= plan.num_peers:
            role = "peer"
            blocks = plan.ranges[k - 1]
            lo, hi = blocks
            in_shape, out_shape = (model.tokens_before(lo), dim), (model.tokens_before(hi), dim)
            first = model.inserted_prompt(lo)
            edits_input = first is not None
            block_tokens = in_shape[0] + (first.num_tokens if first is not None else 0)
            flows = upstream_trains
            for i in range(lo, hi):
                input_grads.append(flows)
                prompt = model.inserted_prompt(i)
                flows = flows or (prompt is not None and prompt.tokens.requires_grad)
                grad_blocks += flows
                weights_train = any(p.requires_grad for p in bb.blocks[i].parameters())
                weight_grad_blocks += weights_train
                flows = flows or weights_train
        else:
            role = "end"
            blocks = (plan.num_blocks, plan.num_blocks)
            in_shape, out_shape = (model.tokens_before(plan.num_blocks), dim), (shape.num_classes,)
            edits_input = model.prompts_travel  # the head drops the travelling prompt slots
        specs.append(
            SegmentSpec(
                index=k,
                name=name,
                role=role,
                blocks=blocks,
                params=tuple(names[id(p)] for p in params),
                trainable=tuple(names[id(p)] for p in trainable),
                num_params=sum(p.numel() for p in params),
                num_trainable=sum(p.numel() for p in trainable),
                input_needs_grad=input_needs_grad,
                grad_blocks=grad_blocks,
                block_input_grads=tuple(input_grads),
                weight_grad_blocks=weight_grad_blocks,
                in_shape=in_shape,
                out_shape=out_shape,
                block_tokens=block_tokens,
                edits_input=edits_input,
            )
        )
        upstream_trains = upstream_trains or bool(trainable)
    return ChainSpec(shape, tuple(specs))


def segment_parameters(model: PromptedViT, plan: SplitPlan) -> list[list[nn.Parameter]]:
    """Parameters each node holds, in chain order: each peer its blocks and their prompts, the
    end point norm, the attention pool (MAP models), fc_norm and the head(s), and the start
    point everything before the blocks (patch and position embeddings, prefix tokens,
    norm_pre, a hybrid's CNN stem), in registration order. Together they are every parameter
    exactly once."""
    bb = model.backbone
    peers = []
    for lo, hi in plan.ranges:
        prompts = [model.inserted_prompt(i) for i in range(lo, hi)]
        params = [p.tokens for p in prompts if p is not None]
        peers.append(params + [p for i in range(lo, hi) for p in bb.blocks[i].parameters()])
    pool = [model.attn_pool] if model.attn_pool is not None else []
    fc_norm = [bb.fc_norm] if getattr(bb, "fc_norm", None) is not None else []
    end_modules = [bb.norm, *pool, *fc_norm, *model.head_modules().values()]  # forward order
    end = [p for mod in end_modules for p in mod.parameters()]
    taken = {id(p) for group in (*peers, end) for p in group}
    start = [p for p in bb.parameters() if id(p) not in taken]
    groups = [start, *peers, end]
    if sorted(id(p) for g in groups for p in g) != sorted(id(p) for p in model.parameters()):
        raise RuntimeError("segments do not hold the model's parameters exactly once")
    return groups
