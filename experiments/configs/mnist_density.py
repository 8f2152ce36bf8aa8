"""The paper's MNIST density model (appendix C): 3 scale-blocks of 32 i-ResNet blocks, 32
filters, c = 0.9, the 10-term series with one Gaussian probe; Adamax 0.003, 200 epochs.
The paper reports 1.06 bits/dim. Needs an accelerator.

    python -m iresnet_jax.data.prepare --dataset=mnist        # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/mnist_density.py \
        --workdir=/tmp/mnist_density
    python -m experiments.evaluate --workdir=/tmp/mnist_density
"""

from experiments.configs import common


def get_config():
    return common.density("mnist", 60000, n_terms=10, blocks_per_scale=(32, 32, 32),
                          hidden=32, **common.MNIST_DENSITY)
