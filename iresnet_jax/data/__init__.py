"""Data: image datasets (tfds.data_source readers, scikit-learn's digits) and numpy
pipelines with deterministic shuffling and the paper's augmentation."""

from iresnet_jax.data.images import (DATASETS, DatasetNotPreparedError, ImageData, load,
                                     prepare_command)
from iresnet_jax.data.pipeline import (Augment, Normalizer, TrainBatches, epoch_permutation,
                                       padded_batches, random_flip, random_shift)

__all__ = ["Augment", "DATASETS", "DatasetNotPreparedError", "ImageData", "Normalizer",
           "TrainBatches", "epoch_permutation", "load", "padded_batches", "prepare_command",
           "random_flip", "random_shift"]
