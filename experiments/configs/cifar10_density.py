"""The paper's CIFAR-10 density model (appendix C): 3 scale-blocks of 32 i-ResNet blocks,
512 filters, c = 0.9, 5 series terms, one Gaussian probe; Adamax lr 0.003, 200 epochs,
shifts and flips as in the official code.

    python -m iresnet_jax.data.prepare --dataset=cifar10      # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/cifar10_density.py \
        --workdir=/tmp/cifar10_density
    python -m experiments.evaluate --workdir=/tmp/cifar10_density

Not run here (it needs an accelerator); the paper reports 3.45 bits/dim. Step time and
memory on CPU: ``python -m benchmarks.density_model`` (README, "Image models").
"""

from experiments.configs import common


def get_config():
    c = common.density("cifar10", "paper_cifar10_density")
    c.augment.shift = 4
    c.augment.flip = True
    c.augment.pad_mode = "symmetric"
    c.model.remat = True
    return c
