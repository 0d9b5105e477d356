"""PromptedViT: equals timm with 0 prompts, VPT semantics, frozen backbone, tunable state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.naflexvit import NaFlexVit

from gaisnet_flwr.vit.model import MODES, ModelError, PromptedViT, build_prompted_vit
from tests.conftest import TINY, VARIANTS

HEAD_KEYS = ["head.weight", "head.bias"]


def build(
    variant: str = "cls-token", mode: str = "vpt-deep", num_prompts: int = 4, **kw: object
) -> PromptedViT:
    name, overrides = VARIANTS[variant]
    return build_prompted_vit(
        name, mode=mode, num_prompts=num_prompts, num_classes=5, **{**TINY, **overrides, **kw}
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_zero_prompts_equals_timm_forward(variant: str, mode: str) -> None:
    model = build(variant, mode=mode, num_prompts=0).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), model.backbone(x))


def vpt_reference(model: PromptedViT, x: torch.Tensor) -> torch.Tensor:
    """VPT's forward written out independently (VPT vit.py: incorporate_prompt + deep loop)."""
    bb, p, n = model.backbone, model.num_prefix_tokens, model.num_prompts
    h = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
    batch = x.shape[0]
    h = torch.cat([h[:, :p], model.prompts[0].tokens.expand(batch, -1, -1), h[:, p:]], dim=1)
    for i, block in enumerate(bb.blocks):
        if i > 0 and model.mode == "vpt-deep":
            h = torch.cat(
                [h[:, :p], model.prompts[i].tokens.expand(batch, -1, -1), h[:, p + n :]], dim=1
            )
        h = block(h)
    h = bb.norm(h)
    h = torch.cat([h[:, :p], h[:, p + n :]], dim=1)
    return bb.forward_head(h)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["vpt-deep", "vpt-shallow"])
def test_prompted_forward_matches_vpt_reference(variant: str, mode: str) -> None:
    model = build(variant, mode=mode, num_prompts=3).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), vpt_reference(model, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["cls-token", "avg-pool", "map-pool"])
def test_prompts_do_not_leak_into_pooled_feature(variant: str) -> None:
    # Whatever sits in the prompt slots of the last block's output, the logits are the same.
    model = build(variant, mode="vpt-shallow", num_prompts=5).eval()
    x = torch.randn(2, 3, 32, 32)
    h = model.run_blocks(model.embed(x), 0, model.depth)  # [B, P + n + N, D]
    p, n = model.num_prefix_tokens, model.num_prompts
    assert h.shape[1] == p + n + model.backbone.patch_embed.num_patches
    poisoned = h.clone()
    poisoned[:, p : p + n] = 1e6  # anything in the prompt slots must not matter
    torch.testing.assert_close(model.head_forward(poisoned), model.head_forward(h))


def test_only_prompts_and_head_train_and_backbone_stays_frozen() -> None:
    model = build(mode="vpt-deep", num_prompts=4)
    before = copy.deepcopy(model.backbone.state_dict())
    opt = torch.optim.SGD(model.tunable_parameters(), lr=0.5)
    model.train()
    assert not model.backbone.training and model.backbone.head.training
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    graded = {k for k, p in model.named_parameters() if p.grad is not None}
    assert graded == {f"prompts.{i}.tokens" for i in range(6)} | {
        "backbone.head.weight",
        "backbone.head.bias",
    }
    opt.step()
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


@pytest.mark.parametrize(
    ("mode", "num_prompts", "expected_keys"),
    [
        ("vpt-deep", 2, [f"prompt.{i}" for i in range(6)] + ["head.weight", "head.bias"]),
        ("vpt-shallow", 2, ["prompt.0", "head.weight", "head.bias"]),
        ("linear", 0, ["head.weight", "head.bias"]),
    ],
)
def test_tunable_keys_per_mode(mode: str, num_prompts: int, expected_keys: list[str]) -> None:
    model = build(mode=mode, num_prompts=num_prompts)
    assert list(model.tunable_state()) == expected_keys
    assert model.num_tunable() == sum(v.numel() for v in model.tunable_state().values())


