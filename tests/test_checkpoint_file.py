"""Issue 29, Build 1: a checkpoint a user brings (`foundation='file'`, `checkpoint-path`) is
checked at start-up, and the cloud's own checkpoint goes through the same check.

Each of the issue's nine bad files is refused by the start-up check (`derived.derive`, which the
ServerApp's `check_run_config` runs first, before Flower, Ray or data) with a `ConfigError`
naming `checkpoint-path`, the file and the problem; the loads that build the model refuse the
same files the same way. The good files (torch zip and pickle, safetensors, timm's wrappers,
half precision, a JAX `.npz`) load exactly the weights they hold.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from gaisnet_flwr.apps.inprocess import run_inprocess
from gaisnet_flwr.cloud import foundation as cloud
from gaisnet_flwr.cloud.foundation import CheckpointError, Foundation, save_checkpoint
from gaisnet_flwr.config import ConfigError, RunConfig
from gaisnet_flwr.derived import derive
from gaisnet_flwr.training.loops import build_model
from gaisnet_flwr.vit.checkpoint import CheckpointFileError, read_weights_file

TINY: dict[str, Any] = {
    "depth": 2,
    "embed-dim": 32,
    "num-heads": 2,
    "img-size": 16,
    "patch-size": 8,
    "peers-per-cluster": 1,
    "device": "cpu",
}
CLASSES = 5  # the default edge task: digits 5-9 on a fresh head


def start_up(run_config: dict[str, Any]) -> RunConfig:
    """What the ServerApp checks before any work: the keys, then the environment (`derive`)."""
    cfg = RunConfig.from_run_config(run_config)
    derive(cfg)
    return cfg


def file_config(path: Path) -> dict[str, Any]:
    return {**TINY, "foundation": "file", "checkpoint-path": str(path)}


def weights(seed: int = 1, classes: int = CLASSES) -> dict[str, torch.Tensor]:
    """A tiny ViT backbone's state, as a user's training would save it."""
    cfg = RunConfig.from_run_config(TINY)
    return build_model(cfg.model, cfg.cloud, classes, seed).backbone.state_dict()


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        start_up(file_config(path))
    message = str(err.value)
    assert message.startswith("checkpoint-path: ") and str(path) in message, message
    return message


# -- the nine bad files of the issue -----------------------------------------------------------
class Marker:
    """A pickle that, loaded unsafely, would create a file (a harmless stand-in for code)."""

    path = ""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.path, "w"))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def malicious_pickle(path: Path) -> None:
    Marker.path = str(path.with_name("code-ran"))
    torch.save({"cls_token": Marker()}, path)


def nan_weight(path: Path) -> None:
    state = weights()
    state["blocks.0.attn.qkv.weight"][3, 4] = math.nan
    torch.save(state, path)


def wrong_shape(path: Path) -> None:
    state = weights()
    state["pos_embed"] = torch.zeros(1, 9, 32)
    torch.save(state, path)


def missing_key(path: Path) -> None:
    state = weights()
    del state["norm.weight"]
    torch.save(state, path)


def a_list(path: Path) -> None:
    torch.save(list(weights().values()), path)


def random_npz(path: Path) -> None:
    np.savez(path, a=np.random.default_rng(0).random(3), b=np.arange(4))


def random_safetensors(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(4096))


BAD_FILES = [
    ("empty.pt", empty, "is empty (0 bytes), not a weights file"),
    ("random.pt", random_bytes, "not a weights file: its content is none of torch (zip)"),
    ("evil.pt", malicious_pickle, "refused: it pickles objects other than tensors and plain "
     "containers (io.open); only weights are loaded (weights_only), nothing in it ran"),
    ("nan.pt", nan_weight, "tensor 'blocks.0.attn.qkv.weight' holds 1 non-finite value(s) (NaN "
     "or inf) of 3072; nothing can be trained on it"),
    ("shape.pt", wrong_shape, "tensor 'pos_embed' has shape (1, 9, 32), the model's (1, 5, 32)"),
    ("missing.pt", missing_key, "lacks 1 of the model's tensors: 'norm.weight'"),
    ("list.pt", a_list, "holds a list, not a state dict (a table of tensors by name)"),
    ("random.npz", random_npz, "a .npz of 'a', 'b', not a JAX ViT checkpoint (it lacks "
     "'embedding/kernel'"),
    ("random.safetensors", random_safetensors, "the name says safetensors, but its header "
     "length"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "write", "fragment"), BAD_FILES, ids=[name for name, _, _ in BAD_FILES]
)
def test_the_issues_bad_files_are_refused_at_start_up_naming_file_and_problem(
    tmp_path: Path, name: str, write: Callable[[Path], None], fragment: str
) -> None:
    path = tmp_path / name
    write(path)
    message = refusal(path)
    assert fragment in message, message
    assert not (tmp_path / "code-ran").exists()  # the malicious pickle ran nothing
    # Building the model (every party, later) refuses it the same way: nothing trains on it.
    cfg = RunConfig.of(**{k.replace("-", "_"): v for k, v in TINY.items()})
    cfg = cfg.replace(foundation="file", checkpoint_path=str(path))
    with pytest.raises(CheckpointFileError, match=r"^" + str(path)) as err:
        build_model(cfg.model, cfg.cloud, CLASSES, 0)
    assert fragment in str(err.value)


def test_a_nan_checkpoint_stops_the_run_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gaisnet_flwr.apps.server_app as server_app

    loaded: list[int] = []
    monkeypatch.setattr(server_app, "load_image_data", lambda spec: loaded.append(1))
    nan_weight(tmp_path / "nan.pt")
    config = {**file_config(tmp_path / "nan.pt"), "output-dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="'blocks.0.attn.qkv.weight' holds 1 non-finite"):
        run_inprocess(config, num_clusters=2)
    assert not loaded


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"cls_token": torch.zeros(1, 1, 32, dtype=torch.float64)},
         "tensor 'cls_token' is float64, the model's float32 (rounding to float32 would change "
         "the weights; save them as float32)"),
        ({"norm.bias": torch.zeros(32, dtype=torch.int64)},
         "tensor 'norm.bias' is int64, the model's float32"),
        ({"extra.weight": torch.zeros(2)}, "1 tensor(s) the model does not have: 'extra.weight'"),
        ({"norm.weight": 3}, "'norm.weight' is a int, not a tensor"),
        ({"pos_embed": torch.zeros(1, 5, 32).to_sparse()}, "only dense tensors"),
    ],
)  # fmt: skip
def test_dtypes_names_and_values_are_checked_by_key(
    tmp_path: Path, change: dict[str, Any], fragment: str
) -> None:
    path = tmp_path / "w.pt"
    torch.save({**weights(), **change}, path)
    assert fragment in refusal(path)


def test_a_pickled_module_is_refused_with_the_fix(tmp_path: Path) -> None:
    cfg = RunConfig.from_run_config(TINY)
    path = tmp_path / "model.pt"
    torch.save(build_model(cfg.model, cfg.cloud, CLASSES, 0).backbone, path)
    message = refusal(path)
    assert "VisionTransformer" in message and "Save the model's state_dict()" in message


def test_a_torch_file_named_safetensors_and_a_folder_are_told_apart(tmp_path: Path) -> None:
    named = tmp_path / "w.safetensors"
    torch.save(weights(), named)  # the content decides, not the name
    start_up(file_config(named))
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ConfigError, match="checkpoint-path to name a weights file; .* is not a"):
        start_up(file_config(tmp_path / "dir.pt"))


# -- good files load exactly what they hold ---------------------------------------------------
def loaded_backbone(path: Path) -> dict[str, torch.Tensor]:
    cfg = start_up(file_config(path))  # accepted at start-up
    return build_model(cfg.model, cfg.cloud, CLASSES, 0).backbone.state_dict()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], value.float()), key


@pytest.mark.parametrize(
    "save",
    [
        lambda state, path: torch.save(state, path),
        lambda state, path: torch.save(state, path, _use_new_zipfile_serialization=False),
        lambda state, path: safetensors.torch.save_file(state, path),
        lambda state, path: torch.save({"state_dict": state, "epoch": 3}, path),
        lambda state, path: torch.save({f"module.{k}": v for k, v in state.items()}, path),
    ],
    ids=["torch-zip", "torch-pickle", "safetensors", "timm-wrapper", "data-parallel"],
)
def test_good_files_load_exactly_their_weights(
    tmp_path: Path, save: Callable[[dict, Path], None]
) -> None:
    state = weights()
    path = tmp_path / "w.bin"
    save(state, path)
    assert_same(loaded_backbone(path), state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_converted_exactly_and_logged(
    tmp_path: Path, dtype: torch.dtype, caplog: pytest.LogCaptureFixture
) -> None:
    half = {k: v.to(dtype) for k, v in weights().items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    with caplog.at_level(logging.WARNING, logger="gaisnet.checkpoint"):
        got = loaded_backbone(path)
    assert_same(got, half)  # every half value is a float32: exact
    assert f"{len(half)} tensor(s) stored in half precision converted to float32" in caplog.text


def test_a_head_for_other_classes_is_left_fresh_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = weights(classes=1000)  # e.g. an ImageNet classifier
    path = tmp_path / "imagenet.pt"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="gaisnet.checkpoint"):
        got = loaded_backbone(path)
    assert got["head.weight"].shape == (CLASSES, 32)
    assert_same({k: v for k, v in got.items() if not k.startswith("head.")},
                {k: v for k, v in state.items() if not k.startswith("head.")})  # fmt: skip
    assert "the classifier ('head.bias', 'head.weight') is left fresh" in caplog.text


def jax_npz(state: dict[str, torch.Tensor], path: Path, heads: int = 2) -> None:
    """Write a timm ViT state as a JAX (AugReg) `.npz`: the inverse of timm's `_load_weights`."""
    d = state["cls_token"].shape[-1]
    out = {
        "embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": state["head.weight"].T,
        "head/bias": state["head.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[mha + f"{n}/kernel"] = qkv_w[j * d : (j + 1) * d].T.reshape(d, heads, -1)
            out[mha + f"{n}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(heads, -1)
        proj = state[b + "attn.proj.weight"]
        out[mha + "out/kernel"] = proj.reshape(d, heads, -1).permute(1, 2, 0)
        out[mha + "out/bias"] = state[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[p + f"{ln}/scale"] = state[b + f"{norm}.weight"]
            out[p + f"{ln}/bias"] = state[b + f"{norm}.bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = state[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = state[b + f"mlp.fc{r + 1}.bias"]
        i += 1
    np.savez(path, **{k: v.contiguous().numpy() for k, v in out.items()})


def test_a_jax_npz_is_converted_by_timm_and_checked(tmp_path: Path) -> None:
    state = weights()
    path = tmp_path / "augreg.npz"
    jax_npz(state, path)
    assert_same(loaded_backbone(path), state)
    # An .npz missing a layer, or holding a NaN, is named by array.
    arrays = dict(np.load(path))
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    np.savez(tmp_path / "short.npz", **arrays)
    assert "lacks array 'Transformer/encoderblock_1/LayerNorm_2/scale'" in refusal(
        tmp_path / "short.npz"
    )
    arrays = dict(np.load(path))
    arrays["cls"][0, 0, 1] = np.inf
    np.savez(tmp_path / "inf.npz", **arrays)
    assert "array 'cls' holds 1 non-finite value(s)" in refusal(tmp_path / "inf.npz")
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    assert "Python objects (pickled arrays)" in refusal(tmp_path / "objects.npz")


def test_the_start_up_check_is_done_once_per_file_version(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(weights(), path)
    start_up(file_config(path))
    nan_weight(path)  # rewritten in place: another version, checked again
    assert "non-finite" in refusal(path)


# -- the cloud's own checkpoint ----------------------------------------------------------------
@pytest.fixture
def cloud_cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.of(
        depth=2, embed_dim=32, num_heads=2, peers_per_cluster=1, img_size=16, patch_size=8,
        pretrain_epochs=1, foundation_dir=str(tmp_path / "fm"),
    )  # fmt: skip


def write_cloud(cfg: RunConfig, change: Callable[[dict], dict] = lambda s: s) -> Path:
    """A checkpoint written as the cloud writes it (with its sidecar), `change`d first."""
    foundation = Foundation.of(cfg)
    state = dict(foundation.shipped(foundation.build(foundation.cloud_classes())))
    saved = change({"meta": foundation.meta(), "state": state})
    path = foundation.checkpoint_path()
    save_checkpoint(path, saved["state"], saved["meta"])
    return path


@pytest.fixture
def pretrained(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts pre-training runs, each replaced by a seeded build (no data needed)."""
    calls: list[int] = []

    def pretend(self: Foundation, corpus: Any, num_classes: int, *_: Any, **__: Any) -> dict:
        calls.append(1)
        return dict(self.build(num_classes).backbone.state_dict())

    monkeypatch.setattr(cloud.Foundation, "pretrain", pretend)
    return calls


def ensure(cfg: RunConfig) -> Path | None:
    data = dataclasses.make_dataclass("Data", ["cloud", "test"])(cloud=[0] * 8, test=None)
    return Foundation.of(cfg).ensure(data, torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_cloud_checkpoint_is_refused_by_rule_and_rebuilt(
    cloud_cfg: RunConfig, pretrained: list[int], dtype: torch.dtype,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    def to_half(saved: dict) -> dict:
        return {**saved, "state": {k: v.to(dtype) for k, v in saved["state"].items()}}

    path = write_cloud(cloud_cfg, to_half)  # right shapes, a valid SHA-256 sidecar
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"is {name}; this checkpoint must be float32"):
        Foundation.of(cloud_cfg).load(CLASSES)  # a client: refused, not upcast silently
    with caplog.at_level(logging.WARNING):
        assert ensure(cloud_cfg) == path  # the cloud: logged, pre-trained anew
    assert f"is {name}; this checkpoint must be float32" in caplog.text and pretrained == [1]
    Foundation.of(cloud_cfg).load(CLASSES)


def test_meta_written_as_a_string_is_refused_by_name(
    cloud_cfg: RunConfig, pretrained: list[int]
) -> None:
    write_cloud(cloud_cfg, lambda saved: {**saved, "meta": "format=1"})
    with pytest.raises(CheckpointError, match="its 'meta' is a str, not the table of the"):
        Foundation.of(cloud_cfg).load(CLASSES)
    ensure(cloud_cfg)  # the server rebuilds it
    assert pretrained == [1]
    Foundation.of(cloud_cfg).load(CLASSES)


@pytest.mark.parametrize("where", ["checkpoint", "sidecar"])
def test_a_folder_where_the_checkpoint_goes_is_refused_before_pretraining(
    cloud_cfg: RunConfig, pretrained: list[int], where: str
) -> None:
    path = Foundation.of(cloud_cfg).checkpoint_path()
    folder = path if where == "checkpoint" else path.with_name(path.name + ".sha256")
    folder.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=f"{folder} is a folder, where"):
        ensure(cloud_cfg)
    assert pretrained == []  # nothing ran
    with pytest.raises(CheckpointError, match=f"{folder} is a folder"):
        Foundation.of(cloud_cfg).load(CLASSES)


def test_the_cloud_checkpoint_is_checked_by_the_same_function(cloud_cfg: RunConfig) -> None:
    def poison(saved: dict) -> dict:
        state = dict(saved["state"])
        state["blocks.1.mlp.fc2.bias"] = torch.full_like(state["blocks.1.mlp.fc2.bias"], math.inf)
        return {**saved, "state": state}

    write_cloud(cloud_cfg, poison)
    with pytest.raises(CheckpointError, match="'blocks.1.mlp.fc2.bias' holds 32 non-finite"):
        Foundation.of(cloud_cfg).load(CLASSES)


def test_read_weights_file_names_a_damaged_zip(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    buffer = io.BytesIO()
    torch.save(weights(), buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    cfg = RunConfig.from_run_config(TINY)
    backbone = build_model(cfg.model, cfg.cloud, CLASSES, 0).backbone
    with pytest.raises(CheckpointFileError, match=f"{path}: .*(zip|torch)"):
        read_weights_file(path, backbone)
