"""Trains an image model (classification or density estimation) from a config file.

    python -m experiments.train --config=experiments/configs/digits_classifier.py \
        --workdir=/tmp/digits_clf [--config.num_epochs=5] [--jax_distributed]

Resumes automatically from the checkpoints in ``--workdir``. Evaluate afterwards with
``python -m experiments.evaluate --workdir=...``.
"""

from __future__ import annotations

from iresnet_jax import runtime  # no JAX import

if __name__ == "__main__":
    # Restart once with huge pages for XLA's buffers (see runtime.py) before the heavy
    # imports below, so that they run only once.
    runtime.relaunch_with_hugepages()

import jax
from absl import app, flags

from experiments import setup_run
from ml_collections import config_flags

from iresnet_jax.train import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                 "Call jax.distributed.initialize() (multi-host runs).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_run()
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