def test_full_mode_trains_every_weight() -> None:
    model = build(mode="full", num_prompts=0)
    assert model.num_tunable() == model.num_total()
    model.train()
    assert model.backbone.training


def test_distilled_head_includes_head_dist() -> None:
    keys = set(build("deit-distilled").tunable_state())
    assert {"head.weight", "head_dist.weight", "head_dist.bias"} <= keys


@pytest.mark.parametrize("mode", ["vpt-deep", "linear"])
def test_attention_pool_trains_as_part_of_the_head(mode: str) -> None:
    # SigLIP's MAP pool runs in timm's forward_head: it trains (and travels) with the head,
    # under its backbone names; the rest of the backbone stays frozen.
    model = build("map-pool", mode=mode, num_prompts=2 if mode == "vpt-deep" else 0)
    pool = {f"attn_pool.{k}" for k, _ in model.backbone.attn_pool.named_parameters()}
    assert "attn_pool.latent" in pool and "attn_pool.kv.weight" in pool
    keys = list(model.tunable_state())
    prompts = [f"prompt.{i}" for i in range(6)] if mode == "vpt-deep" else []
    assert keys == prompts + [k for k in keys if k.startswith("attn_pool.")] + HEAD_KEYS
    assert set(keys) - set(prompts) - set(HEAD_KEYS) == pool
    model.train()
    assert model.backbone.attn_pool.training and not model.backbone.blocks.training
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    graded = {k for k, p in model.backbone.named_parameters() if p.grad is not None}
    assert graded == pool | set(HEAD_KEYS)


def test_vpt_initialisation_bound() -> None:
    model = build(num_prompts=50, embed_dim=64)
    bound = (6.0 / (3 * 8 * 8 + 64)) ** 0.5  # VPT: sqrt(6 / (3 * patch_area + dim))
    tokens = torch.stack([p.tokens for p in model.prompts])
    assert tokens.abs().max() <= bound
    assert tokens.abs().max() > 0.9 * bound  # uniform over the whole interval, not a tiny init


