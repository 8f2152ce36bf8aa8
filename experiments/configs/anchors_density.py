"""The reference configuration's density model on MNIST (docs/reference.md): squeeze to
14x14x4, 3 scale-blocks of 4 blocks with factor-out, width 32, c = 0.9, 5 power
iterations, the 5-term series with one Gaussian probe, learned diagonal Gaussian prior
(51,680 parameters), batch 64. The speed benchmark against the official code times it.

    python -m iresnet_jax.data.prepare --dataset=mnist        # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/anchors_density.py \
        --workdir=/tmp/anchors_density
"""

from experiments.configs import common


def get_config():
    c = common.density("mnist", 60000, n_terms=5, batch_size=64, blocks_per_scale=(4, 4, 4),
                       hidden=32, unroll=4, remat=True, **common.MNIST_DENSITY)
    return c
