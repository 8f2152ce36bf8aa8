"""The paper's 39-block i-ResNet classifier on CIFAR-10 (appendix C.2): 13/13/13 blocks
(widths 32/64/128, the official script's), 13 zero channels of injective padding,
c = 0.9 (``--config.model.coeff=0.5`` etc. for the others); standardized inputs, shifts
and flips. Needs an accelerator.

    python -m iresnet_jax.data.prepare --dataset=cifar10      # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/cifar10_classifier.py \
        --workdir=/tmp/cifar10_classifier
"""

from experiments.configs import common


def get_config(dataset: str = "cifar10"):
    c = common.classification(
        dataset, stages=(13, 13, 13), hidden=(32, 64, 128), squeeze=(False, True, True),
        pad_channels=13, coeff=0.9, n_power_iter=1, activation="elu",
        head_activation="elu", conv="auto")
    c.normalization = "standardize"
    c.augment.update(shift=4, flip=True, pad_mode="symmetric")
    return c
