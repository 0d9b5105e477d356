"""scikit-learn's digits, read straight from the file scikit-learn ships, without importing
scikit-learn.

`sklearn.datasets.load_digits` is one `np.loadtxt` of `sklearn/datasets/data/digits.csv.gz`,
but importing `sklearn.datasets` also imports scipy and pandas: about 1.4 s and a few hundred
MB in every Ray actor that runs a ClientApp. The file is found with `importlib.util.find_spec`,
which locates the installed package without running it; the arrays are those of
`load_digits()` (tests/test_scale.py compares them).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Digits:
    """What the code uses of scikit-learn's Bunch: ``images`` (n, 8, 8) float64 in 0..16 and
    ``target`` (n,) int."""

    images: np.ndarray
    target: np.ndarray


def digits_path() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-learn is not installed: it ships the digits images")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def load_digits() -> Digits:
    """The 1797 8x8 digit images and their labels, as `sklearn.datasets.load_digits()`."""
    with gzip.open(digits_path(), "rt", encoding="utf-8") as file:
        data = np.loadtxt(file, delimiter=",")
    return Digits(images=data[:, :-1].reshape(-1, 8, 8), target=data[:, -1].astype(int))
