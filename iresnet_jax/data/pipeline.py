"""Augmentation, normalization and deterministic batching with plain numpy.

Appendix C: random shifts of up to 2 pixels for MNIST, shifts and horizontal flips for
CIFAR (the official code pads 4 pixels symmetrically and crops); classification inputs
are MNIST scaled to ``[-0.5, 0.5]`` and CIFAR standardized by the training set's
per-channel mean and standard deviation. Density models receive the raw grey levels and
dequantize them inside the jitted step (``distributions.dequantize``).

Every batch is a pure function of ``(seed, step)``: the order of an epoch is the
permutation keyed by ``(seed, epoch)`` and the augmentation draws are keyed by
``(seed, step)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from iresnet_jax.data.images import ImageData

NORMALIZATIONS = ("unit", "standardize", "none")
PAD_MODES = ("constant", "symmetric", "reflect", "edge")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation.

    Attributes:
      shift: largest random shift in pixels (each direction, per axis); 0 disables.
      flip: random horizontal flips.
      pad_mode: how the shifted-in border is filled (``numpy.pad`` mode; ``"constant"``
        fills with grey level 0).
    """
    shift: int = 0
    flip: bool = False
    pad_mode: str = "constant"

    def __post_init__(self):
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0, got {self.shift}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")

    def __call__(self, rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
        """Augments a batch ``(B, H, W, C)`` (any dtype) with draws from ``rng``."""
        out = images
        if self.shift:
            out = random_shift(rng, out, self.shift, self.pad_mode)
        if self.flip:
            out = random_flip(rng, out)
        return out


def random_shift(rng: np.random.Generator, images: np.ndarray, max_shift: int,
                 pad_mode: str = "constant") -> np.ndarray:
    """Shifts each image by independent offsets in ``[-max_shift, max_shift]`` (both axes)."""
    b, h, w, _ = images.shape
    s = int(max_shift)
    padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode=pad_mode)
    dy = rng.integers(0, 2 * s + 1, size=b)
    dx = rng.integers(0, 2 * s + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]           # (B, H)
    cols = dx[:, None] + np.arange(w)[None, :]           # (B, W)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
    """Flips each image horizontally with probability 1/2."""
    flip = rng.random(images.shape[0]) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Maps grey levels to network inputs for classification.

    ``"unit"``: ``k / (n_bins - 1) - 0.5`` (MNIST in [-0.5, 0.5]); ``"standardize"``:
    ``(k / (n_bins - 1) - mean) / std`` per channel, with the training set's statistics;
    ``"none"``: the grey levels as float32.
    """
    kind: str
    n_bins: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def create(cls, kind: str, train: ImageData) -> "Normalizer":
        if kind not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {kind!r}")
        if kind != "standardize":
            return cls(kind, train.n_bins)
        x = train.images.astype(np.float64) / (train.n_bins - 1)
        mean = x.mean(axis=(0, 1, 2))
        std = x.std(axis=(0, 1, 2))
        return cls(kind, train.n_bins, tuple(float(m) for m in mean),
                   tuple(float(s) for s in std))

    def __call__(self, levels: np.ndarray) -> np.ndarray:
        x = np.asarray(levels, np.float32)
        if self.kind == "none":
            return x
        x = x / (self.n_bins - 1)
        if self.kind == "unit":
            return x - 0.5
        return ((x - np.asarray(self.mean, np.float32)) /
                np.asarray(self.std, np.float32)).astype(np.float32)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(n)`` keyed by (seed, epoch)."""
    return np.random.default_rng([int(seed), 0, int(epoch)]).permutation(n)


class TrainBatches:
    """Deterministic training batches: ``batches(step) -> {"image", "label"}``.

    Each epoch visits a fresh permutation (keyed by seed and epoch) in full batches; the
    incomplete last batch of an epoch is dropped. ``image`` is float32: normalized inputs
    (``normalizer`` given) or raw grey levels (``normalizer=None``, density models).
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int, *,
                 augment: Augment | None = None, normalizer: Normalizer | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(data) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(data)} training "
                             f"examples of {data.name}")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.augment = augment
        self.normalizer = normalizer
        self.steps_per_epoch = len(data) // self.batch_size
        self._cached: tuple[int, np.ndarray] | None = None

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(len(self.data), self.seed, epoch))
        perm = self._cached[1]
        return perm[i * self.batch_size:(i + 1) * self.batch_size]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        images = self.data.images[idx]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, 1, int(step)])
            images = self.augment(rng, images)
        x = self.normalizer(images) if self.normalizer is not None else images.astype(
            np.float32)
        return {"image": x, "label": self.data.labels[idx]}


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """All examples in order, in batches of exactly ``batch_size`` (one compiled shape):
    the last batch is padded by repeating its first example, and ``mask`` marks the real
    examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        real = len(idx)
        if real < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
        batch = {k: v[idx] for k, v in arrays.items()}
        batch["mask"] = np.arange(batch_size) < real
        yield batch
