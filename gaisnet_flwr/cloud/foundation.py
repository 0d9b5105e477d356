"""The cloud's foundation model: pre-training, checkpoints, delivery (paper Sec. II-A, III-B, V-A).

The cloud trains the *full* ViT on its own corpus, which no edge ever sees, and the resulting
backbone is what every edge and client freezes and prompt-tunes. The paper's Fig. 6 is about
exactly this: fine-tuning from a pre-trained foundation model is far ahead of fine-tuning from
a random one.

Foundations (`foundation` in run-config):
  * `cloud`: pre-train on the embedded corpus, once per configuration; the checkpoint is
    reused by later runs. With the default `edge-task = "new-classes"` the corpus is every
    image of digits 0-4 and the edges learn digits 5-9 on a fresh head: the cloud ships the
    backbone only. With "same-classes" (the earlier setting) it is a fixed 40 % share of all ten
    digits, disjoint from the edge data, and the cloud's head ships too.
  * `timm`: timm's pretrained weights by model name (needs internet once, e.g. ViT-B/16).
  * `file`: a local weights file (`checkpoint-path`), checked at start-up and loaded by
    `vit.checkpoint` (its docstring says what is refused and what is converted).
  * `none`: a randomly initialised backbone (the paper's "without pre-training").

A checkpoint is keyed by everything its weights depend on and stored with a SHA-256 sidecar;
a corrupt, truncated or mismatched file is detected and rebuilt, never silently used. Its state
goes through the same check as a user's file (`vit.checkpoint.check_state`), with half precision
refused: the cloud writes float32, so a float16/bfloat16 state is not the cloud's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import weakref
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flwr.common.logger import log
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from gaisnet_flwr.config import CloudSection, ConfigError, ModelSection, RunConfig
from gaisnet_flwr.data.images import CLOUD_DIGITS, CLOUD_FRACTION, ImageData, cloud_views
from gaisnet_flwr.deploy.shipping import (
    foundation_folder,
    recorded_sha256,
    sha256_of,
    sidecar,
    write_atomic,
)
from gaisnet_flwr.split.precision import non_finite, torch_threads
from gaisnet_flwr.training.loops import NonFiniteError, build_model, evaluate, loader
from gaisnet_flwr.vit.checkpoint import CheckpointFileError, check_state, load_torch
from gaisnet_flwr.vit.model import PromptedViT

CHECKPOINT_FORMAT = 1  # bump when the meaning of a checkpoint changes
PRETRAIN_BATCH_SIZE = 32
# Pre-training runs at this many torch threads whatever the caller's setting: the thread count
# changes how float sums are split (matmuls, reductions), so at 1 and 2 threads the same seed
# gave different weights (edge accuracies 0.912 vs 0.907). At one thread the foundation's bytes
# depend only on its configuration (tests/test_cloud.py checks 1 vs 2 threads).
PRETRAIN_THREADS = 1


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights themselves (names, dtypes, shapes and bytes, in name order): the
    foundation's fingerprint that reports print, independent of how the file was written."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A foundation checkpoint that is missing, corrupt or built for another configuration."""