def test_tunable_state_round_trips() -> None:
    source, target = build(), build()
    target.load_tunable_state(source.tunable_state())
    for (k, a), (_, b) in zip(
        source.named_tunable_parameters(), target.named_tunable_parameters(), strict=True
    ):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    target.backbone.load_state_dict(source.backbone.state_dict())
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_load_rejects_wrong_shape_missing_and_unknown_keys() -> None:
    model = build()
    state = model.tunable_state()
    original = model.tunable_state()
    bad = dict(state, **{"prompt.3": torch.zeros(5, 32)})
    with pytest.raises(ModelError, match=r"'prompt.3' has shape \(5, 32\), expected \(4, 32\)"):
        model.load_tunable_state(bad)
    with pytest.raises(ModelError, match=r"missing tunable key\(s\) \['head.bias'\]"):
        model.load_tunable_state({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ModelError, match=r"unknown tunable key\(s\) \['prompt.9'\]"):
        model.load_tunable_state(dict(state, **{"prompt.9": torch.zeros(4, 32)}))
    # Nothing was written by the rejected loads.
    for k, v in model.tunable_state().items():
        assert torch.equal(v, original[k])
    # Non-strict loads a subset.
    model.load_tunable_state({"head.bias": torch.ones(5)}, strict=False)
    assert torch.equal(model.backbone.head.bias, torch.ones(5))


def test_unsupported_configurations_fail_when_built() -> None:
    with pytest.raises(ModelError, match="unknown mode 'deep'; valid modes: vpt-deep"):
        build(mode="deep")
    with pytest.raises(ModelError, match="global_pool '' is not supported"):
        build(global_pool="")
    with pytest.raises(ModelError, match="set num_prompts=0"):
        build(mode="linear", num_prompts=4)
    with pytest.raises(ModelError, match="needs a timm ViT of class VisionTransformer, Eva, "):
        build_prompted_vit("resnet18", num_classes=5)
    with pytest.raises(ModelError, match="could not build 'no_such_vit'"):
        build_prompted_vit("no_such_vit")


# Each refusal names the reason; none is an AttributeError or a bare AssertionError from timm.
REFUSALS = [
    ("vit_tiny_patch16_224", "vpt-deep", dict(dynamic_img_pad=True), "dynamic_img_pad"),
    ("vit_tiny_patch16_224", "vpt-deep", dict(dynamic_img_size=True), "dynamic_img_size"),
    ("vit_tiny_patch16_224", "full", dict(patch_drop_rate=0.5), "patch dropout"),
    (
        "vit_small_resnet26d_224",  # a ResNet-hybrid whose CNN feature map is 1x1 at 32 px
        "vpt-deep",
        {},
        r"with img_size=32, patch_size=8, .*: timm's check `assert self.feature_size\[0\] %",
    ),
    ("vit_relpos_small_patch16_224", "vpt-deep", {}, "no entries for prompt tokens"),
    ("beit_base_patch16_224", "vpt-shallow", {}, "no entries for prompt tokens"),
    ("vit_srelpos_small_patch16_224", "linear", {}, "relative-position MLP .* every block reads"),
    ("vit_small_patch16_rope_mixed_224", "linear", {}, r"mixed RoPE .* \(rope.freqs\)"),
    ("samvit_base_patch16", "linear", {}, "VisionTransformerSAM is not supported: SAM's"),
    ("naflexvit_base_patch16_gap", "linear", dict(rope_type="mixed"), r"mixed RoPE .* \(rope"),
    ("naflexvit_base_patch16_gap", "full", dict(patch_drop_rate=0.5), "patch dropout"),
    ("naflexvit_base_patch16_gap", "vpt-deep", dict(dynamic_img_pad=True), "dynamic_img_pad"),
    ("naflexvit_base_patch16_gap", "vpt-deep", dict(img_size=36), r"multiple of the patch size"),
]


@pytest.mark.parametrize(("name", "mode", "overrides", "message"), REFUSALS)
def test_refused_models_say_why(name: str, mode: str, overrides: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message), torch.device("meta"):
        build_prompted_vit(
            name,
            mode=mode,
            num_prompts=3 if mode.startswith("vpt") else 0,
            num_classes=5,
            **{**TINY, **overrides},
        )


@pytest.mark.parametrize(
    "name", ["vit_relpos_small_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224"]
)
def test_relative_position_models_train_without_prompts(name: str) -> None:
    # Linear probing and full fine-tuning need no position for prompts: both run.
    for mode in ("linear", "full"):
        model = build_prompted_vit(name, mode=mode, num_prompts=0, num_classes=5, **TINY).eval()
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), model.backbone(x))


def test_rope_prompts_take_no_rotary_position() -> None:
    # Prompts are prefix tokens for the attention: it rotates only the patch tokens, with the
    # same rotary embedding as without prompts.
    model = build_prompted_vit(
        "vit_small_patch16_rope_224", mode="vpt-deep", num_prompts=3, num_classes=5, **TINY
    )
    p = model.num_prefix_tokens
    assert all(block.attn.num_prefix_tokens == p + 3 for block in model.backbone.blocks)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), vpt_reference_rope(model, x), rtol=0, atol=1e-6)


