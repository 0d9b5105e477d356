"""Image data for the client clusters: load a dataset, partition it across clusters, split each
cluster's share into train and validation.

Three sources, one shape (images are float tensors ``[3, img_size, img_size]``, labels are ints):

- ``digits`` — the embedded default. scikit-learn's 1797 real 8x8 digit images ship inside the
  package, so the app runs offline with no download. Kept in memory as tensors. Its edge task
  (``DataSpec.edge_task``) is, by default, a few-shot task on classes the cloud never saw:
  ``new-classes`` gives the cloud every image of digits 0-4 to pre-train on and the edges digits
  5-9 (labels 0-4), with a fixed test set of 80 images per class; ``same-classes`` is the
  earlier setting (the cloud a 40 % share of all ten digits, the edges the rest).
- ``flowers102`` — the paper's dataset (Sec. V: ViT-B/16 on flower classification), read lazily by
  torchvision from ``data_dir``. It must have been downloaded once on a machine with internet.
- ``imagefolder`` — any ``data_dir/<class>/<image>`` tree, read lazily by torchvision.

IID partitions are a seeded shuffle cut into shards; the non-IID ones are delegated to
flwr-datasets' partitioners, run on an in-memory table of ``(label, idx)`` rows, so nothing is
downloaded and only indices move around. Everything is
deterministic: the same :class:`DataSpec` gives the same test split, partitions and cluster splits.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset
from torchvision import transforms

from gaisnet_flwr.config import DATASETS, DOMAINS, EDGE_TASKS, PARTITIONINGS
from gaisnet_flwr.data.digits_file import load_digits

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

# Hugging Face `datasets`, Flower Datasets (which imports matplotlib and seaborn for its plots)
# and torchvision's dataset classes are imported where they are used: a ClientApp that draws
# `cluster-samples` from the embedded digits never needs them (issue 16: light actors).

# DATASETS, PARTITIONINGS, EDGE_TASKS (what the edges of the embedded digits learn, next to
# what the cloud pre-trained on) and DOMAINS are the run-config's vocabulary (config.py).
# new-classes: the cloud pre-trains on every image of these digits, the edges learn the others
# (5-9, relabelled 0-4): a foundation meets a task it was never taught, as ImageNet's ViT-B/16
# meets Flowers102 in the paper.
CLOUD_DIGITS = (0, 1, 2, 3, 4)
# new-classes: a fixed test set of this many edge images per class (400 in all: one image is
# 0.25 points), drawn once with TEST_SPLIT_SEED; the remaining ~100 per class are the train pool.
EDGE_TEST_PER_CLASS = 80

# The held-out test split must not move with DataSpec.seed: every run, whatever its seed, is
# evaluated on the same images, so results stay comparable across seeds.
TEST_SPLIT_SEED = 0
# digits: the cloud's pre-training corpus is a fixed, stratified share of the images that no edge
# ever sees (paper Sec. III-B: the cloud holds large-scale corpora, the edges their domain data).
CLOUD_FRACTION = 0.4
CLOUD_SPLIT_SEED = 1
TEST_FRACTION = 0.2  # the paper's training-validation ratio of 4:1 (Sec. V)

# ImageNet statistics: timm's ViTs (and their pretrained weights) expect inputs normalised this way.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Dirichlet draws are retried until every cluster holds at least this many samples (capped by the
# average share for small data), enough for a meaningful train/val split per cluster.
DIRICHLET_MIN_PARTITION_SIZE = 10


class DataError(ValueError):
    """A data setting is invalid or the data is missing; the message names the field and the fix."""


def run_config_words(message: str) -> str:
    """A DataError's message with DataSpec's field names as the run-config keys a user types
    (`DataSpec.classes_per_cluster` -> `classes-per-cluster`)."""
    return re.sub(r"DataSpec\.(\w+)", lambda m: m.group(1).replace("_", "-"), message)


@dataclass(frozen=True)
class DataSpec:
    """What data to load and how to spread it over the client clusters.

    Attributes:
        dataset: one of :data:`DATASETS`.
        data_dir: root of ``flowers102`` / ``imagefolder`` data; ignored for ``digits``.
        img_size: images are resized to ``img_size x img_size``, 3 channels.
        partitioning: one of :data:`PARTITIONINGS`.
        classes_per_cluster: for ``"classes"``: every cluster sees exactly this many classes
            (the paper's Table III, "Num Class").
        dirichlet_alpha: for ``"dirichlet"``: concentration of the per-class Dirichlet draw;
            smaller means more skewed clusters.
        val_fraction: share of each cluster's data held out for cluster-side evaluation.
        seed: drives partitioning and the cluster train/val splits (not the fixed test split).
        edge_task: for ``digits``: one of :data:`EDGE_TASKS` (see the module docstring).
        shots: at most this many training images per class in each cluster (few-shot
            fine-tuning, the paper's Flowers102 has 10-20 per class); 0 keeps them all.
    """

    dataset: str = "digits"
    data_dir: str = ""
    img_size: int = 32
    partitioning: str = "iid"
    classes_per_cluster: int = 2
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0
    edge_task: str = "new-classes"
    shots: int = 10

    def validate(self) -> None:
        """Raise :class:`DataError` naming the first invalid field and its valid choices.

        For ``flowers102`` and ``imagefolder`` this also checks that ``data_dir`` exists and is a
        non-empty directory, so a bad path fails before any work is done. Checks that need the
        labels (``classes_per_cluster`` against the number of classes, the number of partitions
        against the number of samples) happen in :func:`partition_indices`.
        """
        if self.dataset not in DATASETS:
            raise DataError(
                f"DataSpec.dataset={self.dataset!r} is not supported; "
                f"valid choices: {', '.join(DATASETS)}"
            )
        if self.img_size < 1:
            raise DataError(f"DataSpec.img_size={self.img_size} must be a positive integer")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(
                f"DataSpec.val_fraction={self.val_fraction} must be in the open interval (0, 1)"
            )
        if self.edge_task not in EDGE_TASKS:
            raise DataError(
                f"DataSpec.edge_task={self.edge_task!r} is not supported; "
                f"valid choices: {', '.join(EDGE_TASKS)}"
            )
        if self.shots < 0:
            raise DataError(f"DataSpec.shots={self.shots} must be >= 0 (0: no limit)")
        _check_partitioning(self)
        if self.dataset != "digits":
            _check_data_dir(self)


@dataclass
class ImageData:
    """A loaded dataset: a train pool to partition across clusters and a fixed test split.

    Attributes:
        train: yields ``(image, label)``, image a float tensor ``[3, H, W]``. The label is an
            ``int`` (a 0-d int64 tensor for ``digits``); both collate to an int64 batch.
        test: the fixed held-out split for the server-side centralised evaluation.
        train_labels: int64 labels of ``train``, in order, used for partitioning (so no image
            has to be decoded to partition).
        num_classes: size of the label space (labels are ``0 .. num_classes - 1``).
        cloud: the cloud's pre-training corpus, disjoint from ``train`` and ``test``; only the
            embedded default ships one (users of other data start from timm's weights).
        cloud_classes: the size of the cloud corpus's label space (its own classifier's).
    """

    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    num_classes: int
    cloud: Dataset | None = None
    cloud_classes: int = 0


def load_image_data(spec: DataSpec) -> ImageData:
    """Validate ``spec`` and load its dataset as train pool + fixed test split.

    ``digits`` is held in memory (about 22 MB at 32 px, but about 1 GB at 224 px); the other
    datasets are read lazily from disk. Raises :class:`DataError` for invalid settings or
    missing data.
    """
    spec.validate()
    if spec.dataset == "digits":
        return _load_digits(spec.img_size, spec.edge_task)
    if spec.dataset == "flowers102":
        return _load_flowers102(spec.data_dir, spec.img_size)
    return _load_imagefolder(spec.data_dir, spec.img_size)


def dataset_classes(spec: DataSpec) -> int:
    """The number of classes of ``spec``'s dataset without loading it: digits 10, flowers102
    102, an image folder its class sub-folders (what ``ImageFolder`` finds). Call after
    :meth:`DataSpec.validate`."""
    if spec.dataset == "digits":
        return 10 - len(CLOUD_DIGITS) if spec.edge_task == "new-classes" else 10
    if spec.dataset == "flowers102":
        return 102
    return sum(1 for entry in os.scandir(spec.data_dir) if entry.is_dir())


def partition_indices(labels: np.ndarray, num_partitions: int, spec: DataSpec) -> list[np.ndarray]:
    """Split sample positions ``0 .. len(labels) - 1`` among ``num_partitions`` clusters.

    Returns one sorted int64 array of positions per partition. Deterministic for a given
    ``spec.seed``. By ``spec.partitioning``:

    - ``"iid"``: a seeded shuffle, then equal contiguous shards, the first ``len % n`` one
      sample larger (what Flower Datasets' ``IidPartitioner`` cuts; written out here, so an
      IID or fixed partition imports neither Flower Datasets nor Hugging Face ``datasets``:
      tests/test_data.py checks the two agree). Disjoint and covering every sample.
    - ``"dirichlet"``: per class, proportions drawn from Dir(``dirichlet_alpha``)
      (``DirichletPartitioner``), redrawn until every partition holds at least
      ``min(10, len(labels) // num_partitions)`` samples. Disjoint and covering.
    - ``"classes"``: each partition holds exactly ``classes_per_cluster`` classes
      (``PathologicalPartitioner``, "first-deterministic" mode as in NIID-Bench: partition
      ``i``'s first class is class ``i % num_classes``, the others are drawn with the seed);
      a class's samples are split evenly among the partitions holding it. Disjoint; a class no
      partition draws is left out, with a ``UserWarning``. Every class is used when
      ``num_partitions >= num_classes``.

    Raises :class:`DataError` for an unknown partitioning, ``num_partitions`` outside
    ``[1, len(labels)]``, ``classes_per_cluster`` outside ``[1, number of classes]``,
    ``dirichlet_alpha <= 0``, or a configuration the partitioner cannot satisfy.
    """
    labels = np.asarray(labels, dtype=np.int64)
    _check_partitioning(spec)
    if not 1 <= num_partitions <= len(labels):
        raise DataError(
            f"num_partitions={num_partitions} must be in [1, {len(labels)}] "
            f"(at least one sample per partition; there are {len(labels)} samples)"
        )
    num_classes = len(np.unique(labels))
    if spec.partitioning == "classes" and spec.classes_per_cluster > num_classes:
        raise DataError(
            f"DataSpec.classes_per_cluster={spec.classes_per_cluster} must be in "
            f"[1, {num_classes}] (the number of classes in the labels)"
        )

    if spec.partitioning == "iid":
        order = np.random.default_rng(spec.seed).permutation(len(labels))
        return [np.sort(shard).astype(np.int64) for shard in np.array_split(order, num_partitions)]
    # Flower Datasets (with Hugging Face `datasets`, seaborn and scipy: about 2 s and 180 MiB
    # per process) only for the partitioners that need it.
    import datasets

    order = np.arange(len(labels))

    partitioner = _make_partitioner(spec, num_partitions, len(labels))
    # Only labels and positions go to the partitioner: no image is copied or decoded.
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "idx": order})
    try:
        with warnings.catch_warnings():
            # PathologicalPartitioner's own unused-class warning points at an option that no
            # longer exists; a clearer one is raised below.
            warnings.filterwarnings("ignore", message=r"Classes: .* will NOT be used")
            parts = [
                np.sort(np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64))
                for pid in range(num_partitions)
            ]
    except ValueError as err:  # the partitioner's own check failed (e.g. Dirichlet retries)
        fix = {
            "dirichlet": "raise DataSpec.dirichlet_alpha or use fewer partitions",
            "classes": "lower DataSpec.classes_per_cluster or use fewer partitions",
        }.get(spec.partitioning, "use fewer partitions")
        raise DataError(
            f"DataSpec.partitioning={spec.partitioning!r} cannot split {len(labels)} samples "
            f"into {num_partitions} partitions ({fix}): {err}"
        ) from err
    # Only "classes" can leave samples out: iid and dirichlet hand out every sample.
    unused = np.setdiff1d(labels, labels[np.concatenate(parts)])
    if unused.size:
        warnings.warn(
            f"partitioning='classes' with {num_partitions} partitions x "
            f"{spec.classes_per_cluster} classes leaves classes {unused.tolist()} (and their "
            f"samples) unused; every class is used when num_partitions >= {num_classes}",
            stacklevel=2,
        )
    return parts


def cluster_datasets(
    data: ImageData, partition_id: int, num_partitions: int, spec: DataSpec
) -> tuple[Dataset, Dataset]:
    """Return ``(train, val)`` of cluster ``partition_id``: views (``Subset``) of ``data.train``.

    The cluster's partition (see :func:`partition_indices`) is split at random, seeded by
    ``spec.seed`` and ``partition_id``, into ``val_fraction`` validation and the rest training;
    each side gets at least one sample when the partition has two or more; with
    ``spec.shots``, the training side keeps at most that many images per class (few-shot).
    Same arguments, same result.
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition_id={partition_id} must be in [0, {num_partitions - 1}] "
            f"(num_partitions={num_partitions})"
        )
    spec.validate()
    part = partition_indices(data.train_labels, num_partitions, spec)[partition_id]
    return cluster_split(data, part, partition_id, spec)


def cluster_split(
    data: ImageData, part: np.ndarray, partition_id: int, spec: DataSpec
) -> tuple[Dataset, Dataset]:
    """Cluster ``partition_id``'s positions ``part`` (into ``data.train``) as ``(train, val)``
    views, split at random as :func:`cluster_datasets` describes."""
    # Seed per cluster so clusters do not share one split pattern.
    rng = np.random.default_rng([spec.seed, partition_id])
    part = rng.permutation(part)
    n_val = _held_out_count(len(part), spec.val_fraction)
    val, train = part[:n_val], part[n_val:]
    if spec.shots:
        train = _first_per_class(train, data.train_labels, spec.shots)
    return Subset(data.train, train.tolist()), Subset(data.train, val.tolist())


# --- edge servers as domains (paper Sec. III-B) -----------------------------------------------

# Deterministic domain shifts that turn the embedded digits into one domain per edge server.
_NOISE_SEED = 7


def apply_domain(images: torch.Tensor, domain: str) -> torch.Tensor:
    """Shift normalised images ``[n, C, H, W]`` (values in [-1, 1]) into ``domain``.

    Deterministic: the same images always map to the same shifted images.
    """
    if domain == "none":
        return images
    if domain == "invert":
        return -images  # white digits on black -> black on white (mean 0.5, std 0.5)
    if domain == "rotate":
        return torch.rot90(images, k=1, dims=(2, 3))
    if domain == "noise":
        gen = torch.Generator().manual_seed(_NOISE_SEED)
        return images + 0.8 * torch.randn(images.shape, generator=gen)
    if domain == "blur":
        return F.avg_pool2d(images, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    raise DataError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")


def edge_image_data(
    data: ImageData, edge_id: int, shares: list[float], domain: str, seed: int = 0
) -> ImageData:
    """The data of edge server ``edge_id``: its stratified share of the train pool and the test
    split, both shifted into its domain. The cloud corpus stays with the cloud.

    ``shares`` are relative data sizes per edge (e.g. ``[1, 1, 0.2]`` makes edge 2 data-poor).
    """
    if not 0 <= edge_id < len(shares):
        raise DataError(f"edge_id={edge_id} must be in [0, {len(shares) - 1}]")
    if any(s <= 0 for s in shares):
        raise DataError(f"edge shares must be > 0, got {shares}")
    rng = np.random.default_rng([seed, 99])
    bounds = np.cumsum([0.0, *shares]) / sum(shares)
    mine: list[np.ndarray] = []
    for cls in np.unique(data.train_labels):
        members = rng.permutation(np.flatnonzero(data.train_labels == cls))
        cut = np.round(bounds * len(members)).astype(int)
        mine.append(members[cut[edge_id] : cut[edge_id + 1]])
    idx = np.sort(np.concatenate(mine))
    if domain == "none":
        return ImageData(
            Subset(data.train, idx.tolist()), data.test, data.train_labels[idx], data.num_classes
        )
    if not (isinstance(data.train, TensorDataset) and isinstance(data.test, TensorDataset)):
        raise DataError(f"domain {domain!r} needs the in-memory embedded dataset (digits)")
    x, y = data.train.tensors
    tx, ty = data.test.tensors
    return ImageData(
        train=TensorDataset(apply_domain(x[idx], domain), y[idx]),
        test=TensorDataset(apply_domain(tx, domain), ty),
        train_labels=data.train_labels[idx],
        num_classes=data.num_classes,
    )


def class_pool(data: ImageData, classes: int, images: int, seed: int = 0) -> ImageData:
    """A smaller train pool: `images // classes` images of each of the first `classes` classes,
    drawn at random (seeded by `seed` and `classes`); the test split stays as it is.

    The paper's Table III fine-tunes on k classes with the same amount of data for every k;
    clusters then split this pool as they would the whole one.
    """
    if not 1 <= classes <= data.num_classes:
        raise DataError(f"train-classes={classes} must be in [1, {data.num_classes}]")
    per_class = images // classes
    if per_class < 1:
        raise DataError(f"train-images={images} gives no image to each of {classes} classes")
    rng = np.random.default_rng([seed, classes])
    idx = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(data.train_labels == c))[:per_class]
                for c in range(classes)
            ]
        )
    )
    return ImageData(
        Subset(data.train, idx.tolist()), data.test, data.train_labels[idx], data.num_classes
    )


