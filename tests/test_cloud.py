"""Cloud pre-training checkpoints: reused, and never used when corrupt or mismatched."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from gaisnet_flwr.cloud import foundation as cloud
from gaisnet_flwr.cloud.foundation import (
    CheckpointError,
    Foundation,
    read_checkpoint,
)
from gaisnet_flwr.config import RunConfig
from gaisnet_flwr.data.images import ImageData, load_image_data
from gaisnet_flwr.derived import data_spec
from gaisnet_flwr.split.precision import resolve_device
from gaisnet_flwr.training.loops import build_model


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.of(
        depth=2,
        embed_dim=32,
        num_heads=2,
        peers_per_cluster=2,
        img_size=16,
        patch_size=8,
        pretrain_epochs=1,
        foundation_dir=str(tmp_path),
    )


@pytest.fixture
def data(cfg: RunConfig) -> ImageData:
    """The embedded data with a 64-image cloud corpus: checkpoints are what is tested here."""
    full = load_image_data(data_spec(cfg))
    return dataclasses.replace(full, cloud=Subset(full.cloud, range(64)))


@pytest.fixture
def count_pretraining(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = cloud.Foundation.pretrain

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cloud.Foundation, "pretrain", counted)
    return calls


def test_checkpoint_is_built_once_then_reused(
    cfg: RunConfig, data: ImageData, count_pretraining: list[int]
) -> None:
    path = Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    assert path == Foundation.of(cfg).checkpoint_path() and path.is_file()
    assert Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device)) == path
    assert count_pretraining == [1]
    # Every party builds the same model on top of it: pre-trained backbone, same prompts.
    a, b = Foundation.of(cfg).load(5), Foundation.of(cfg).load(5)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    random_start = build_model(cfg.model, cfg.cloud, 10, cfg.run.seed).backbone.state_dict()
    assert not torch.equal(
        a.backbone.state_dict()["blocks.0.attn.qkv.weight"],
        random_start["blocks.0.attn.qkv.weight"],
    )


def test_corrupt_checkpoint_is_detected_and_rebuilt(
    cfg: RunConfig, data: ImageData, count_pretraining: list[int]
) -> None:
    path = Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="does not match its SHA-256 sidecar"):
        Foundation.of(cfg).load(5)
    Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    assert count_pretraining == [1, 1]
    Foundation.of(cfg).load(5)  # sound again


def test_truncated_checkpoint_is_rejected(cfg: RunConfig, data: ImageData) -> None:
    path = Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or partial"):
        Foundation.of(cfg).load(5)


def test_checkpoint_of_another_configuration_is_rejected(cfg: RunConfig, data: ImageData) -> None:
    path = Foundation.of(cfg).ensure(data, resolve_device(cfg.run.device))
    other = cfg.replace(pretrain_epochs=2)
    assert Foundation.of(other).checkpoint_path() != path  # a different key, so a different file...
    reference = build_model(cfg.model, cfg.cloud, 10, cfg.run.seed).backbone.state_dict()
    # ...and a file whose recorded configuration differs is refused even under the right name.
    with pytest.raises(
        CheckpointError, match=r"another configuration \(differs in \['pretrain-epochs'\]"
    ):
        read_checkpoint(path, cloud.Foundation.of(other).meta(), reference)
    wider = Foundation.of(cfg.replace(embed_dim=64)).shipped(build_model(
        cfg.replace(embed_dim=64).model, cfg.cloud, 10, cfg.run.seed
    ))  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"tensor 'blocks.0.attn.proj.bias' has shape \(32,\), the model's"
    ):
        read_checkpoint(path, cloud.Foundation.of(cfg).meta(), wider)


def test_missing_checkpoint_names_the_fix(cfg: RunConfig, data: ImageData) -> None:
    with pytest.raises(
        CheckpointError, match="no foundation checkpoint at .* ships it to every node that lacks it"
    ):
        Foundation.of(cfg).load(5)


def test_other_foundations_need_no_checkpoint(cfg: RunConfig, data: ImageData) -> None:
    none = cfg.replace(foundation="none")
    assert Foundation.of(none).ensure(data, resolve_device(none.run.device)) is None
    Foundation.of(none).load(5)


def test_pretraining_gives_the_same_bytes_at_any_thread_count(
    cfg: RunConfig, data: ImageData
) -> None:
    """The foundation's weights do not depend on the caller's torch threads (pre-training pins
    its own count and restores the caller's)."""
    saved = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state = Foundation.of(cfg).pretrain(data.cloud, 10, torch.device("cpu"))
            assert torch.get_num_threads() == threads  # the caller's setting is back
            digests.append(cloud.weights_digest(state))
    finally:
        torch.set_num_threads(saved)
    assert digests[0] == digests[1]
    # The fingerprint sees every byte: one changed weight changes it.
    state["blocks.0.attn.qkv.weight"].view(-1)[0] += 1e-6
    assert cloud.weights_digest(state) != digests[0]
