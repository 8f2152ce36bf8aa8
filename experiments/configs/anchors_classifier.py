"""The reference configuration's classifier on MNIST (docs/reference.md): 3 zero channels
(28x28x4), 3 stages of 4 blocks (the first block of stages 2 and 3 squeezes), width 32,
c = 0.9, then BatchNorm -> ReLU -> pool -> Dense(10); 214,650 parameters with the official
code's feature prior; batch 64, shifts of up to 2 pixels.

    python -m iresnet_jax.data.prepare --dataset=mnist        # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/anchors_classifier.py \
        --workdir=/tmp/anchors_classifier
"""

from experiments.configs import common


def get_config():
    c = common.classification(
        "mnist", stages=(4, 4, 4), hidden=32, squeeze=(False, True, True), pad_channels=3,
        coeff=0.9, n_power_iter=5, activation="elu", head_activation="relu",
        feature_prior=True, unroll=4, conv="auto")
    c.batch_size = 64
    return c
