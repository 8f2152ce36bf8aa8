"""The paper's MNIST density model (appendix C): 3 scale-blocks of 32 i-ResNet blocks, 32
filters, c = 0.9, 10 series terms, one Gaussian probe; Adamax lr 0.003, 200 epochs.

    python -m iresnet_jax.data.prepare --dataset=mnist        # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/mnist_density.py \
        --workdir=/tmp/mnist_density
    python -m experiments.evaluate --workdir=/tmp/mnist_density

Not run here (no MNIST download on these machines, and 200 epochs need an accelerator);
the paper reports 1.06 bits/dim.
"""

from experiments.configs import common


def get_config():
    return common.density("mnist", "paper_mnist_density")
