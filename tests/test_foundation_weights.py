"""Foundation weights for machines that cannot download them: `foundation='timm'` fails in
seconds naming the fix, and timm weights downloaded elsewhere convert into the checkpoint file
`foundation='file'` loads (docs/configure.md, 'Foundation weights')."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from gaisnet_flwr.cloud.foundation import check_timm_weights
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.experiments import timm_checkpoint
from gaisnet_flwr.training.loops import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = {"depth": 2, "embed-dim": 32, "num-heads": 2, "patch-size": 8}
RUN = {**SHAPE, "peers-per-cluster": 2, "img-size": 32}  # digits: a 5-class head


def test_timm_weights_missing_offline_fail_in_seconds_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No network in tests: HF_HUB_OFFLINE, and an empty cache.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_timm_weights("vit_base_patch16_224")
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "timm/vit_base_patch16_224" in message and "not cached" in message
    assert "scripts/timm_checkpoint.py" in message and "foundation='file'" in message


def test_downloaded_timm_weights_convert_into_the_file_foundation_loads(tmp_path: Path) -> None:
    # What a machine with internet downloads: a timm ViT's weights with ImageNet's 1000-class
    # head, at another image size (64 px: 64 patches) than the run's (32 px: 16 patches).
    source = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, **{k.replace("-", "_"): v for k, v in SHAPE.items()}
    )
    downloaded = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, downloaded)

    out = tmp_path / "foundation.pt"
    assert timm_checkpoint.main(
        ["--weights", str(downloaded), "--run-config", " ".join(f"{k}={v}" for k, v in RUN.items()),
         "--out", str(out)]
    ) == 0  # fmt: skip

    cfg = RunConfig.from_run_config({**RUN, "foundation": "file", "checkpoint-path": str(out)})
    model = build_model(cfg.model, cfg.cloud, num_classes=5, seed=0)  # what every party builds
    loaded, original = model.backbone.state_dict(), source.state_dict()
    assert loaded["head.weight"].shape == (5, 32)  # a fresh head for the run's classes
    assert loaded["pos_embed"].shape == (1, 17, 32)  # resampled to 16 patches + class token
    for key, value in original.items():
        if not key.startswith(("head.", "pos_embed")):
            assert torch.equal(loaded[key], value), f"{key} was not carried over"


def test_a_missing_weights_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        timm_checkpoint.main(["--weights", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "nope: not a file" in capsys.readouterr().err


def test_timm_weights_of_the_runs_shape_load_as_they_are(tmp_path: Path) -> None:
    # The same shape as the run's model (32 px here; 224 px for the paper's preset): the file
    # timm downloads works as checkpoint-path without conversion, its 1000-class head left out.
    shape = {k.replace("-", "_"): v for k, v in RUN.items() if k != "peers-per-cluster"}
    source = timm.create_model("vit_tiny_patch16_224", **shape)
    downloaded = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, downloaded)
    file = {"foundation": "file", "checkpoint-path": str(downloaded)}
    cfg = RunConfig.from_run_config({**RUN, **file})
    loaded = build_model(cfg.model, cfg.cloud, num_classes=5, seed=0).backbone.state_dict()
    assert loaded["head.weight"].shape == (5, 32)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(loaded[key], value), key
