"""The multiscale density i-ResNet (c = 0.9) on scikit-learn's digits: quick and offline.

    python -m experiments.train --config=experiments/configs/digits_density.py \
        --workdir=/tmp/digits_density
    python -m experiments.evaluate --workdir=/tmp/digits_density

Digits have 17 grey levels: dequantization uses 17 bins, and bits/dim counts the 64 real
dimensions. Three scale-blocks of 4 blocks, width 32, the 5-term series. Results:
docs/image_models.md.
"""

from experiments.configs import common


def get_config():
    c = common.density("digits", 1437, n_terms=5, batch_size=64, blocks_per_scale=(4, 4, 4),
                       hidden=32, **common.MNIST_DENSITY)
    c.eval_batch_size = 120
    c.num_epochs = 30.0
    c.init_batch_size = 256
    c.log_every = 50
    c.checkpoint_every = 200
    return c
