"""The paper's CIFAR-10 density model (appendix C): 3 scale-blocks of 32 i-ResNet blocks,
512 filters, c = 0.9, the 5-term series with one Gaussian probe; Adamax 0.003, 200
epochs, shifts and flips as in the official code, per-block remat (memory: docs/
performance.md). The paper reports 3.45 bits/dim. Needs an accelerator.

    python -m iresnet_jax.data.prepare --dataset=cifar10      # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/cifar10_density.py \
        --workdir=/tmp/cifar10_density
    python -m experiments.evaluate --workdir=/tmp/cifar10_density
"""

from experiments.configs import common


def get_config():
    c = common.density("cifar10", 50000, n_terms=5, initial_squeeze=True,
                       squeeze=(False, True, True), factor_out=True,
                       blocks_per_scale=(32, 32, 32), hidden=512, coeff=0.9, n_power_iter=5,
                       remat=True, conv="auto")
    c.augment.update(shift=4, flip=True, pad_mode="symmetric")
    return c
