"""The paper's 39-block i-ResNet classifier on CIFAR-100 (appendix C.2): 13/13/13 blocks,
13 zero channels of injective padding, c = 0.9 (pass --config.model.coeff=0.5 etc. for the
other coefficients), SGD momentum 0.9, lr 0.1,
weight decay 5e-4, x0.2 at epochs 60/120/160 of 200, shifts and flips, standardized inputs.

    python -m iresnet_jax.data.prepare --dataset=cifar100     # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/cifar100_classifier.py \
        --workdir=/tmp/cifar100_classifier

Not run here (it needs an accelerator).
"""

from experiments.configs import common


def get_config():
    return common.cifar_classification("cifar100")
