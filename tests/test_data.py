"""Tests for gaisnet_flwr.data.images: loading, the test split, partitions, cluster splits, errors.

All offline: digits ships with scikit-learn, image folders are written to tmp_path with PIL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Subset
from torchvision.datasets import Flowers102

from gaisnet_flwr.data.images import (
    CLOUD_DIGITS,
    EDGE_TEST_PER_CLASS,
    PARTITIONINGS,
    DataError,
    DataSpec,
    ImageData,
    _held_out_count,
    _stratified_split,
    cluster_datasets,
    load_image_data,
    partition_indices,
)


def Spec(**fields) -> DataSpec:  # noqa: N802 - reads as the class it builds
    """The data mechanics below are tested on the earlier setting (all ten digits, every
    image); the few-shot default has its own tests at the end."""
    return DataSpec(**{"edge_task": "same-classes", "shots": 0, **fields})


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_image_data(Spec())


@pytest.fixture(scope="module")
def raw_digits():
    return load_digits()


def write_image_folder(root: Path, counts: dict[str, int], size=(20, 12)) -> Path:
    """Write ``counts[class]`` small RGB PNGs per class under ``root/<class>/``."""
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "partitions overlap"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_classes(digits):
    image, label = digits.train[0]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert int(label) == digits.train_labels[0]
    assert digits.num_classes == 10
    assert len(digits.train) + len(digits.test) + len(digits.cloud) == 1797
    assert digits.train_labels.dtype == np.int64
    assert len(digits.train_labels) == len(digits.train)
    train_images, train_labels = digits.train.tensors
    np.testing.assert_array_equal(train_labels.numpy(), digits.train_labels)
    # grey repeated to 3 identical channels
    torch.testing.assert_close(train_images[:, 0], train_images[:, 2])
    # normalised with mean 0.5, std 0.5: background (0) -> -1, full ink (16) -> 1
    assert train_images.min().item() == -1.0
    assert train_images.max().item() == 1.0


def test_digits_normalisation_matches_raw_pixels(raw_digits):
    # At the native 8 px no interpolation happens, so every pixel is (v / 16 - 0.5) / 0.5.
    data = load_image_data(Spec(img_size=8))
    parts = (data.train, data.test, data.cloud)
    all_images = torch.cat([p.tensors[0] for p in parts])[:, 0].numpy()
    expected = (raw_digits.images / 16.0 - 0.5) / 0.5

    # the split reorders images: compare as multisets of rows, so each image is used exactly once
    def rows(a):
        return np.array(sorted(map(tuple, a.reshape(len(a), -1).round(5))))

    np.testing.assert_array_equal(rows(all_images), rows(expected.astype(np.float32)))


def test_digits_img_size_resizes():
    data = load_image_data(Spec(img_size=16))
    assert data.train[0][0].shape == (3, 16, 16)
    assert data.test[0][0].shape == (3, 16, 16)


def test_digits_test_split_is_fixed_and_independent_of_seed(digits):
    other = load_image_data(Spec(seed=123, partitioning="dirichlet"))
    for a, b in zip(digits.test.tensors, other.test.tensors, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(digits.train.tensors, other.train.tensors, strict=True):
        torch.testing.assert_close(a, b)


def test_digits_cloud_and_test_splits_are_stratified(digits, raw_digits):
    per_class = np.bincount(raw_digits.target)
    cloud_counts = np.bincount(digits.cloud.tensors[1].numpy(), minlength=10)
    np.testing.assert_array_equal(cloud_counts, np.round(0.4 * per_class).astype(int))
    edge = per_class - cloud_counts
    test_counts = np.bincount(digits.test.tensors[1].numpy(), minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.2 * edge).astype(int))
    np.testing.assert_array_equal(np.bincount(digits.train_labels), edge - test_counts)


def test_digits_cloud_corpus_is_disjoint_from_edge_data():
    data = load_image_data(Spec(img_size=8))  # native size: images are exact

    def keys(ds):
        images, labels = ds.tensors
        return {
            tuple(img[0].flatten().tolist()) + (int(y),)
            for img, y in zip(images, labels, strict=True)
        }

    cloud = keys(data.cloud)
    # no image may sit on both sides of the cloud/edge line
    assert not cloud & keys(data.train)
    assert not cloud & keys(data.test)


def test_stratified_split_is_disjoint_covering_and_seeded():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    train, test = _stratified_split(labels, 0.2, seed=0)
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    # per class round(0.2 * n), but both sides keep one when n >= 2; a singleton stays in train
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=4), [2, 1, 1, 0])
    again = _stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(test, again[1])


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(0, 0.2, 0), (1, 0.2, 0), (2, 0.2, 1), (2, 0.9, 1), (3, 0.2, 1), (10, 0.2, 2), (10, 0.99, 9)],
)
def test_held_out_count(n, fraction, expected):
    assert _held_out_count(n, fraction) == expected


# --- partitioning -----------------------------------------------------------------------------


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 3, 7])
def test_iid_and_dirichlet_partitions_are_disjoint_and_cover(digits, partitioning, num_partitions):
    parts = partition_indices(digits.train_labels, num_partitions, Spec(partitioning=partitioning))
    assert len(parts) == num_partitions
    assert all(p.dtype == np.int64 for p in parts)
    assert_disjoint_cover(parts, len(digits.train_labels))


def test_iid_partitions_are_balanced_and_mixed(digits):
    parts = partition_indices(digits.train_labels, 4, Spec(partitioning="iid"))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # a shuffled shard of ~360 digits holds every class (unshuffled shards would not)
    assert all(len(np.unique(digits.train_labels[p])) == 10 for p in parts)


@pytest.mark.parametrize("num_partitions", [1, 3, 7, 500])
def test_iid_partitions_are_flower_datasets_iid_partitioner(digits, num_partitions):
    # Our IID cut (written out so that an IID run imports neither Flower Datasets nor Hugging
    # Face `datasets`) gives exactly the shards IidPartitioner cuts from the same shuffle.
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    spec = Spec(partitioning="iid", seed=11)
    labels = digits.train_labels
    order = np.random.default_rng(spec.seed).permutation(len(labels))
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "idx": order})
    theirs = [np.sort(partitioner.load_partition(i)["idx"]) for i in range(num_partitions)]
    ours = partition_indices(labels, num_partitions, spec)
    assert len(ours) == len(theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_dirichlet_respects_min_partition_size(digits):
    spec = Spec(partitioning="dirichlet", dirichlet_alpha=0.1)
    parts = partition_indices(digits.train_labels, 10, spec)
    assert min(len(p) for p in parts) >= 10


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_gives_each_partition_exactly_k_classes(digits, k):
    spec = Spec(partitioning="classes", classes_per_cluster=k)
    parts = partition_indices(digits.train_labels, 10, spec)
    assert [len(np.unique(digits.train_labels[p])) for p in parts] == [k] * 10
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "partitions overlap"
    # first-deterministic: with >= 10 partitions, partition i holds class i, so all are used
    assert all(i in digits.train_labels[p] for i, p in enumerate(parts))
    assert_disjoint_cover(parts, len(digits.train_labels))


def test_classes_warns_about_unused_classes(digits):
    spec = Spec(partitioning="classes", classes_per_cluster=2)
    with pytest.warns(UserWarning, match="unused; every class is used when num_partitions >= 10"):
        parts = partition_indices(digits.train_labels, 3, spec)
    assert [len(np.unique(digits.train_labels[p])) for p in parts] == [2, 2, 2]


@pytest.mark.parametrize("partitioning", PARTITIONINGS)
def test_partitioning_is_deterministic_and_seed_dependent(digits, partitioning):
    def parts(seed: int) -> list[np.ndarray]:
        spec = Spec(partitioning=partitioning, classes_per_cluster=2, seed=seed)
        return partition_indices(digits.train_labels, 10, spec)

    first, again, other = parts(0), parts(0), parts(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


# --- cluster datasets -------------------------------------------------------------------------


def test_cluster_datasets_split_the_partition(digits):
    spec = Spec(partitioning="dirichlet", val_fraction=0.25, seed=3)
    partition = partition_indices(digits.train_labels, 4, spec)[2]
    train, val = cluster_datasets(digits, 2, 4, spec)
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert train.dataset is digits.train and val.dataset is digits.train
    assert not set(train.indices) & set(val.indices)
    np.testing.assert_array_equal(np.sort(train.indices + val.indices), partition)
    assert len(val) == round(0.25 * len(partition))
    image, label = train[0]
    assert image.shape == (3, 32, 32)
    assert int(label) == digits.train_labels[train.indices[0]]


def test_cluster_datasets_are_reproducible(digits):
    spec = Spec(partitioning="iid", seed=5)
    first = cluster_datasets(digits, 1, 3, spec)
    again = cluster_datasets(digits, 1, 3, spec)
    assert first[0].indices == again[0].indices
    assert first[1].indices == again[1].indices
    other_seed = cluster_datasets(digits, 1, 3, Spec(partitioning="iid", seed=6))
    assert first[1].indices != other_seed[1].indices


def test_cluster_datasets_keep_one_sample_each_side():
    # 4 samples over 2 partitions: 2 each, so 1 train + 1 val even with val_fraction 0.1
    data = ImageData(
        train=torch.utils.data.TensorDataset(torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])),
        test=torch.utils.data.TensorDataset(torch.zeros(1, 3, 2, 2), torch.tensor([0])),
        train_labels=np.array([0, 1, 0, 1]),
        num_classes=2,
    )
    for pid in range(2):
        train, val = cluster_datasets(data, pid, 2, Spec(val_fraction=0.1))
        assert (len(train), len(val)) == (1, 1)


# --- invalid input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (Spec(dataset="mnist"), ["dataset='mnist'", "digits, flowers102, imagefolder"]),
        (Spec(partitioning="shards"), ["partitioning='shards'", "iid, classes, dirichlet"]),
        (Spec(dataset="imagefolder"), ["data_dir is required", "imagefolder"]),
        (Spec(dataset="flowers102"), ["data_dir is required", "flowers102"]),
        (Spec(partitioning="dirichlet", dirichlet_alpha=0.0), ["dirichlet_alpha=0.0", "> 0"]),
        (Spec(partitioning="dirichlet", dirichlet_alpha=-1.0), ["dirichlet_alpha", "> 0"]),
        (
            Spec(partitioning="classes", classes_per_cluster=0),
            ["classes_per_cluster=0", ">= 1"],
        ),
        (Spec(val_fraction=0.0), ["val_fraction=0.0", "(0, 1)"]),
        (Spec(val_fraction=1.0), ["val_fraction=1.0", "(0, 1)"]),
        (Spec(img_size=0), ["img_size=0", "positive"]),
    ],
)
def test_invalid_spec_raises_data_error_naming_field_and_choices(spec, expected):
    for call in (spec.validate, lambda: load_image_data(spec)):
        with pytest.raises(DataError) as err:
            call()
        for text in expected:
            assert text in str(err.value)


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_image_data(Spec(dataset="imagefolder", data_dir=str(missing)))
    assert str(missing) in str(err.value)


def test_empty_data_dir_raises(tmp_path):
    with pytest.raises(DataError, match="is empty") as err:
        load_image_data(Spec(dataset="imagefolder", data_dir=str(tmp_path)))
    assert "data_dir" in str(err.value) and "one sub-folder" in str(err.value)


def test_image_folder_without_images_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="not a usable image folder"):
        load_image_data(Spec(dataset="imagefolder", data_dir=str(tmp_path)))


def test_classes_per_cluster_above_num_classes(digits):
    spec = Spec(partitioning="classes", classes_per_cluster=11)
    with pytest.raises(DataError, match=r"classes_per_cluster=11 must be in \[1, 10\]"):
        partition_indices(digits.train_labels, 2, spec)


@pytest.mark.parametrize("num_partitions", [0, 1439])
def test_num_partitions_out_of_range(digits, num_partitions):
    n = len(digits.train_labels)
    with pytest.raises(DataError, match=rf"num_partitions={num_partitions} must be in \[1, {n}\]"):
        partition_indices(digits.train_labels, num_partitions, Spec())


def test_unsatisfiable_dirichlet_raises_data_error():
    labels = np.repeat(np.arange(10), 20)
    spec = Spec(partitioning="dirichlet", dirichlet_alpha=0.001)
    with (
        pytest.warns(UserWarning),
        pytest.raises(DataError, match="raise DataSpec.dirichlet_alpha"),
    ):
        partition_indices(labels, 20, spec)


def test_partition_id_out_of_range(digits):
    with pytest.raises(DataError, match=r"partition_id=3 must be in \[0, 2\]"):
        cluster_datasets(digits, 3, 3, Spec())


# --- imagefolder and flowers102 ---------------------------------------------------------------


def test_image_folder_loads_and_splits(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"cat": 5, "dog": 4})
    spec = Spec(dataset="imagefolder", data_dir=str(root), img_size=16)
    data = load_image_data(spec)
    assert data.num_classes == 2
    assert (len(data.train), len(data.test)) == (7, 2)
    # stratified: round(0.2 * 5) = 1 cat and round(0.2 * 4) = 1 dog held out
    assert sorted(int(data.test[i][1]) for i in range(len(data.test))) == [0, 1]
    np.testing.assert_array_equal(data.train_labels, [0, 0, 0, 0, 1, 1, 1])
    image, label = data.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label == 0
    # the fixed test split does not follow the seed
    other = load_image_data(Spec(dataset="imagefolder", data_dir=str(root), seed=9))
    assert other.test.indices == data.test.indices
    train, val = cluster_datasets(data, 0, 2, spec)
    assert len(train) >= 1 and len(val) >= 1


def test_flowers102_empty_dir_raises(tmp_path):
    with pytest.raises(DataError, match="is empty") as err:
        load_image_data(Spec(dataset="flowers102", data_dir=str(tmp_path)))
    assert "Flowers102(root, download=True)" in str(err.value)


def test_flowers102_missing_files_raises(tmp_path):
    (tmp_path / "something-else").mkdir()
    with pytest.raises(DataError, match="Flowers102 not found") as err:
        load_image_data(Spec(dataset="flowers102", data_dir=str(tmp_path)))
    assert "Flowers102(root, download=True)" in str(err.value)
    assert "flowers-102" in str(err.value)


def test_flowers102_wiring_on_a_fake_copy(tmp_path, monkeypatch):
    """Train pool = train + val splits, test = test split, labels read without decoding."""
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    labels_1based = np.array([1, 2, 3, 1, 2, 3])  # image ids 1..6
    savemat(base / "imagelabels.mat", {"labels": labels_1based})
    savemat(base / "setid.mat", {"trnid": [1, 2], "valid": [3, 4], "tstid": [5, 6]})
    for image_id in range(1, 7):
        Image.new("RGB", (30, 20), color=(image_id * 40, 0, 0)).save(
            base / "jpg" / f"image_{image_id:05d}.jpg"
        )
    # the real check compares md5 sums of the official .mat files
    monkeypatch.setattr(Flowers102, "_check_integrity", lambda self: True)

    data = load_image_data(Spec(dataset="flowers102", data_dir=str(tmp_path), img_size=16))
    assert data.num_classes == 102
    np.testing.assert_array_equal(data.train_labels, [0, 1, 2, 0])
    assert len(data.train) == 4 and len(data.test) == 2
    image, label = data.train[2]
    assert image.shape == (3, 16, 16) and label == 2


# --- the few-shot default: new classes at the edges --------------------------------------------


def test_new_classes_cloud_and_edges_hold_disjoint_digits(raw_digits):
    data = load_image_data(DataSpec(img_size=8))
    assert DataSpec().edge_task == "new-classes" and DataSpec().shots == 10
    assert data.num_classes == 5 and data.cloud_classes == len(CLOUD_DIGITS)
    per_class = np.bincount(raw_digits.target)
    # the cloud holds every image of digits 0-4, labels unchanged
    cloud_labels = data.cloud.tensors[1].numpy()
    np.testing.assert_array_equal(np.bincount(cloud_labels), per_class[:5])
    # the edges hold digits 5-9 relabelled 0-4: a fixed test set of 80 per class, the rest train
    test_labels = data.test.tensors[1].numpy()
    np.testing.assert_array_equal(np.bincount(test_labels), [EDGE_TEST_PER_CLASS] * 5)
    np.testing.assert_array_equal(np.bincount(data.train_labels), per_class[5:] - 80)
    # the edge images are the raw digits 5-9, class by class
    expected = (raw_digits.images / 16.0 - 0.5) / 0.5
    for label in range(5):
        raw = expected[raw_digits.target == label + 5].reshape(-1, 64).round(5)
        ours = (
            torch.cat(
                [
                    data.train.tensors[0][data.train_labels == label],
                    data.test.tensors[0][test_labels == label],
                ]
            )[:, 0]
            .reshape(-1, 64)
            .numpy()
            .round(5)
        )
        assert sorted(map(tuple, raw)) == sorted(map(tuple, ours))


def test_new_classes_test_set_is_fixed_whatever_the_seed():
    a, b = load_image_data(DataSpec()), load_image_data(DataSpec(seed=7, shots=3))
    for x, y in zip(a.test.tensors, b.test.tensors, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shots", [1, 4, 10])
def test_shots_caps_each_clusters_training_images_per_class(shots):
    spec = DataSpec(shots=shots)
    data = load_image_data(spec)
    for pid in range(4):
        train, val = cluster_datasets(data, pid, 4, spec)
        counts = np.bincount(data.train_labels[train.indices], minlength=5)
        np.testing.assert_array_equal(counts, [shots] * 5)
        full, same_val = cluster_datasets(data, pid, 4, DataSpec(shots=0))
        assert set(train.indices) <= set(full.indices) and val.indices == same_val.indices
    with pytest.raises(DataError, match="shots=-1 must be >= 0"):
        DataSpec(shots=-1).validate()
    with pytest.raises(DataError, match="edge_task='x' is not supported; valid choices: new"):
        DataSpec(edge_task="x").validate()