@dataclass(frozen=True)
class Foundation:
    """What the frozen foundation depends on: the model's shape, where its weights come from,
    the dataset whose cloud corpus pre-trains it, and the seed. `Foundation.of(cfg)` picks
    these out of a run's config; every method reads only them."""

    model: ModelSection
    cloud: CloudSection
    corpus: str  # the dataset whose cloud share pre-trains the backbone
    seed: int
    edge_task: str = "new-classes"  # digits: what the cloud's corpus holds (data.EDGE_TASKS)

    @classmethod
    def of(cls, cfg: RunConfig) -> Foundation:
        return cls(cfg.model, cfg.cloud, cfg.data.dataset, cfg.run.seed, cfg.data.edge_task)

    @property
    def ships_head(self) -> bool:
        """Whether the edges get the cloud's classifier with the backbone: only when they learn
        the cloud's own classes (same-classes). On a new task each edge starts a fresh head
        (VPT), and the cloud hands over the backbone alone."""
        return self.edge_task == "same-classes"

    def cloud_classes(self) -> int:
        """The label space of the cloud's corpus (its own classifier's)."""
        return len(CLOUD_DIGITS) if self.edge_task == "new-classes" else 10

    def _corpus_name(self) -> str:
        if self.edge_task == "new-classes":
            return f"{self.corpus}-classes-{'-'.join(map(str, CLOUD_DIGITS))}"
        return f"{self.corpus}-cloud-{CLOUD_FRACTION}"

    def meta(self) -> dict[str, Any]:
        """Everything the pre-trained weights depend on (and nothing they do not)."""
        num_classes = self.cloud_classes()
        m = self.model
        return {
            "format": CHECKPOINT_FORMAT,
            "model-name": m.model_name,
            "img-size": m.img_size,
            "patch-size": m.patch_size,
            "depth": m.depth,
            "embed-dim": m.embed_dim,
            "num-heads": m.num_heads,
            "num-classes": num_classes,
            "corpus": self._corpus_name(),
            "views": "shift-1/8-1/4-rotate-20" if self.edge_task == "new-classes" else "none",
            "ships-head": self.ships_head,
            "pretrain-epochs": self.cloud.pretrain_epochs,
            "pretrain-lr": self.cloud.pretrain_lr,
            "seed": self.cloud.pretrain_seed,
        }

    def checkpoint_path(self) -> Path:
        meta = self.meta()
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        return self.directory() / f"foundation-{self.model.model_name}-{key}.pt"

    def directory(self) -> Path:
        """foundation-dir, or ~/.cache/gaisnet-flwr."""
        return foundation_folder(self.cloud.foundation_dir)

    def build(self, num_classes: int) -> PromptedViT:
        """The edge model with the backbone as the seed (or timm / a file) makes it."""
        return build_model(self.model, self.cloud, num_classes, self.seed)

    def pretrain(
        self,
        corpus: Dataset,
        num_classes: int,
        device: torch.device,
        test: Dataset | None = None,
    ) -> dict[str, torch.Tensor]:
        """Full-model supervised pre-training on the cloud corpus; returns the backbone weights.
        Runs at PRETRAIN_THREADS torch threads (the caller's count is restored after), so the
        weights are the same bytes whatever the caller's thread setting."""
        with torch_threads(PRETRAIN_THREADS):
            return self._pretrain(corpus, num_classes, device, test)

    def _pretrain(
        self, corpus: Dataset, num_classes: int, device: torch.device, test: Dataset | None
    ) -> dict[str, torch.Tensor]:
        seed = self.cloud.pretrain_seed
        if self.edge_task == "new-classes" and isinstance(corpus, TensorDataset):
            corpus = cloud_views(corpus)  # shifted and rotated views: features that transfer
        torch.manual_seed(seed)
        full = dataclasses.replace(self.model, mode="full", num_prompts=0)
        none = dataclasses.replace(self.cloud, foundation="none")
        model = build_model(full, none, num_classes, seed)
        model.to(device)
        epochs = self.cloud.pretrain_epochs
        opt = torch.optim.AdamW(model.parameters(), lr=self.cloud.pretrain_lr, weight_decay=0.05)
        started = time.perf_counter()
        for epoch in range(1, epochs + 1):
            model.train()
            for x, y in loader(corpus, PRETRAIN_BATCH_SIZE, seed=seed * 1000 + epoch):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"cloud pre-training diverged: loss {loss.item()} in epoch {epoch} "
                        f"(pretrain-lr={self.cloud.pretrain_lr}); lower pretrain-lr"
                    )
                loss.backward()
                opt.step()
            if epoch % 5 == 0 or epoch == epochs:
                note = ""
                if test is not None:
                    accuracy = evaluate(model, test, device=device).accuracy
                    note = f", edge test accuracy {accuracy:.3f}"
                log(
                    INFO,
                    "cloud pre-training: epoch %d/%d%s (%.0f s)",
                    epoch,
                    epochs,
                    note,
                    time.perf_counter() - started,
                )
        state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
        bad = non_finite(state)
        if bad:  # never save (and checksum) a foundation nobody can train on
            raise NonFiniteError(
                f"cloud pre-training produced non-finite weights in {bad[:3]} "
                f"(pretrain-lr={self.cloud.pretrain_lr}); lower pretrain-lr"
            )
        return state

    def shipped(self, model: PromptedViT) -> dict[str, torch.Tensor]:
        """What the cloud hands the edges out of `model`'s backbone: every weight, less the
        classifier head (and a MAP model's attention pool) unless `ships_head`."""
        state = model.backbone.state_dict()
        if self.ships_head:
            return state
        heads = tuple(f"{name}." for name in model.tuned_head_modules())
        return {k: v for k, v in state.items() if not k.startswith(heads)}

    def ensure(self, data: ImageData, device: torch.device) -> Path | None:
        """Cloud side: make sure the foundation checkpoint exists and is sound; pre-train if
        not."""
        if self.cloud.foundation != "cloud":
            return None
        if data.cloud is None:
            raise CheckpointError(f"dataset {self.corpus!r} ships no cloud corpus")
        path, meta, classes = self.checkpoint_path(), self.meta(), self.cloud_classes()
        with torch.device("meta"):  # only the shapes are needed: allocate nothing
            reference = self.shipped(self.build(classes))
        try:
            read_checkpoint(path, meta, reference)
            log(INFO, "cloud: reusing foundation checkpoint %s", path)
            return path
        except CheckpointError as err:
            writable_targets(path)  # a folder in the way: refused before pre-training
            if path.exists():
                log(WARNING, "cloud: %s; pre-training anew", err)
        size = len(data.cloud)  # type: ignore[arg-type]
        log(
            INFO,
            "cloud: pre-training the foundation model on %d images (%d epochs)",
            size,
            self.cloud.pretrain_epochs,
        )
        # The edge test set scores the cloud's head only when the edges share its classes.
        test = data.test if self.ships_head else None
        state = self.pretrain(data.cloud, classes, device, test=test)
        state = {k: v for k, v in state.items() if k in reference}
        save_checkpoint(path, state, meta)
        log(
            INFO,
            "cloud: foundation checkpoint saved to %s (weights sha256 %s)",
            path,
            weights_digest(state)[:16],
        )
        return path

    def fingerprint(self, num_classes: int) -> str:
        """SHA-256 of the frozen foundation's weights every party loads (`weights_digest`, the
        backbone without a fresh head): for a given configuration, the same bytes at any torch
        thread count."""
        return weights_digest(self.shipped(self.load(num_classes)))

    def load(self, num_classes: int) -> PromptedViT:
        """Every party: the edge model on top of the shared frozen foundation (paper Sec.
        III-B: the backbone is synchronised independently; only tunable modules travel). The
        head is the cloud's when it ships one, else fresh (seeded by the run seed)."""
        model = self.build(num_classes)
        if self.cloud.foundation == "cloud":
            path = self.checkpoint_path()
            if self.ships_head and num_classes != self.cloud_classes():
                raise CheckpointError(
                    f"the cloud's head has {self.cloud_classes()} classes; the edge model "
                    f"{num_classes}"
                )
            try:
                state = read_checkpoint(path, self.meta(), self.shipped(model))
            except CheckpointError as err:
                raise CheckpointError(
                    f"{err}. The cloud (ServerApp) pre-trains it at start-up and ships it to "
                    f"every node that lacks it, checked by SHA-256 (query.foundation); this "
                    f"node's foundation-dir is {path.parent}"
                ) from err
            model.backbone.load_state_dict(state, strict=self.ships_head)
        return share_frozen(model)