def vpt_reference_rope(model: PromptedViT, x: torch.Tensor) -> torch.Tensor:
    """VPT-deep over an Eva, written out on an unmodified copy of the backbone: the rotary
    embedding gets an identity rotation (sin 0, cos 1) for each prompt position."""
    p, n = model.num_prefix_tokens, model.num_prompts
    bb = copy.deepcopy(model.backbone)
    for block in bb.blocks:
        block.attn.num_prefix_tokens = p  # as timm built it
    h, rope = bb._pos_embed(bb.patch_embed(x))  # rope [N, 2 * rotated dims]: (sin | cos)
    half = rope.shape[-1] // 2
    identity = torch.cat([torch.zeros(n, half), torch.ones(n, half)], dim=-1)
    rope = torch.cat([identity, rope], dim=0)  # [n + N, ...]: prompts first, unrotated
    h = bb.norm_pre(h)
    batch = x.shape[0]
    for i, block in enumerate(bb.blocks):
        prompts = model.prompts[i].tokens.expand(batch, -1, -1)
        rest = h[:, p:] if i == 0 else h[:, p + n :]
        h = block(torch.cat([h[:, :p], prompts, rest], dim=1), rope=rope)
    h = torch.cat([h[:, :p], h[:, p + n :]], dim=1)
    return bb.forward_head(bb.norm(h))


def test_the_evaluation_batch_is_sized_to_the_devices_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ViT-B/16's width, heads and tokens (one block suffices): 58 images a batch within the
    accelerator's budget, 14 within the CPU's, where a bigger batch only costs memory; a tiny
    ViT takes the cap either way. `evaluate` on the CPU uses the CPU's budget."""
    from torch.utils.data import TensorDataset

    from gaisnet_flwr.training import loops

    b16 = build_prompted_vit(
        num_classes=5, model_name="vit_base_patch16_224", img_size=224, patch_size=16,
        depth=1, embed_dim=768, num_heads=12, pretrained=False,
    )  # fmt: skip
    assert loops.eval_batch_size(b16, loops.EVAL_ACTIVATION_BYTES) == 58
    assert loops.eval_batch_size(b16, loops.EVAL_ACTIVATION_BYTES_CPU) == 14
    tiny = build()
    assert loops.eval_batch_size(tiny, loops.EVAL_ACTIVATION_BYTES_CPU) == loops.EVAL_BATCH_CAP
    sizes: list[int] = []
    real_loader = loops.loader

    def spy(dataset, batch_size, seed):  # type: ignore[no-untyped-def]
        sizes.append(batch_size)
        return real_loader(dataset, batch_size, seed)

    monkeypatch.setattr(loops, "loader", spy)
    images = TensorDataset(torch.zeros(1, 3, 224, 224), torch.zeros(1, dtype=torch.long))
    loops.evaluate(b16, images, device=torch.device("cpu"))
    assert sizes == [14]


def test_a_resnet_hybrids_patches_are_cells_of_its_feature_map() -> None:
    # The patch count is timm's own (patch_embed.grid_size), not img_size / patch_size: a
    # ResNet hybrid's patch is a cell of its CNN's feature map (64 px -> 4x4 cells at stride 16).
    model = build_prompted_vit(
        "vit_base_r50_s16_224", mode="vpt-deep", num_prompts=2, num_classes=5,
        img_size=64, depth=2, embed_dim=32, num_heads=2,
    )  # fmt: skip
    bb = model.backbone
    assert (model.img_size, model.grid, model.num_patches) == ((64, 64), (4, 4), 16)
    assert model.num_patches == bb.patch_embed.num_patches
    x = torch.randn(2, 3, 64, 64)
    assert model.embed(x).shape == (2, model.tokens_before(0), 32)


def test_a_model_runs_only_at_its_fixed_resolution() -> None:
    # Another size would make another number of tokens: refused by name, before timm sees it.
    model = build()
    with pytest.raises(ModelError, match=r"image batches \[B, 3, 32, 32\].*got \[2, 3, 64, 64\]"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ModelError, match=r"built for img_size \(32, 32\), not \(64, 64\)"):
        PromptedViT(copy.deepcopy(model.backbone), img_size=64)


# -- NaFlexVit at one fixed resolution ---------------------------------------------------------
NAFLEX = {
    "registers-avg": ("naflexvit_base_patch16_gap", {}),
    "rope": ("naflexvit_base_patch16_gap", dict(rope_type="axial", class_token=True)),
}


