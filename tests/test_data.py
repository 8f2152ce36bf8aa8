"""Image data: TFDS readers on mock data (no TensorFlow), digits, augmentation, batching."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from iresnet_jax import data


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_readers_on_mock_data(name, shape):
    with tfds.testing.mock_data(num_examples=12):
        train = data.load(name, "train")
        test = data.load(name, "test")
    assert len(train) == 12 and len(test) == 12
    assert train.images.shape == (12,) + shape and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and train.labels.max() < 10
    assert train.n_bins == 256 and train.dim == int(np.prod(shape))
    assert "tensorflow" not in sys.modules    # read without TensorFlow
    batches = data.TrainBatches(train, 4, seed=0, augment=data.Augment(2, True, "symmetric"),
                                normalizer=data.Normalizer.create("standardize", train))
    assert batches(0)["image"].shape == (4,) + shape


def test_unknown_and_unprepared_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.load("svhn", "train")
    with pytest.raises(data.DatasetNotPreparedError,
                       match="python -m iresnet_jax.data.prepare --dataset=mnist"):
        data.load("mnist", "train", data_dir=str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()   # nothing was downloaded or created
    with pytest.raises(ValueError, match="splits"):
        data.load("digits", "validation")


def test_digits_fixed_split():
    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.shape == (8, 8, 1) and train.n_bins == 17 and train.images.max() == 16
    assert np.bincount(test.labels).min() >= 35          # stratified
    again = data.load("digits", "test")
    np.testing.assert_array_equal(again.images, test.images)
    flat_train = {im.tobytes() for im in train.images}
    overlap = sum(im.tobytes() in flat_train for im in test.images)
    assert overlap <= 2    # disjoint examples (load_digits has a couple of exact repeats)


def test_augmentation():
    rng = np.random.default_rng(0)
    images = np.zeros((64, 9, 9, 1), np.uint8)
    images[:, 4, 4, 0] = 255
    shifted = data.random_shift(rng, images, 2)
    ys, xs = np.nonzero(shifted[..., 0])[1:]
    assert len(ys) == 64                         # the pixel never leaves the image
    assert set(ys - 4) <= {-2, -1, 0, 1, 2} and set(xs - 4) <= {-2, -1, 0, 1, 2}
    assert len(set(zip(ys, xs))) > 10
    flipped = data.random_flip(rng, np.arange(64 * 3).reshape(64, 1, 3, 1))
    assert all((f[0, :, 0] == np.arange(3) + 3 * i).all() or
               (f[0, :, 0] == (np.arange(3) + 3 * i)[::-1]).all()
               for i, f in enumerate(flipped))
    with pytest.raises(ValueError, match="pad_mode"):
        data.Augment(1, pad_mode="wrapped")


def test_normalization():
    train = data.load("digits", "train")
    unit = data.Normalizer.create("unit", train)(train.images)
    assert unit.min() == -0.5 and unit.max() == 0.5
    std = data.Normalizer.create("standardize", train)(train.images)
    np.testing.assert_allclose(std.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(std.std(), 1, atol=1e-4)


def test_deterministic_batches_and_epochs():
    train = data.load("digits", "train")
    a = data.TrainBatches(train, 100, seed=3, augment=data.Augment(1))
    b = data.TrainBatches(train, 100, seed=3, augment=data.Augment(1))
    assert a.steps_per_epoch == 14
    for step in (0, 5, 14, 20):                   # in any order, same batch
        np.testing.assert_array_equal(b(step)["image"], a(step)["image"])
    epoch0 = np.concatenate([a.indices(s) for s in range(14)])
    assert len(set(epoch0)) == 1400               # no repeats within an epoch
    assert not np.array_equal(a.indices(0), a.indices(14))      # reshuffled per epoch
    assert not np.array_equal(a.indices(0), data.TrainBatches(train, 100, seed=4).indices(0))
    np.testing.assert_array_equal(a.indices(3), data.epoch_permutation(1437, 3, 0)[300:400])


def test_eval_batches_pad_and_mask():
    test = data.load("digits", "test")
    batches = list(data.padded_batches({"image": test.images, "label": test.labels}, 100))
    assert len(batches) == 4 and all(b["image"].shape[0] == 100 for b in batches)
    assert sum(int(b["mask"].sum()) for b in batches) == 360
    np.testing.assert_array_equal(batches[-1]["label"][:60], test.labels[300:])
