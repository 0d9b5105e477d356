"""Fine-tuning and evaluation loops, free of Flower (the apps only call these).

`train_cluster` is one fine-tuning client cluster's local work in a round (paper Sec. III-C.1):
the start point streams its private batches through the split chain for `local_epochs`, every
segment stepping its own optimizer. `train_centralised` is the same prompt tuning on one machine,
the reference HFSL is compared against.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gaisnet_flwr.config import CloudSection, ModelSection, TrainingSection
from gaisnet_flwr.derived import model_shape
from gaisnet_flwr.split.chain import (
    ChainStats,
    OptimizerSpec,
    RemotePeers,
    SplitChain,
)
from gaisnet_flwr.split.plan import SplitPlan
from gaisnet_flwr.split.precision import FP32, Precision
from gaisnet_flwr.vit.model import PromptedViT, build_prompted_vit


class NonFiniteError(ArithmeticError):
    """Training produced a NaN or infinite loss or module: the work stops, with the reason."""


def model_kwargs(model: ModelSection, cloud: CloudSection) -> dict[str, Any]:
    """What `build_prompted_vit` takes (and a remote peer's model spec carries): the model's
    shape (`derived.model_shape`) and where its backbone weights come from."""
    return dict(
        model_shape(model),
        pretrained=cloud.foundation == "timm",
        checkpoint_path=cloud.checkpoint_path if cloud.foundation == "file" else "",
    )


def build_model(
    model: ModelSection, cloud: CloudSection, num_classes: int, seed: int
) -> PromptedViT:
    """The edge model every party builds identically: the frozen backbone comes from the seed
    (or from pretrained weights), so only the tunable modules ever need to travel."""
    torch.manual_seed(seed)
    return build_prompted_vit(num_classes=num_classes, **model_kwargs(model, cloud))


def optimizer_spec(training: TrainingSection) -> OptimizerSpec:
    return OptimizerSpec(training.optimizer, training.lr, training.momentum, training.weight_decay)


def loader(dataset: Dataset, batch_size: int, seed: int | None) -> DataLoader:
    """Shuffled with its own generator when `seed` is given, so runs replay exactly. Derived
    seeds (run seed x round x epoch) can exceed torch's 64-bit range: they wrap (a no-op
    below 2**64)."""
    gen = torch.Generator().manual_seed(seed % 2**64) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=seed is not None, generator=gen)


@dataclass
class TrainResult:
    loss: float
    accuracy: float
    num_examples: int  # samples in the cluster's training set (FedAvg weight)
    chain: ChainStats


def train_cluster(
    model: PromptedViT,
    plan: SplitPlan,
    dataset: Dataset,
    training: TrainingSection,
    seed: int,
    proximal_mu: float = 0.0,
    device: torch.device | None = None,
    remote: RemotePeers | None = None,
    precision: Precision = FP32,
) -> TrainResult:
    """Split-learning fine-tuning inside one cluster for `training.local_epochs` epochs; with
    `remote`, the peers and end point are other devices and `model` gets their trained
    modules back at the end. In simulation every segment lives on `device` (the links deliver
    there) and computes in `precision`, whose smashed-data dtype the hops carry."""
    device = device or torch.device("cpu")
    model.to(device)
    chain = SplitChain(
        model,
        plan,
        optimizer_spec(training).factory(),
        remote=remote,
        proximal_mu=proximal_mu,
        precision=precision,
    )
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for epoch in range(training.local_epochs):
            batches = loader(dataset, training.batch_size, seed=seed * 1000 + epoch)
            for batch, (x, y) in enumerate(batches):
                step = chain.train_step(x.to(device), y.to(device))
                if not math.isfinite(step.loss):
                    raise NonFiniteError(
                        f"training loss is {step.loss} at epoch {epoch + 1}, batch {batch + 1}: "
                        f"the cluster's round stopped (optimizer={training.optimizer!r}, "
                        f"lr={training.lr}, momentum={training.momentum}, "
                        f"weight-decay={training.weight_decay})"
                    )
                total_loss += step.loss * step.num_examples
                correct += step.correct
                seen += step.num_examples
    except BaseException:
        with contextlib.suppress(Exception):  # release remote sessions; the error is the news
            chain.close()
        raise
    chain.close()
    return TrainResult(
        total_loss / max(seen, 1),
        correct / max(seen, 1),
        len(dataset),  # type: ignore[arg-type]
        chain.stats(),
    )


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


# An evaluation batch's activations at most (fp32 bytes): ViT-B/16 at 224 px takes ~55 images
# a batch within it, where 256 needed ~1.2 GB for one block's attention and MLP; a tiny ViT
# still takes 256 (the cap). On a CPU a quarter of that (ViT-B/16: 14 images): a bigger batch
# only costs memory there (ViT-B/16, 1 thread: 16 images a batch took 0.91x the CPU time of 58,
# two interleaved pairs at load 1.5-2), and in an in-process run the evaluation's working set
# comes on top of what training left in the process (issue 28).
EVAL_ACTIVATION_BYTES = 256 * 2**20
EVAL_ACTIVATION_BYTES_CPU = 64 * 2**20
EVAL_BATCH_CAP = 256


def eval_batch_size(model: nn.Module, budget: int = EVAL_ACTIVATION_BYTES) -> int:
    """The evaluation batch that keeps one block's no-grad working set (its attention scores
    and its MLP's hidden layer, fp32) within `budget`: tokens x (heads x tokens + 4 x width)
    floats per image. A model that is not a PromptedViT over a timm ViT gets the cap."""
    backbone = getattr(model, "backbone", None)
    try:
        tokens = int(model.tokens_before(0)) + int(getattr(model, "num_prompts", 0))  # type: ignore[operator]
        width = int(backbone.embed_dim)  # type: ignore[union-attr]
        heads = int(getattr(backbone.blocks[0].attn, "num_heads", 1))  # type: ignore[union-attr,index]
    except (AttributeError, TypeError, IndexError):
        return EVAL_BATCH_CAP
    per_image = 4 * tokens * (heads * tokens + 4 * width)
    return max(1, min(EVAL_BATCH_CAP, budget // per_image))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int | None = None,
    device: torch.device | None = None,
    precision: Precision = FP32,
) -> EvalResult:
    """Mean loss and accuracy of `model` on `dataset`, in batches of `batch_size` (default:
    `eval_batch_size`, sized to memory: the CPU's budget on a CPU)."""
    device = device or torch.device("cpu")
    budget = EVAL_ACTIVATION_BYTES_CPU if device.type == "cpu" else EVAL_ACTIVATION_BYTES
    batch_size = batch_size or eval_batch_size(model, budget)
    model.to(device).eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader(dataset, batch_size, seed=None):
        x, y = x.to(device), y.to(device)
        with precision.forward(device):
            logits = model(x).float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += int(y.shape[0])
    return EvalResult(total_loss / max(seen, 1), correct / max(seen, 1), seen)


def train_centralised(
    model: PromptedViT,
    dataset: Dataset,
    training: TrainingSection,
    epochs: int,
    seed: int,
    on_epoch: Callable[[int, PromptedViT], None] | None = None,
    device: torch.device | None = None,
    precision: Precision = FP32,
) -> None:
    """Prompt tuning of the unsplit model on pooled data: HFSL's reference point."""
    device = device or torch.device("cpu")
    model.to(device)
    opt = optimizer_spec(training).factory()(model.tunable_parameters())
    for epoch in range(epochs):
        model.train()
        for x, y in loader(dataset, training.batch_size, seed=seed * 1000 + epoch):
            opt.zero_grad(set_to_none=True)
            with precision.forward(device):
                logits = model(x.to(device))
            with precision.backward(device):
                F.cross_entropy(logits.float(), y.to(device)).backward()
            opt.step()
        if on_epoch:
            on_epoch(epoch + 1, model)