def vpt_reference_naflex(model: PromptedViT, x: torch.Tensor) -> torch.Tensor:
    """VPT over a NaFlexVit, written out on an unmodified copy of the backbone from timm's own
    seams (its embedding module, blocks, norm, forward_head); under RoPE each prompt position
    gets an identity rotation (sin 0, cos 1)."""
    p, n = model.num_prefix_tokens, model.num_prompts
    bb = copy.deepcopy(model.backbone)
    h, grid = bb.embeds(x)
    h = bb.norm_pre(h)
    inputs = {}
    if bb.rope is not None:
        for block in bb.blocks:
            block.attn.num_prefix_tokens = p  # as timm built it
        rope = bb.rope.get_embed(shape=grid)  # [N, 2 * rotated dims]: (sin | cos)
        half = rope.shape[-1] // 2
        identity = torch.cat([torch.zeros(n, half), torch.ones(n, half)], dim=-1)
        inputs["rope"] = torch.cat([identity, rope], dim=0)  # prompts first, unrotated
    batch = x.shape[0]
    for i, block in enumerate(bb.blocks):
        prompts = model.prompts[i if model.mode == "vpt-deep" else 0].tokens.expand(batch, -1, -1)
        if i == 0:
            h = torch.cat([h[:, :p], prompts, h[:, p:]], dim=1)
        elif model.mode == "vpt-deep":
            h = torch.cat([h[:, :p], prompts, h[:, p + n :]], dim=1)
        h = block(h, **inputs)
    h = torch.cat([h[:, :p], h[:, p + n :]], dim=1)
    return bb.forward_head(bb.norm(h))


@pytest.mark.parametrize("variant", sorted(NAFLEX))
@pytest.mark.parametrize("mode", ["vpt-deep", "vpt-shallow"])
def test_naflexvit_prompted_forward_matches_vpt_reference(variant: str, mode: str) -> None:
    name, overrides = NAFLEX[variant]
    model = build_prompted_vit(
        name, mode=mode, num_prompts=3, num_classes=5, **{**TINY, **overrides}
    ).eval()
    assert model.img_size == (32, 32) and model.num_patches == 16
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), vpt_reference_naflex(model, x), rtol=0, atol=1e-6)


def test_naflexvit_runs_only_at_its_fixed_resolution() -> None:
    # NaFlexVit would take another size, or NaFlex's dict of patches with coordinates and a
    # padding mask, and make another number of tokens: PromptedViT refuses both by name.
    model = build_prompted_vit("naflexvit_base_patch16_gap", num_classes=5, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.embed(x).shape == (2, 4 + 16, 32)  # 4 registers, 4x4 patches
    with pytest.raises(ModelError, match=r"image batches \[B, 3, 32, 32\].*got \[2, 3, 64, 64\]"):
        model(torch.randn(2, 3, 64, 64))
    patches = {
        "patches": torch.randn(2, 16, 8 * 8 * 3),
        "patch_coord": torch.zeros(2, 16, 2, dtype=torch.long),
        "patch_valid": torch.ones(2, 16, dtype=torch.bool),
    }
    with pytest.raises(ModelError, match="got a dict"):
        model(patches)  # type: ignore[arg-type]


def test_naflexvit_takes_the_resolution_it_is_given_or_timms_default() -> None:
    # NaFlexVit keeps no resolution of its own: img_size is the one it runs at, or the input
    # size of timm's data config (384 px).
    with torch.device("meta"):
        given = build_prompted_vit("naflexvit_base_patch16_gap", img_size=64, patch_size=16)
        default = build_prompted_vit("naflexvit_base_patch16_gap")
        bare = NaFlexVit(patch_size=8, depth=2, embed_dim=32, num_heads=2)  # no timm config
        with pytest.raises(ModelError, match="takes any resolution: give the one it runs at"):
            PromptedViT(bare)
        assert PromptedViT(bare, img_size=32).num_patches == 16
    assert (given.img_size, given.num_patches) == ((64, 64), 16)
    assert (default.img_size, default.num_patches) == ((384, 384), 576)
