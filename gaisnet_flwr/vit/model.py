"""`PromptedViT`: visual prompt tuning over a timm ViT (paper Sec. III-A.1).

The foundation model is split along timm's own seams so the same code serves the whole model and
each split-learning segment (paper Sec. III-B, Fig. 4):

    embed(x)                    start point    patch_embed -> position embedding -> norm_pre
                                               (each timm class's own seams: vit/families.py)
    run_blocks(h, start, stop)  middle peers   [prompt i, block i] for i in range(start, stop)
    head_forward(h)             end point      drop prompt tokens -> norm -> timm forward_head
                                               (pool: token / avg / max / attention pool, then head)

Five timm classes run this way (vit/families.py): VisionTransformer (ViT, DeiT, hybrids),
Eva (EVA-02, RoPE ViTs, DINOv3), VisionTransformerRelPos, Beit and NaFlexVit (at one fixed
resolution); what a block takes besides the tokens (a rotary embedding, a relative-position
bias) each node computes for its own blocks.

A model runs at one input resolution, `img_size` (H, W): the one timm built its patch embedding
for, or for NaFlexVit, which takes any, the one it is given. `embed` refuses any other input
(another size, NaFlex's dict of patches and coordinates): every segment exchanges tokens of the
shape this resolution fixes.

Token layout inside the blocks (VPT, Jia et al. 2022, ``vit.py``): prompts sit after the prefix
tokens (class, distillation and register tokens) and before the patch tokens,

    [prefix (P) | prompts (n) | patches (N)]

Under RoPE the prompts are prefix tokens for the attention too: they take no rotary position.
`vpt-deep` gives every block i its own prompt i, which *replaces* the previous layer's prompt
outputs; `vpt-shallow` inserts one prompt before block 0 and lets it flow through every block;
`linear` trains the head only and `full` trains every weight (the baseline).

The head is timm's classifier (`head`, plus `head_dist` for DeiT-distilled) and, in a model that
pools with attention (MAP: SigLIP and other `global_pool='map'` ViTs), its attention pool
`attn_pool`: timm builds and drops the pool with the classifier (`reset_classifier`) and runs it
in `forward_head`, big_vision calls it the MAP head. It trains wherever the head trains (every
mode) and travels under its backbone names (`attn_pool.latent`, `attn_pool.kv.weight`, ...), as
`head.*` and `head_dist.*` do. Prompts never reach it: the end point drops them first.

Because vpt-deep discards each layer's prompt outputs, a segment drops them before handing its
tokens on and the next segment inserts its own prompts: under vpt-deep the smashed data at every
cut is [B, P + N, D], the size of the prompt-free model's (the discarded slots carry no gradient,
so training is unchanged). Under vpt-shallow the prompt outputs are real activations and travel.
The frozen backbone stays in eval mode while training, so the foundation model's dropout and
stochastic depth are off.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.layers import AttentionPoolLatent, to_2tuple
from timm.models import is_model_in_modules
from torch import nn

# The modes and the largest shapes are the run-config's vocabulary (the config declares them;
# a D2D peer's model spec holds to them too).
from gaisnet_flwr.config import MAX_PATCHES, MODES, SHAPE_LIMITS  # noqa: F401 - re-exported
from gaisnet_flwr.vit.checkpoint import load_backbone_weights
from gaisnet_flwr.vit.families import Family, class_refusal, family_of

# timm pools over the prefix/patch tokens the end point hands it (prompt slots dropped): by token,
# reductions, or an attention pool (`map`, a `head` module here). Not supported: `''` (no pooling)
# and `prr` (a parameter-free refining attention whose FLOPs and memory are not counted here).
SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "map")


class ModelError(ValueError):
    """A model configuration or tunable state this project cannot use, with the reason."""


class Prompt(nn.Module):
    """One prompt module: `num_tokens` learnable tokens of width `dim` for one Transformer layer."""

    def __init__(self, num_tokens: int, dim: int, init_bound: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim))
        # VPT's initialisation: uniform(-b, b), b = sqrt(6 / (3 * patch_area + dim)) (Xavier-like).
        nn.init.uniform_(self.tokens, -init_bound, init_bound)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


class PromptedViT(nn.Module):
    """A timm ViT whose only trainable parts are one prompt module per layer and the head.

    Args:
        backbone: a timm ViT of a class in `vit.families` (VisionTransformer, with DeiT-distilled
            and register-token variants; Eva; VisionTransformerRelPos; Beit; NaFlexVit).
        mode: one of `MODES`.
        num_prompts: prompt tokens per prompt module; must be 0 for `linear` and `full`.
        img_size: the input resolution (an int or (H, W)). Optional: the one timm built the
            backbone for, which it must equal if given; for NaFlexVit, which takes any, the one
            it runs at (default: timm's `pretrained_cfg` input size).
    """

    def __init__(
        self,
        backbone: nn.Module,
        mode: str = "vpt-deep",
        num_prompts: int = 10,
        img_size: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        self.family: Family = _check_supported(backbone, mode, num_prompts)
        bb: Any = backbone  # one of the families' timm classes (their attributes differ)
        self.backbone = bb
        self.mode = mode
        self.img_size: tuple[int, int] = _input_size(self.family, bb, img_size)
        self.grid: tuple[int, int] = self.family.grid(bb, self.img_size)  # patch rows, columns
        self.num_prefix_tokens: int = bb.num_prefix_tokens
        self.depth = len(bb.blocks)
        dim = bb.embed_dim
        patch_area = math.prod(self.patch_size)
        bound = math.sqrt(6.0 / (3 * patch_area + dim))
        num_modules = {"vpt-deep": self.depth, "vpt-shallow": 1}.get(mode, 0) if num_prompts else 0
        self.prompts = nn.ModuleList(Prompt(num_prompts, dim, bound) for _ in range(num_modules))
        self.num_prompts = num_prompts if num_modules else 0
        if self.num_prompts:
            self.family.seat_prompts(backbone, self.num_prompts)
        self._freeze()
        # VPT's modes from the start (frozen backbone and fixed modules in eval), so that a caller
        # that sets the mode only when `training` changes (split.chain) never runs a fresh model
        # with its backbone in nn.Module's default train mode.
        self.train()

    @property
    def patch_size(self) -> tuple[int, int]:
        """(height, width) of one patch."""
        ph, pw = self.family.patch_embed(self.backbone).patch_size
        return int(ph), int(pw)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (N)."""
        return math.prod(self.grid)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One input image: (channels, height, width)."""
        return (int(self.backbone.in_chans), *self.img_size)

    @property
    def name(self) -> str:
        """The timm model name it was built from (its class name if timm did not record one)."""
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        return str(cfg.get("architecture") or type(self.backbone).__name__)

    def prompt(self, i: int) -> Prompt:
        """The prompt module of layer `i` (vpt-deep) or the single input prompt (vpt-shallow)."""
        return cast(Prompt, self.prompts[i])

    # -- trainable set ------------------------------------------------------------------------
    def head_modules(self) -> dict[str, nn.Module]:
        """The MLP head: timm's classifier(s), by attribute name (`head`, plus `head_dist`)."""
        names = ["head", "head_dist"] if hasattr(self.backbone, "head_dist") else ["head"]
        return {name: getattr(self.backbone, name) for name in names}

    @property
    def attn_pool(self) -> nn.Module | None:
        """The attention pool of a MAP-pooled model (trained as part of the head), else None."""
        return cast(nn.Module | None, getattr(self.backbone, "attn_pool", None))

    def tuned_head_modules(self) -> dict[str, nn.Module]:
        """What trains as the head in every mode: the attention pool (MAP models) and the
        classifier(s), by attribute name, in forward order."""
        pool = {"attn_pool": self.attn_pool} if self.attn_pool is not None else {}
        return {**pool, **self.head_modules()}

    def _freeze(self) -> None:
        # Freeze by module, not by name matching: backbone off, then prompts and head on.
        self.backbone.requires_grad_(self.mode == "full")
        self.prompts.requires_grad_(True)
        for head in self.tuned_head_modules().values():
            head.requires_grad_(True)

    def train(self, mode: bool = True) -> PromptedViT:
        """Train the tunable modules; the frozen backbone stays in eval mode (VPT)."""
        super().train(mode)
        if self.mode != "full":
            self.backbone.eval()
            for head in self.tuned_head_modules().values():
                head.train(mode)
        for module in self.family.fixed_modules(self.backbone):
            module.eval()
        return self

    def named_tunable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters under their tunable-state keys (`prompt.3`, `head.weight`,
        `attn_pool.latent`, ...): prompts, then the backbone's in registration order."""
        for i, prompt in enumerate(self.prompts):
            yield f"prompt.{i}", cast(Prompt, prompt).tokens
        for name, param in self.backbone.named_parameters():
            if param.requires_grad:
                yield name, param

    def tunable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_tunable_parameters()]

    def num_tunable(self) -> int:
        return sum(p.numel() for p in self.tunable_parameters())

    def num_total(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tunable_state(self) -> dict[str, torch.Tensor]:
        """The tunable modules only, detached copies keyed `prompt.i` / backbone names."""
        return {k: p.detach().clone() for k, p in self.named_tunable_parameters()}

    def load_tunable_state(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load tunable modules by key. Unknown keys, wrong shapes and (if strict) missing keys
        raise `ModelError` naming the key; nothing is written unless every check passes."""
        own = dict(self.named_tunable_parameters())
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ModelError(f"unknown tunable key(s) {unknown}; valid keys: {sorted(own)}")
        missing = sorted(set(own) - set(state))
        if strict and missing:
            raise ModelError(f"missing tunable key(s) {missing}")
        values = {k: torch.as_tensor(v) for k, v in state.items()}
        for key, value in values.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ModelError(
                    f"tunable key {key!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(own[key].shape)}"
                )
        with torch.no_grad():
            for key, value in values.items():
                own[key].copy_(value)

    # -- the three segments -------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Start point: images [B, C, H, W] -> tokens [B, P + N, D] (no prompt slots yet)."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.image_shape:
            # NaFlexVit would embed another size (or a dict of patches with coordinates and a
            # padding mask) into another number of tokens: refused, not run.
            got = f"a {type(x).__name__}" if not isinstance(x, torch.Tensor) else list(x.shape)
            raise ModelError(
                f"{self.name} runs on image batches [B, {', '.join(map(str, self.image_shape))}] "
                f"(its fixed input resolution); got {got}"
            )
        return self.family.embed(self.backbone, x)

    @property
    def prompts_travel(self) -> bool:
        """Whether tokens handed between blocks carry prompt slots (vpt-shallow only)."""
        return self.mode == "vpt-shallow" and self.num_prompts > 0

    def tokens_before(self, block: int) -> int:
        """Tokens handed to block `block` (`depth`: to the end point) by the previous segment:
        the prefix and patch tokens, plus the travelling prompts under vpt-shallow."""
        travelling = self.num_prompts if (self.prompts_travel and block > 0) else 0
        return self.num_prefix_tokens + travelling + self.num_patches

    def inserted_prompt(self, block: int) -> Prompt | None:
        """The prompt inserted in front of block `block`'s tokens: prompt i under vpt-deep, the
        single prompt before block 0 under vpt-shallow; None where no prompt is inserted."""
        return self.prompt(block) if block < len(self.prompts) else None

    def _insert_prompt(self, i: int, h: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        tokens = self.prompt(i).tokens.expand(h.shape[0], -1, -1)  # [B, n, D]
        # [B, P + N, D] -> [B, P + n + N, D]
        return torch.cat([h[:, :p], tokens, h[:, p:]], dim=1)

    def _drop_prompt_slots(self, h: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        # [B, P + n + N, D] -> [B, P + N, D]
        return torch.cat([h[:, :p], h[:, p + self.num_prompts :]], dim=1)

    def run_blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Middle peer: blocks [start, stop) with their prompts.

        Takes and returns the tokens as they travel between segments: [B, P + N, D], or
        [B, P + n + N, D] after block 0 under vpt-shallow. What a block takes besides the
        tokens (a rotary embedding, a relative-position bias) is computed here, from the frozen
        model: it never travels.
        """
        inputs = self.family.block_inputs(self.backbone, self.grid) if stop > start else None
        for i in range(start, stop):
            if self.mode == "vpt-deep" and self.num_prompts:
                if i > start:  # inside a segment: swap the previous prompt outputs for prompt i
                    h = self._drop_prompt_slots(h)
                h = self._insert_prompt(i, h)
            elif i == 0 and self.prompts_travel:
                h = self._insert_prompt(0, h)
            h = self.backbone.blocks[i](h, **inputs(i))  # type: ignore[misc]
        if self.mode == "vpt-deep" and self.num_prompts and stop > start:
            h = self._drop_prompt_slots(h)  # discarded by the next layer anyway: do not send
        return h

    def head_forward(self, h: torch.Tensor) -> torch.Tensor:
        """End point: tokens -> logits [B, classes]; prompts never reach the pooled feature."""
        if self.prompts_travel:
            h = self._drop_prompt_slots(h)
        h = self.backbone.norm(h)  # per-token LayerNorm: dropping tokens first changes nothing
        return self.backbone.forward_head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self.run_blocks(self.embed(x), 0, self.depth))


def _check_supported(backbone: nn.Module, mode: str, num_prompts: int) -> Family:
    """The family that runs `backbone`, or a `ModelError` saying why it cannot be run in
    `mode` with `num_prompts` prompts."""
    family = family_of(backbone)
    if family is None:
        raise ModelError(class_refusal(backbone))
    bb: Any = backbone
    kind = type(backbone).__name__
    if mode not in MODES:
        raise ModelError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if num_prompts < 0:
        raise ModelError(f"num_prompts must be >= 0, got {num_prompts}")
    if num_prompts and mode in ("linear", "full"):
        raise ModelError(f"mode {mode!r} trains no prompts; set num_prompts=0 (got {num_prompts})")
    pool = getattr(bb, "attn_pool", None)
    if bb.global_pool not in SUPPORTED_POOLS or (
        pool is not None and not isinstance(pool, AttentionPoolLatent)
    ):
        raise ModelError(
            f"global_pool {bb.global_pool!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_POOLS)}"
        )
    # VisionTransformer keeps dynamic_img_pad on its patch embedding, not on itself.
    patch_embed = family.patch_embed(bb)
    if getattr(bb, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_pad", False):
        raise ModelError(
            "dynamic_img_size / dynamic_img_pad are not supported: segments "
            "exchange fixed-shape smashed data"
        )
    reason = family.refusal(bb)
    if reason:
        raise ModelError(f"{kind} cannot be split: {reason}")
    if num_prompts and mode.startswith("vpt"):
        reason = family.prompt_refusal(bb)
        if reason:
            raise ModelError(f"{kind} cannot take prompts (mode {mode!r}): {reason}")
    return family


def _input_size(
    family: Family, bb: Any, requested: int | tuple[int, int] | None
) -> tuple[int, int]:
    """The one resolution (H, W) `bb` runs at (see `PromptedViT`'s `img_size`), or a
    `ModelError` saying why it cannot be."""
    kind = type(bb).__name__
    wanted = None if requested is None else tuple(int(s) for s in to_2tuple(requested))
    built = family.img_size(bb)
    if built is not None:
        if wanted is not None and wanted != built:
            raise ModelError(f"{kind} was built for img_size {built}, not {wanted}")
        return built
    # A model that takes any resolution (NaFlexVit): the given one, else the one timm's data
    # config resizes its inputs to.
    default = (getattr(bb, "pretrained_cfg", None) or {}).get("input_size")
    size = wanted or (tuple(int(s) for s in default[-2:]) if default else None)
    if size is None:
        raise ModelError(f"{kind} takes any resolution: give the one it runs at (img_size)")
    patch = tuple(int(p) for p in family.patch_embed(bb).patch_size)
    if len(size) != 2 or any(s < 1 or s % p for s, p in zip(size, patch, strict=True)):
        raise ModelError(
            f"{kind} at img_size {size}: each side must be a positive multiple of the patch "
            f"size {patch} (timm would pad or crop the image to whole patches)"
        )
    return (size[0], size[1])


def build_prompted_vit(
    model_name: str = "vit_base_patch16_224",
    *,
    mode: str = "vpt-deep",
    num_prompts: int = 10,
    num_classes: int = 1000,
    pretrained: bool = False,
    checkpoint_path: str = "",
    **overrides: Any,
) -> PromptedViT:
    """Build a timm ViT by name (with shape overrides such as `img_size=32, depth=4`) and wrap it.

    `pretrained=True` loads timm's weights (needs internet once); `checkpoint_path` loads a local
    weights file, checked first (`checkpoint.read_weights_file`: format, safe loading, names,
    shapes, dtypes, finite values; a `CheckpointFileError` names the file and the tensor). The
    head is re-created for `num_classes`, as in VPT (a file's head is kept where it fits).
    Models that timm builds for dynamic image sizes by default (DINOv3, a few others) are built
    for the fixed `img_size`, and a NaFlexVit runs at it: segments exchange fixed-shape smashed
    data.
    """
    if mode not in MODES:  # fail before building a possibly large model
        raise ModelError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if is_model_in_modules(model_name, ["vision_transformer", "eva"]):
        overrides.setdefault("dynamic_img_size", False)
    try:
        backbone = timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, **overrides
        )
    except RuntimeError as err:  # timm raises RuntimeError for unknown model names
        raise ModelError(f"timm could not build {model_name!r}: {err}") from err
    except (AssertionError, TypeError, ValueError) as err:  # timm refusing the shape overrides
        given = ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "dynamic_img_size")
        raise ModelError(
            f"timm could not build {model_name!r} with {given or 'its own shape'}: "
            f"{timm_reason(err)}"
        ) from err
    if checkpoint_path:
        load_backbone_weights(backbone, checkpoint_path)
    return PromptedViT(
        backbone, mode=mode, num_prompts=num_prompts, img_size=overrides.get("img_size")
    )


def timm_reason(err: BaseException) -> str:
    """An exception from timm as a reason: its message, or for a bare `assert` (which has none)
    the condition that failed and where, e.g. a ResNet-hybrid ViT whose CNN feature map the
    patch size does not divide."""
    if str(err):
        return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return type(err).__name__
    last = frames[-1]
    where = f"{Path(last.filename).name}:{last.lineno}"
    return f"timm's check `{(last.line or '').strip()[:200]}` failed ({where})"
