"""On CPU the split chain trains bit for bit like the unsplit `PromptedViT` (docs/vits.md
"Exactness"), for every timm ViT family we support, and `PromptedViT` with 0 prompts is timm's
own forward.

Families cover the prefix layouts (class token, none, registers, distillation token), LayerScale,
pre-norm and residual post-norm blocks, every pooling (token, avg, max, avgmax, attention
pool), and NaFlexVit at a fixed resolution. A model without prefix tokens hands on tokens in the
patch convolution's permuted layout ([B, N, D], strides (N*D, 1, N)); the hops keep it
(split/link.py), so reductions round the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import load_image_data
from gaisnet_flwr.derived import data_spec, derive
from gaisnet_flwr.split.chain import SplitChain
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.training.loops import build_model, train_centralised, train_cluster
from gaisnet_flwr.vit.model import MODES, PromptedViT, build_prompted_vit

SHAPE = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)

# name: (timm model, overrides); SHAPE makes each tiny (16 patches, 4 blocks, width 32).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "class-token": ("vit_tiny_patch16_224", {}),
    "no-prefix-avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "no-prefix-max": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="max")),
    "avgmax": ("vit_tiny_patch16_224", dict(global_pool="avgmax")),
    "registers-gap": ("vit_medium_patch16_reg4_gap_256", {}),  # 4 registers, no class token
    "registers-token": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale": ("deit3_small_patch16_224", {}),  # also no_embed_class
    "pre-norm": ("vit_base_patch32_clip_224", {}),
    "res-post-norm": ("vit_base_patch16_rpn_224", {}),  # no prefix, avg pooling
    "map-siglip": ("vit_base_patch16_siglip_224", {}),  # no prefix, attention pool
    "map-class-token": (
        "vit_base_patch16_siglip_224",
        dict(class_token=True, pool_include_prefix=True),
    ),
    # no prefix token + LayerScale: the backward hop hands on the gradient as autograd made it
    "no-prefix-layerscale": ("vit_medium_patch16_gap_256", {}),
    # a representative of every other block type timm's ViTs build
    "glu-mlp": ("vit_giant_patch14_dinov2", {}),  # GluMlp, LayerScale
    "swiglu-aimv2": ("aimv2_large_patch14_224", {}),  # SwiGLU, no prefix
    "parallel-scaling": ("vit_pwee_patch16_reg1_gap_256", {}),  # ParallelScalingBlock
    "parallel-things": ("vit_small_patch16_18x2_224", {}),  # ParallelThingsBlock
    "diff-attention": ("vit_dwee_patch16_reg1_gap_256", {}),  # DiffAttention
    "diff-parallel": ("vit_dpwee_patch16_reg1_gap_256", {}),  # DiffParallelScalingBlock
    # Eva: RoPE, with the prompts as prefix tokens that take no rotary position
    "eva02": ("eva02_tiny_patch14_224", {}),  # EvaAttention, SwiGLU, RoPE
    "dinov3": ("vit_small_patch16_dinov3", {}),  # DINOv3 RoPE, 4 registers, LayerScale
    "rope-attention": ("vit_small_patch16_rope_224", {}),  # AttentionRope, class token
    "rope-no-prefix-layerscale": ("vit_base_patch16_rope_reg1_gap_256", dict(num_reg_tokens=0)),
    "pe-core-map": ("vit_pe_core_tiny_patch16_384", {}),  # RoPE + attention pool
    # relative-position biases: no positions for prompts, so linear and full only
    "relpos": ("vit_relpos_small_patch16_224", {}),
    "relpos-res-post-norm": ("vit_relpos_small_patch16_rpn_224", {}),
    "beit": ("beit_base_patch16_224", {}),
    # NaFlexVit on image batches at SHAPE's fixed 32 px: its own embedding module (a linear
    # projection of the patchified image, its 16x16 position table resized to the 4x4 grid,
    # prefix tokens in front) and pooling (prefix tokens left out of avg and the attention pool)
    "naflex-gap": ("naflexvit_base_patch16_gap", {}),  # 4 registers, LayerScale, avg + fc_norm
    "naflex-map": ("naflexvit_so150m2_patch16_reg1_map", {}),  # 1 register, attention pool
    "naflex-siglip": ("naflexvit_base_patch16_siglip", {}),  # no prefix, attention pool
    "naflex-factorized": ("naflexvit_base_patch16_parfac_gap", {}),  # factorized, aspect-kept
    "naflex-radio": ("naflexvit_base_patch16_radio_v3", {}),  # class token + 7 registers, token
    # pooling, no final norm, a 128x128 position table; a convolutional patch embedding without
    # prefix tokens hands on the permuted layout; RoPE makes its blocks EvaBlocks
    "naflex-conv-no-prefix": (
        "naflexvit_base_patch16_siglip",
        dict(embed_proj_type="conv", global_pool="avg", fc_norm=True),
    ),
    "naflex-rope": ("naflexvit_base_patch16_gap", dict(rope_type="axial", class_token=True)),
}
NO_PROMPTS = {"relpos", "relpos-res-post-norm", "beit"}
CASES = [
    (family, mode)
    for family in sorted(FAMILIES)
    for mode in MODES
    if not (family in NO_PROMPTS and mode.startswith("vpt"))
]

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
}
PLANS = [SplitPlan.from_sizes(sizes) for sizes in ([4], [1, 3], [1, 1, 1, 1])]
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def build(family: str, mode: str, num_prompts: int | None = None) -> PromptedViT:
    name, overrides = FAMILIES[family]
    if num_prompts is None:
        num_prompts = 3 if mode.startswith("vpt") else 0
    return build_prompted_vit(
        name, mode=mode, num_prompts=num_prompts, num_classes=5, **{**SHAPE, **overrides}
    )


class LogitSpy:
    """Records the logits every training step hands to the loss (the chain's end point and the
    unsplit loop both call `F.cross_entropy`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.logits: list[torch.Tensor] = []
        original = F.cross_entropy

        def spy(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.logits.append(logits.detach().clone())
            return original(logits, *args, **kwargs)

        monkeypatch.setattr(F, "cross_entropy", spy)

    def take(self) -> torch.Tensor:
        (logits,) = self.logits
        self.logits.clear()
        return logits


def snapshot(model: PromptedViT) -> dict[str, torch.Tensor]:
    """Every parameter, and the gradient of every tunable one, as they stand."""
    state = {f"param {k}": p.detach().clone() for k, p in model.named_parameters()}
    for key, p in model.named_tunable_parameters():
        assert p.grad is not None, key
        state[f"grad {key}"] = p.grad.clone()
    return state


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str):
    assert got.keys() == expected.keys()
    differ = {
        k: float((got[k] - expected[k]).abs().max())
        for k in got
        if not torch.equal(got[k], expected[k])
    }
    assert not differ, f"{where}: not bit-identical: {differ}"


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("family", "mode"), CASES)
def test_split_chain_trains_bit_for_bit_like_the_unsplit_model(
    family: str, mode: str, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    initial = build(family, mode)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(STEPS)]
    spy = LogitSpy(monkeypatch)

    # The unsplit model, step by step: loss, logits, then every gradient and parameter.
    whole = copy.deepcopy(initial).train()
    opt = OPTIMIZERS[optimizer](whole.tunable_parameters())
    expected = []
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(step)  # dropout that trains with the weights (RelPos's MLP, `full`)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(whole(x), y)
        loss.backward()
        opt.step()
        expected.append((loss.item(), spy.take(), snapshot(whole)))

    for plan in PLANS:
        split = copy.deepcopy(initial)
        chain = SplitChain(split, plan, OPTIMIZERS[optimizer])
        for step, ((x, y), (loss, logits, state)) in enumerate(zip(batches, expected, strict=True)):
            where = f"plan {plan.ranges} step {step}"
            torch.manual_seed(step)  # the chain draws the same random numbers in the same order
            assert chain.train_step(x, y).loss == loss, where
            assert torch.equal(spy.take(), logits), where
            assert_equal(snapshot(split), state, where)
        x = batches[0][0]
        with torch.no_grad():  # as inference runs (a trained attention bias takes another
            expected_logits = whole.eval()(x)  # kernel on CPU where it needs a gradient)
        assert torch.equal(chain.infer(x), expected_logits), f"plan {plan.ranges} inference"
        whole.train()


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_zero_prompts_is_timms_forward(family: str, mode: str) -> None:
    model = build(family, mode, num_prompts=0).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), model.backbone(x))


