"""A MAP-pooled ViT (SigLIP: no prefix tokens, an attention pool) through the real apps in process:
the run-config's `model-name` reaches it, the attention pool trains with the head at every
cluster's end point, is aggregated per module and lands in the final modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import load_image_data
from gaisnet_flwr.derived import data_spec

pytestmark = pytest.mark.slow


def test_siglip_attention_pool_trains_through_the_apps(tmp_path: Path) -> None:
    config = {
        "model-name": "vit_base_patch16_siglip_224",  # global_pool='map', no class token
        "depth": 2,
        "embed-dim": 32,
        "num-heads": 2,
        "num-prompts": 2,
        "peers-per-cluster": 2,
        "num-rounds": 2,
        "batch-size": 64,
        "pretrain-epochs": 1,
        "device": "cpu",
        "output-dir": str(tmp_path / "run"),
        "foundation-dir": str(tmp_path / "foundation"),
    }
    run = run_inprocess(config, num_clusters=2)

    rows = run.metrics()
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    final = {k.removeprefix("edge0/"): v for k, v in run.modules().items()}
    cfg = RunConfig.from_run_config(config)
    model = Foundation.of(cfg).load(load_image_data(data_spec(cfg)).num_classes)
    initial = {k: v.numpy() for k, v in model.tunable_state().items()}
    pool = sorted(k for k in initial if k.startswith("attn_pool."))
    assert "attn_pool.latent" in pool and "attn_pool.kv.weight" in pool
    assert set(final) == set(initial) == {"prompt.0", "prompt.1", "head.weight", "head.bias", *pool}
    for key in [*pool, "head.weight", "prompt.0"]:
        assert final[key].shape == initial[key].shape
        assert not np.array_equal(final[key], initial[key]), f"{key} did not train"
