"""The i-ResNet classifier (c = 0.9) on scikit-learn's digits: a quick, offline CPU run.

    python -m experiments.train --config=experiments/configs/digits_classifier.py \
        --workdir=/tmp/digits_classifier

Three stages of 4 blocks (width 32, squeezes before stages 2 and 3), 3 zero channels of
injective padding; the paper's SGD schedule over 30 epochs. Results: docs/image_models.md.
"""

from experiments.configs import common


def get_config():
    c = common.classification(
        "digits", stages=(4, 4, 4), hidden=32, squeeze=(False, True, True), pad_channels=3,
        coeff=0.9, n_power_iter=1, activation="elu", head_activation="elu", conv="auto")
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_epochs = 30.0
    c.augment.shift = 1
    c.init_batch_size = 256
    c.log_every = 50
    c.checkpoint_every = 200
    return c