@pytest.mark.parametrize(
    ("model_name", "mode"),
    [
        ("vit_base_patch16_rpn_224", "full"),  # the case: no prefix, avg pooling
        ("vit_base_patch16_siglip_224", "full"),
        ("vit_base_patch16_siglip_224", "vpt-deep"),
        ("naflexvit_base_patch16_map", "vpt-deep"),  # at the run-config's img-size
    ],
)
def test_a_cluster_round_equals_centralised_training_from_the_run_config(
    model_name: str, mode: str
) -> None:
    # What the apps run (train_cluster over the split chain) against the unsplit model on the
    # same batches (train_centralised), from a run-config, with AdamW: bit for bit.
    cfg = RunConfig.from_run_config(
        {
            "foundation": "none",
            "model-name": model_name,
            "mode": mode,
            "num-prompts": 4 if mode.startswith("vpt") else 0,
            "optimizer": "adamw",
            "depth": 3,
            "embed-dim": 32,
            "num-heads": 2,
            "peers-per-cluster": 3,
            "batch-size": 16,
        }
    )
    data = load_image_data(data_spec(cfg))
    train = Subset(data.train, range(48))  # 3 steps
    split = build_model(cfg.model, cfg.cloud, data.num_classes, cfg.run.seed)
    whole = copy.deepcopy(split)
    train_cluster(split, derive(cfg).plan, train, cfg.training, seed=5)
    train_centralised(whole, train, cfg.training, epochs=1, seed=5)
    expected = whole.tunable_state()
    for key, value in split.tunable_state().items():
        assert torch.equal(value, expected[key]), key
