"""The seams of each timm ViT class `PromptedViT` wraps, and why the others are refused.

A `PromptedViT` runs a backbone in three pieces (start point, blocks, end point; vit/model.py).
Five timm classes are a stack of Transformer blocks over patch tokens, and each is cut along
its own seams:

    class (timm module)           embed: the start point             what each block also takes
    VisionTransformer             patch_embed -> _pos_embed ->       nothing
      (vision_transformer, deit,    patch_drop -> norm_pre
       vision_transformer_hybrid)
    Eva (eva: EVA-02, RoPE ViTs,  patch_embed -> _pos_embed ->       rope: the rotary embedding
       DINOv3, PE, ...)             norm_pre
    VisionTransformerRelPos       patch_embed -> [class token]       shared_rel_pos
      (vision_transformer_relpos)
    Beit (beit)                   patch_embed -> [class token] ->    shared_rel_pos_bias
                                    + pos_embed -> pos_drop
    NaFlexVit (naflexvit)         embeds (patches + position         rope, where it has one
                                    embedding, prefix tokens first)
                                    -> norm_pre

The end point is the same for all five: the final norm, then timm's `forward_head`.

NaFlexVit runs at one fixed resolution, as the others do: an image batch [B, C, H, W] is what
its `forward` takes without patch coordinates, and then it is a plain ViT (no padding tokens,
so no attention mask and no masked pooling). Its variable-resolution input (a dict of
patches, `patch_coord` and `patch_valid`) makes the token count vary per batch, and the split
chain exchanges fixed-shape smashed data: `PromptedViT.embed` refuses it. NaFlexVit keeps no
resolution of its own (`img_size` only sizes a position-embedding table that has no grid given),
so `PromptedViT` is told it (`img_size`), or takes the one timm's data config resizes to.

What a block also takes (a rotary embedding, a shared relative-position bias) is a function of
the model's frozen state alone, never of the data, so each node computes it for its own blocks
and nothing but the tokens travels. Where that state holds trained parameters shared by every
block (mixed RoPE's learned frequencies, a shared relative-position MLP), no one node could own
them, and the model is refused.

Prompts are extra prefix tokens (VPT): [prefix | prompts | patches]. Under RoPE they take no
rotary position: timm's attention rotates only the tokens after its `num_prefix_tokens`, so the
prompts join the prefix there (`seat_prompts`). A relative-position bias is a table over the
class and patch tokens only, with no entries for prompt tokens; those models train the head
(`linear`) or everything (`full`), and refuse prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

# timm modules whose models are of the classes below (a model of one may still be refused)
TIMM_MODULES = (
    "vision_transformer",
    "deit",
    "vision_transformer_hybrid",
    "eva",
    "vision_transformer_relpos",
    "beit",
    "naflexvit",
)
PATCH_DROP = "patch dropout changes the number of tokens between segments; set patch_drop_rate=0"
NO_PROMPT_POSITIONS = (
    "its relative-position bias is a table over the class and patch tokens only, with no "
    "entries for prompt tokens; use mode 'linear' or 'full'"
)
MIXED_ROPE = (
    "its mixed RoPE learns the rotary frequencies of every block as one parameter "
    "(rope.freqs) that every block reads; the split chain gives each parameter to "
    "exactly one node, and no one node could own these"
)
BlockInputs = Callable[[int], dict[str, Any]]  # block index -> keyword arguments of its forward
Grid = tuple[int, int]  # patch rows, patch columns of the fixed input resolution

# timm classes built from ViT-like names that PromptedViT does not run, and why.
REFUSED_CLASSES = {
    "VisionTransformerSAM": (
        "SAM's image encoder keeps its tokens as a 2-D grid with windowed attention and ends in "
        "a convolutional neck, not a classifier: no token sequence to hold prompts, no head"
    ),
}
# Multimodal models' vision towers: plain ViTs, but an encoder class of their own wrapped by a
# pooling classifier (or a projector to a language model's width), with seams PromptedViT does
# not drive.
REFUSED_CLASSES |= {
    f"{tower}{kind}": (
        "a multimodal model's vision tower: an encoder of its own class, wrapped by a pooling "
        "classifier or a projector to a language model; PromptedViT does not drive its seams"
    )
    for tower in ("DeepseekVit", "Gemma4Vit", "Qwen3Vit")
    for kind in ("Encoder", "Classifier")
}


def _no_inputs(_block: int) -> dict[str, Any]:
    return {}


def _own_parameters(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


class Family:
    """How `PromptedViT` runs one timm class: its start point, its blocks' extra inputs, and
    what it refuses. Subclasses override what differs."""

    name = ""
    classes: tuple[type[nn.Module], ...] = ()

    def patch_embed(self, bb: Any) -> Any:
        """The module that cuts images into patch tokens (its `patch_size`, `dynamic_img_pad`):
        timm's `PatchEmbed` (or a hybrid's), NaFlexVit's `NaFlexEmbeds`."""
        return bb.patch_embed

    def img_size(self, bb: Any) -> tuple[int, int] | None:
        """The input resolution (H, W) timm built the model for; None where it takes any."""
        return (int(bb.patch_embed.img_size[0]), int(bb.patch_embed.img_size[1]))

    def grid(self, bb: Any, img_size: tuple[int, int]) -> Grid:
        """Patch rows and columns at `img_size`: timm's own count (a ResNet hybrid's patches
        are cells of its CNN's feature map, not of the image)."""
        return (int(bb.patch_embed.grid_size[0]), int(bb.patch_embed.grid_size[1]))

    def embed(self, bb: Any, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, P + N, D]."""
        raise NotImplementedError

    def block_inputs(self, bb: Any, grid: Grid) -> BlockInputs:
        """What block i takes besides the tokens, computed from the frozen model alone for the
        fixed patch `grid`."""
        return _no_inputs

    def refusal(self, bb: Any) -> str | None:
        """Why this model cannot be split at all (None: it can)."""
        return None

    def prompt_refusal(self, bb: Any) -> str | None:
        """Why this model cannot take prompt tokens (None: it can)."""
        return None

    def seat_prompts(self, bb: Any, num_prompts: int) -> None:
        """Prepare the blocks for `num_prompts` prompt tokens after the prefix tokens."""

    def fixed_modules(self, bb: Any) -> list[nn.Module]:
        """Modules that stay in eval mode in every mode: what computes the blocks' extra inputs
        must give every node the same values."""
        return []


class ViTFamily(Family):
    name = "VisionTransformer"
    classes = (VisionTransformer,)

    def embed(self, bb: Any, x: torch.Tensor) -> torch.Tensor:
        h = bb.patch_embed(x)  # [B, N, D]
        h = bb._pos_embed(h)  # [B, P + N, D]: prefix tokens, position embedding
        h = bb.patch_drop(h)
        return bb.norm_pre(h)

    def refusal(self, bb: Any) -> str | None:
        if not isinstance(bb.patch_drop, nn.Identity):
            return PATCH_DROP
        return None


class EvaFamily(Family):
    name = "Eva"
    classes: tuple[type[nn.Module], ...] = (Eva,)

    def embed(self, bb: Any, x: torch.Tensor) -> torch.Tensor:
        h = bb.patch_embed(x)  # [B, N, D]
        h, _ = bb._pos_embed(h)  # [B, P + N, D]; the rotary embedding is each block's own input
        return bb.norm_pre(h)

    def block_inputs(self, bb: Any, grid: Grid) -> BlockInputs:
        if bb.rope is None:
            return _no_inputs
        # As Eva._pos_embed computes it, for the fixed grid (dynamic sizes are refused).
        if hasattr(bb.rope, "feat_shape"):
            rope = bb.rope.get_embed()
        else:  # RoPE without a cached grid (MRoPE) takes it explicitly
            rope = bb.rope.get_embed(shape=grid)
        return lambda _block: {"rope": rope}

    def refusal(self, bb: Any) -> str | None:
        if _own_parameters(bb.rope):
            return MIXED_ROPE
        if bb.patch_drop is not None:
            return PATCH_DROP
        return None

    def fixed_modules(self, bb: Any) -> list[nn.Module]:
        # RoPE's coordinate augmentation (shift, jitter, rescale: a pre-training option) draws
        # new coordinates in train mode; each node computes its own embedding, so it stays off.
        return [bb.rope] if bb.rope is not None else []

    def seat_prompts(self, bb: Any, num_prompts: int) -> None:
        # [prefix (P) | prompts (n) | patches (N)]: the attention rotates tokens [P + n:] only,
        # so the prompts take no rotary position, as the class and register tokens. (A
        # NaFlexVit without RoPE has timm's ViT Blocks, which rotate nothing.)
        for block in bb.blocks:
            if hasattr(block.attn, "num_prefix_tokens"):
                block.attn.num_prefix_tokens = bb.num_prefix_tokens + num_prompts


class RelPosFamily(Family):
    name = "VisionTransformerRelPos"
    classes = (VisionTransformerRelPos,)

    def embed(self, bb: Any, x: torch.Tensor) -> torch.Tensor:
        h = bb.patch_embed(x)  # [B, N, D]
        if bb.cls_token is not None:  # [B, 1 + N, D]
            h = torch.cat((bb.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        return h

    def block_inputs(self, bb: Any, grid: Grid) -> BlockInputs:
        if bb.shared_rel_pos is None:
            return lambda _block: {"shared_rel_pos": None}
        bias = bb.shared_rel_pos.get_bias()
        return lambda _block: {"shared_rel_pos": bias}

    def refusal(self, bb: Any) -> str | None:
        if _own_parameters(bb.shared_rel_pos):
            return (
                "its relative-position MLP (shared_rel_pos) is one set of parameters every block "
                "reads; the split chain gives each parameter to exactly one node"
            )
        return None

    def prompt_refusal(self, bb: Any) -> str | None:
        return NO_PROMPT_POSITIONS


class BeitFamily(Family):
    name = "Beit"
    classes = (Beit,)

    def embed(self, bb: Any, x: torch.Tensor) -> torch.Tensor:
        h = bb.patch_embed(x)  # [B, N, D]
        h = torch.cat((bb.cls_token.expand(h.shape[0], -1, -1), h), dim=1)  # [B, 1 + N, D]
        if bb.pos_embed is not None:
            h = h + bb.pos_embed
        return bb.pos_drop(h)

    def block_inputs(self, bb: Any, grid: Grid) -> BlockInputs:
        bias = bb.rel_pos_bias() if bb.rel_pos_bias is not None else None
        return lambda _block: {"shared_rel_pos_bias": bias}

    def refusal(self, bb: Any) -> str | None:
        if _own_parameters(bb.rel_pos_bias):
            return (
                "its relative-position bias (rel_pos_bias) is one table every block reads; the "
                "split chain gives each parameter to exactly one node"
            )
        return None

    def prompt_refusal(self, bb: Any) -> str | None:
        with_bias = [
            i
            for i, block in enumerate(bb.blocks)
            if getattr(block.attn, "relative_position_bias_table", None) is not None
        ]
        if not with_bias and bb.rel_pos_bias is None:
            return None
        return NO_PROMPT_POSITIONS


class NaFlexFamily(EvaFamily):
    """NaFlexVit on an image batch at one fixed resolution (module docstring). Its blocks are
    timm's ViT `Block`s, or `EvaBlock`s where it has RoPE: its refusals (mixed RoPE, patch
    dropout), its fixed RoPE module and its prompts' seats are Eva's."""

    name = "NaFlexVit"
    classes = (NaFlexVit,)

    def patch_embed(self, bb: Any) -> Any:
        return bb.embeds

    def img_size(self, bb: Any) -> tuple[int, int] | None:
        return None  # it takes any resolution: PromptedViT fixes one

    def grid(self, bb: Any, img_size: tuple[int, int]) -> Grid:
        (h, w), (ph, pw) = img_size, bb.embeds.patch_size  # whole patches (PromptedViT checks)
        return h // ph, w // pw

    def embed(self, bb: Any, x: torch.Tensor) -> torch.Tensor:
        # As NaFlexVit._forward_embeds runs an image batch: patches (a convolution, or a linear
        # projection of the patchified image), + position embedding (resized to the grid),
        # prefix tokens in front, position dropout. Without patch_valid there is no mask.
        h, _grid = bb.embeds(x)  # [B, P + N, D]
        return bb.norm_pre(h)

    def block_inputs(self, bb: Any, grid: Grid) -> BlockInputs:
        # NaFlexVit's blocks take attn_mask too; for an image batch it is None (their default).
        if bb.rope is None:
            return _no_inputs
        rope = bb.rope.get_embed(shape=grid)  # as NaFlexVit._forward_embeds, for the fixed grid
        return lambda _block: {"rope": rope}


FAMILIES: tuple[Family, ...] = (
    ViTFamily(),
    EvaFamily(),
    RelPosFamily(),
    BeitFamily(),
    NaFlexFamily(),
)
SUPPORTED_CLASSES = tuple(f.name for f in FAMILIES)


def family_of(backbone: nn.Module) -> Family | None:
    """The family that runs `backbone`, None if PromptedViT does not run its class."""
    for family in FAMILIES:
        if isinstance(backbone, family.classes):
            return family
    return None


def class_refusal(backbone: nn.Module) -> str:
    """Why PromptedViT does not run `backbone`'s class."""
    name = type(backbone).__name__
    reason = REFUSED_CLASSES.get(name)
    supported = ", ".join(SUPPORTED_CLASSES)
    if reason:
        return f"{name} is not supported: {reason} (supported classes: {supported})"
    return f"PromptedViT needs a timm ViT of class {supported}; got {name}"
