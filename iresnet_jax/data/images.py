"""Image datasets as in-memory numpy arrays: MNIST, CIFAR-10/100 and scikit-learn's digits.

MNIST and CIFAR are read with ``tfds.data_source`` (random access to ArrayRecord files;
no TensorFlow needed to read). They must have been prepared once, which downloads them and
needs TensorFlow (``pip install "iresnet-jax[prepare]"``)::

    python -m iresnet_jax.data.prepare --dataset=mnist [--data_dir=DIR]

``digits`` is scikit-learn's ``load_digits`` (1,797 real handwritten digits, 8x8, 17 grey
levels 0..16, shipped with the package): the offline real dataset for CPU runs and tests,
with a fixed stratified split of 1,437 training and 360 test images.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

# name: (shape of one image, number of classes, grey levels per pixel)
DATASETS: dict[str, tuple[tuple[int, int, int], int, int]] = {
    "mnist": ((28, 28, 1), 10, 256),
    "cifar10": ((32, 32, 3), 10, 256),
    "cifar100": ((32, 32, 3), 100, 256),
    "digits": ((8, 8, 1), 10, 17),
}
TFDS_DATASETS = ("mnist", "cifar10", "cifar100")
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


class DatasetNotPreparedError(RuntimeError):
    """A TFDS dataset has not been prepared (downloaded and converted) in ``data_dir``."""


@dataclasses.dataclass(frozen=True)
class ImageData:
    """One split of an image dataset, in memory.

    Attributes:
      name: dataset name (a key of ``DATASETS``).
      split: split name.
      images: ``uint8`` array ``(N, H, W, C)`` of grey levels ``0 .. n_bins - 1``.
      labels: ``int32`` array ``(N,)``.
      n_bins: number of grey levels (256 for 8-bit images, 17 for digits).
      num_classes: number of classes.
    """
    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    n_bins: int
    num_classes: int

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} "
                             f"{self.images.shape}")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def dim(self) -> int:
        """Real number of dimensions ``D`` of one image (784 MNIST, 3072 CIFAR)."""
        return int(np.prod(self.images.shape[1:]))


def prepare_command(name: str, data_dir: str | None = None) -> str:
    """The shell command that prepares TFDS dataset ``name`` for ``tfds.data_source``."""
    cmd = f"python -m iresnet_jax.data.prepare --dataset={name}"
    if data_dir:
        cmd += f" --data_dir={data_dir}"
    return 'pip install "iresnet-jax[prepare]" && ' + cmd


def load(name: str, split: str, *, data_dir: str | None = None) -> ImageData:
    """Loads ``split`` (e.g. ``"train"``, ``"test"``) of dataset ``name`` into memory.

    Raises:
      ValueError: unknown dataset name, or an unknown digits split.
      DatasetNotPreparedError: a TFDS dataset that is not prepared in ``data_dir``; the
        message names the command that prepares it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    if name == "digits":
        return _load_digits(split)
    return _load_tfds(name, split, data_dir)


def _load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"digits has the splits 'train' and 'test', got {split!r}")
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # levels 0..16
    labels = digits.target.astype(np.int32)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=DIGITS_TEST_SIZE,
                                           random_state=DIGITS_SPLIT_SEED, stratify=labels)
    idx = np.sort(train_idx if split == "train" else test_idx)
    shape, num_classes, n_bins = DATASETS["digits"]
    return ImageData("digits", split, images[idx], labels[idx], n_bins, num_classes)


def _load_tfds(name: str, split: str, data_dir: str | None) -> ImageData:
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (FileNotFoundError, NotImplementedError, AssertionError, OSError, KeyError,
            ValueError) as e:   # KeyError: a dataset directory without prepared splits
        where = data_dir or (f"{os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'}"
                             " (TFDS's default data_dir)")
        raise DatasetNotPreparedError(
            f"dataset {name!r} (split {split!r}) could not be opened for random access in "
            f"{where}: it is not prepared there in the ArrayRecord format. Prepare it "
            f"once with:\n    {prepare_command(name, data_dir)}\n(underlying error: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    shape, num_classes, n_bins = DATASETS[name]
    n = len(source)
    images = np.empty((n,) + shape, np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        record = source[i]
        images[i] = record["image"]
        labels[i] = record["label"]
    return ImageData(name, split, images, labels, n_bins, num_classes)