def _first_per_class(positions: np.ndarray, labels: np.ndarray, shots: int) -> np.ndarray:
    """The first `shots` positions of each class, in the given (random) order: few-shot."""
    taken: dict[int, int] = {}
    keep = []
    for i in positions.tolist():
        c = int(labels[i])
        taken[c] = taken.get(c, 0) + 1
        if taken[c] <= shots:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


# --- the cloud's corpus, seen in more views ----------------------------------------------------

# new-classes: the cloud pre-trains on every image of its corpus in these views: shifted by 1/8
# and 1/4 of the image side in each of the four directions, and rotated by -20 and +20 degrees
# (11 views with the original). A backbone that learned strokes wherever they sit transfers to
# digits it never saw (a linear probe on 8 images per new class: 0.63 test accuracy, against
# 0.45 without these views and 0.54 for a random backbone; measured once on this machine).
CLOUD_SHIFTS = (1 / 8, 1 / 4)
CLOUD_ANGLES = (-20.0, 20.0)


def cloud_views(corpus: TensorDataset) -> TensorDataset:
    """`corpus` (normalised images ``[n, C, H, W]`` with background -1, and their labels) in
    every view of CLOUD_SHIFTS and CLOUD_ANGLES, the originals first. Deterministic."""
    x, y = corpus.tensors
    side = x.shape[-1]
    views = [x]
    for fraction in CLOUD_SHIFTS:
        step = max(1, round(fraction * side))
        for dy, dx in ((0, step), (0, -step), (step, 0), (-step, 0)):
            views.append(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
    for degrees in CLOUD_ANGLES:
        angle = torch.tensor(degrees * torch.pi / 180)
        cos, sin = torch.cos(angle).item(), torch.sin(angle).item()
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # rotate the ink (x + 1 is 0 on the background) so the corners fill with background
        views.append(F.grid_sample(x + 1, grid, align_corners=False) - 1)
    return TensorDataset(torch.cat(views), y.repeat(len(views)))


# --- validation helpers -----------------------------------------------------------------------


def _check_partitioning(spec: DataSpec) -> None:
    """Check the partitioning fields that do not need the labels."""
    if spec.partitioning not in PARTITIONINGS:
        raise DataError(
            f"DataSpec.partitioning={spec.partitioning!r} is not supported; "
            f"valid choices: {', '.join(PARTITIONINGS)}"
        )
    if spec.partitioning == "classes" and spec.classes_per_cluster < 1:
        raise DataError(
            f"DataSpec.classes_per_cluster={spec.classes_per_cluster} must be >= 1 "
            f"(and at most the number of classes)"
        )
    if spec.partitioning == "dirichlet" and not spec.dirichlet_alpha > 0:
        raise DataError(
            f"DataSpec.dirichlet_alpha={spec.dirichlet_alpha} must be > 0 "
            f"(e.g. 0.1 very skewed, 0.5 skewed, 100 nearly iid)"
        )


def _check_data_dir(spec: DataSpec) -> None:
    """Fail fast when ``data_dir`` is unset, missing, not a directory or empty."""
    need = {
        "flowers102": "the folder holding (or meant to hold) flowers-102/",
        "imagefolder": "a folder with one sub-folder of images per class",
    }[spec.dataset]
    if not spec.data_dir:
        raise DataError(f"DataSpec.data_dir is required for dataset={spec.dataset!r}: {need}")
    if not os.path.isdir(spec.data_dir):
        raise DataError(
            f"DataSpec.data_dir={spec.data_dir!r} does not exist or is not a directory "
            f"(dataset={spec.dataset!r} needs {need})"
        )
    if not os.listdir(spec.data_dir):
        raise DataError(
            f"DataSpec.data_dir={spec.data_dir!r} is empty (dataset={spec.dataset!r} needs "
            f"{need}){_FLOWERS_HINT if spec.dataset == 'flowers102' else ''}"
        )


_FLOWERS_HINT = (
    "; download it once on a machine with internet: "
    "torchvision.datasets.Flowers102(root, download=True), then copy root here"
)


# --- loaders ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits(img_size: int, edge_task: str = "new-classes") -> ImageData:
    # One copy per process (the last size asked for): in an in-process run the ServerApp and
    # the ClientApps' cache hold the same tensors (at 224 px: 0.36 GB, not twice that). Every
    # user of the data reads it or makes new tensors from it (apply_domain, indexing).
    digits = load_digits()
    # 0..16 -> [0, 1] -> normalised with mean 0.5, std 0.5 -> [-1, 1]. Normalising the 8x8
    # originals first is exact (interpolation weights sum to 1) and far cheaper than after resizing.
    grey = torch.from_numpy(digits.images / 16.0).float().sub_(0.5).div_(0.5).unsqueeze(1)
    target = digits.target.astype(np.int64)
    if edge_task == "new-classes":
        # The cloud's digits are not the edges': the edges' classes are relabelled 0..4.
        cloud_idx = np.flatnonzero(np.isin(target, CLOUD_DIGITS))
        edge_idx = np.flatnonzero(~np.isin(target, CLOUD_DIGITS))
        edge_digits = np.unique(target[edge_idx])
        labels = target.copy()
        labels[edge_idx] = np.searchsorted(edge_digits, target[edge_idx])
        train_pos, test_pos = _fixed_per_class(labels[edge_idx], EDGE_TEST_PER_CLASS)
        num_classes, cloud_classes = len(edge_digits), len(CLOUD_DIGITS)
    else:
        labels = target
        edge_idx, cloud_idx = _stratified_split(target, CLOUD_FRACTION, CLOUD_SPLIT_SEED)
        train_pos, test_pos = _stratified_split(target[edge_idx], TEST_FRACTION, TEST_SPLIT_SEED)
        num_classes = cloud_classes = 10
    y = torch.from_numpy(labels).long()
    train_idx, test_idx = edge_idx[train_pos], edge_idx[test_pos]

    def images(idx: np.ndarray) -> torch.Tensor:
        # (n, 1, 8, 8) -> (n, 3, img_size, img_size); antialias only matters below 8 px.
        x = F.interpolate(grey[idx], size=(img_size, img_size), mode="bilinear", antialias=True)
        # grey -> 3 channels, what a ViT patch embedding expects: a view of the one channel
        # (a third of the memory; a batch is stacked into a tensor of its own by the loader,
        # and an in-place write into the view would fail loudly, not corrupt the data)
        return x.expand(-1, 3, -1, -1)

    return ImageData(
        train=TensorDataset(images(train_idx), y[train_idx]),
        test=TensorDataset(images(test_idx), y[test_idx]),
        train_labels=labels[train_idx],
        num_classes=num_classes,
        cloud=TensorDataset(images(cloud_idx), y[cloud_idx]),
        cloud_classes=cloud_classes,
    )


def _image_transform(img_size: int) -> transforms.Compose:
    # Resize the short side then centre-crop: square images without distorting aspect ratio.
    return transforms.Compose(
        [
            transforms.Resize(img_size),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _load_flowers102(data_dir: str, img_size: int) -> ImageData:
    from torchvision.datasets import Flowers102

    tf = _image_transform(img_size)
    try:
        # The official train and val splits have 10 images per class each; together they are
        # the pool the clusters fine-tune on (validation happens inside each cluster).
        parts = [
            Flowers102(root=data_dir, split=split, transform=tf, download=False)
            for split in ("train", "val")
        ]
        test = Flowers102(root=data_dir, split="test", transform=tf, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"Flowers102 not found under DataSpec.data_dir={data_dir!r} "
            f"(expected {os.path.join(data_dir, 'flowers-102')}/ with jpg/, imagelabels.mat, "
            f"setid.mat){_FLOWERS_HINT}"
        ) from err
    # Labels from torchvision's parsed .mat files: no image is decoded.
    labels = np.concatenate([np.asarray(p._labels, dtype=np.int64) for p in parts])
    return ImageData(train=ConcatDataset(parts), test=test, train_labels=labels, num_classes=102)


def _load_imagefolder(data_dir: str, img_size: int) -> ImageData:
    from torchvision.datasets import ImageFolder

    try:
        full = ImageFolder(data_dir, transform=_image_transform(img_size))
    except FileNotFoundError as err:  # no class folders, or a class folder with no images
        raise DataError(
            f"DataSpec.data_dir={data_dir!r} is not a usable image folder: {err} "
            f"(expected {data_dir}/<class>/<image>, one sub-folder per class)"
        ) from err
    targets = np.asarray(full.targets, dtype=np.int64)
    train_idx, test_idx = _stratified_split(targets, TEST_FRACTION, TEST_SPLIT_SEED)
    return ImageData(
        train=Subset(full, train_idx.tolist()),
        test=Subset(full, test_idx.tolist()),
        train_labels=targets[train_idx],
        num_classes=len(full.classes),
    )


# --- splitting --------------------------------------------------------------------------------


def _held_out_count(n: int, fraction: float) -> int:
    """``round(fraction * n)``, but leaving both sides at least one sample when ``n >= 2``."""
    if n < 2:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def _fixed_per_class(labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, `per_class` samples at random (TEST_SPLIT_SEED) held out (fewer if the class
    is smaller, leaving it at least one training sample). Sorted ``(train, test)`` positions."""
    rng = np.random.default_rng(TEST_SPLIT_SEED)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = min(per_class, len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out ``round(test_fraction * n_class)`` samples at random.

    Returns sorted ``(train, test)`` positions. Written out rather than sklearn's
    ``train_test_split`` so tiny folders (a class with 2 images) still split, with a sample of
    every class of two or more on each side.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = _held_out_count(len(members), test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _make_partitioner(spec: DataSpec, num_partitions: int, num_samples: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    if spec.partitioning == "classes":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_cluster,
            class_assignment_mode="first-deterministic",
            seed=spec.seed,
        )
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=spec.dirichlet_alpha,
        # Small data cannot give every partition 10 samples; ask for no more than a fair share.
        min_partition_size=min(DIRICHLET_MIN_PARTITION_SIZE, num_samples // num_partitions),
        seed=spec.seed,
    )