# -- one frozen foundation per process ------------------------------------------------------------
# In an in-process run the ServerApp and the ClientApps' cache each load the edge model: two
# copies of a backbone that never changes (a message loads and trains only the tunable modules:
# tests/test_scale.py), 344 MB each at ViT-B/16 (issue 28: "no needless model copies"). A model
# loaded while another with bitwise-equal frozen weights is alive in the process takes that
# one's tensors instead; its tunable modules (prompts, head) stay its own. Held weakly: the
# process keeps no model alive for sharing's sake.
_LOADED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _frozen(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def share_frozen(model: PromptedViT) -> PromptedViT:
    """`model`, its frozen parameters replaced by those of a live loaded model of this process
    whose frozen weights are bitwise the same (compared, not assumed: another seed, checkpoint
    or file shares nothing). Each model gets Parameter objects of its own over the shared
    storage, so moving one model to another device (`Module.to` swaps `param.data`) leaves the
    other where it is; nothing writes into frozen weights in place after `Foundation.load`."""
    frozen = _frozen(model)
    if not frozen:  # mode 'full': every weight is tuned, nothing to share
        return model
    for other in list(_LOADED):
        theirs = _frozen(other)
        if theirs.keys() == frozen.keys() and all(
            (t := theirs[n]).shape == p.shape
            and t.dtype == p.dtype
            and t.device == p.device
            and torch.equal(t, p)
            for n, p in frozen.items()
        ):
            for name, param in theirs.items():
                owner, _, leaf = name.rpartition(".")
                shared = nn.Parameter(param.detach(), requires_grad=False)
                setattr(model.get_submodule(owner), leaf, shared)
            break
    _LOADED.add(model)
    return model


# How long `foundation='timm'` waits to learn whether the weights' host can be reached: without
# this check, huggingface_hub retried for 46 s offline and then printed an 80-line traceback.
HUB_PROBE_TIMEOUT_S = 3.0
TIMM_FIX = (
    "run once where the host is reachable (the weights stay in the cache; copy the cache "
    "folder to offline machines), or copy the weights file downloaded elsewhere and run with "
    "foundation='file' checkpoint-path=FILE (`python scripts/timm_checkpoint.py` converts it "
    "when the run's model has another shape; docs/configure.md, 'Foundation weights')"
)


def check_timm_weights(model_name: str) -> None:
    """`foundation='timm'`: fail in seconds, naming the fix, when timm's pretrained weights for
    `model_name` are neither in the local cache (Hugging Face's, or torch hub's for a URL) nor
    downloadable (the host does not answer within HUB_PROBE_TIMEOUT_S, or HF_HUB_OFFLINE=1)."""
    import socket
    from urllib.parse import urlparse

    import timm.models
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise ConfigError(f"foundation='timm': timm has no pretrained weights for {model_name!r}")
    if cfg.hf_hub_id:
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, n), str) for n in names):
            return
        where = f"Hugging Face repo {cfg.hf_hub_id}, cache {constants.HF_HUB_CACHE}"
        url = constants.ENDPOINT
    elif isinstance(cfg.url, str) and cfg.url:  # timm also allows (url, filename) pairs
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return
        where, url = f"{cfg.url}, cache {cached.parent}", cfg.url
    else:
        raise ConfigError(f"foundation='timm': timm has no download for {model_name!r}")
    what = f"foundation='timm' needs timm's pretrained weights for {model_name!r} ({where})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{what}: not cached, and HF_HUB_OFFLINE is set. Fix: {TIMM_FIX}")
    host = urlparse(url)
    try:
        with socket.create_connection(
            (host.hostname or "", host.port or 443), timeout=HUB_PROBE_TIMEOUT_S
        ):
            return  # reachable: timm downloads them at model build
    except OSError as err:
        raise ConfigError(
            f"{what}: not cached, and {host.hostname} cannot be reached ({err}). Fix: {TIMM_FIX}"
        ) from None


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), with a SHA-256 sidecar of the exact bytes."""
    buffer = io.BytesIO()
    torch.save({"meta": meta, "state": state}, buffer)
    payload = buffer.getvalue()
    write_atomic(path, payload)
    write_atomic(sidecar(path), sha256_of(payload).encode())


def read_checkpoint(
    path: Path, meta: dict[str, Any], reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Load a checkpoint, checking its bytes (the sidecar), its configuration (`meta`) and its
    state: the one check every weights file gets (`vit.checkpoint.check_state`: names, shapes,
    dtypes, finite values), with half precision refused (the cloud writes float32 only)."""
    writable_targets(path)
    if not path.is_file():
        raise CheckpointError(f"no foundation checkpoint at {path}")
    payload = path.read_bytes()
    # a sidecar that is missing, unreadable or not text is as bad as a wrong digest
    if recorded_sha256(path) != sha256_of(payload):
        raise CheckpointError(f"{path} does not match its SHA-256 sidecar (corrupt or partial)")
    try:
        saved = load_torch(payload, str(path))
    except CheckpointFileError as err:
        raise CheckpointError(f"cannot be decoded: {err}") from err
    if not isinstance(saved, dict) or set(saved) != {"meta", "state"}:
        what = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(
            f"{path} is not a foundation checkpoint: it holds {what}, not 'meta' and 'state'"
        )
    saved_meta = saved["meta"]
    if not isinstance(saved_meta, dict):
        raise CheckpointError(
            f"{path}: its 'meta' is a {type(saved_meta).__name__}, not the table of the "
            f"configuration it was built for: not a checkpoint the cloud wrote"
        )
    if saved_meta != meta:
        changed = sorted(
            str(k) for k in set(meta) | set(saved_meta) if meta.get(k) != saved_meta.get(k)
        )
        raise CheckpointError(f"{path} was built for another configuration (differs in {changed})")
    try:
        return check_state(saved["state"], reference, str(path), half="refuse")
    except CheckpointFileError as err:
        raise CheckpointError(str(err)) from err


def writable_targets(path: Path) -> None:
    """The checkpoint and its sidecar can be written: neither name is taken by a folder (checked
    before pre-training, which would otherwise run and then fail to save)."""
    for target, what in ((path, "the foundation checkpoint"), (sidecar(path), "its sidecar")):
        if target.is_dir():
            raise CheckpointError(
                f"{target} is a folder, where {what} goes: remove it, or set foundation-dir "
                f"to another folder"
            )
