"""Prepares a TFDS image dataset for ``tfds.data_source`` (downloads; needs TensorFlow).

    pip install "iresnet-jax[prepare]"
    python -m iresnet_jax.data.prepare --dataset=mnist [--data_dir=DIR]

The dataset is written in the ArrayRecord format, which ``tfds.data_source`` reads with
random access and without TensorFlow. Reading never downloads.
"""

from __future__ import annotations

from absl import app, flags

from iresnet_jax.data.images import TFDS_DATASETS

_DATASET = flags.DEFINE_enum("dataset", None, list(TFDS_DATASETS), "Dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's).")


def prepare(name: str, data_dir: str | None = None) -> None:
    """Downloads and converts ``name`` to ArrayRecord files under ``data_dir``."""
    if name not in TFDS_DATASETS:
        raise ValueError(f"can prepare {TFDS_DATASETS}, got {name!r}")
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    print(f"prepared {name} in {builder.data_dir}")


def main(argv):
    del argv
    prepare(_DATASET.value, _DATA_DIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("dataset")
    app.run(main)
