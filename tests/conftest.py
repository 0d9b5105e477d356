"""Shared fixtures: tiny ViTs that run in milliseconds on a CPU (timm shape overrides)."""

from __future__ import annotations

import pytest
import torch

# A 32x32 input, 8x8 patches -> 16 patch tokens; depth 6 so plans over 1-6 peers exist.
TINY = dict(img_size=32, patch_size=8, depth=6, embed_dim=32, num_heads=2)

# The four prefix-token / pooling layouts a PromptedViT must handle exactly.
VARIANTS = {
    "cls-token": ("vit_tiny_patch16_224", {}),
    "avg-pool": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, fc_norm=True)),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
