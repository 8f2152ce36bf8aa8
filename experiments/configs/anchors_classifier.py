"""ANCHORS.md's classifier configuration on MNIST: 3 zero channels (28x28x4), 3 stages of
4 blocks (the first block of stages 2 and 3 squeezes), width 32, c = 0.9, then BatchNorm ->
ReLU -> pool -> Dense(10) (214,650 parameters with the official code's feature prior),
batch 64, shifts of up to 2 pixels, inputs in [-0.5, 0.5].

    python -m iresnet_jax.data.prepare --dataset=mnist        # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/anchors_classifier.py \
        --workdir=/tmp/anchors_classifier
"""

from experiments.configs import common


def get_config():
    c = common.classification("mnist", "anchors_classifier")
    c.batch_size = 64
    return c
