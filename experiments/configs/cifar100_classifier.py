"""The paper's 39-block i-ResNet classifier on CIFAR-100 (``cifar10_classifier``'s
settings). Needs an accelerator.

    python -m iresnet_jax.data.prepare --dataset=cifar100     # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/cifar100_classifier.py \
        --workdir=/tmp/cifar100_classifier
"""

from experiments.configs import cifar10_classifier


def get_config():
    return cifar10_classifier.get_config("cifar100")
