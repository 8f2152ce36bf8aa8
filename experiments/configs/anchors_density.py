"""ANCHORS.md's density configuration on MNIST: initial squeeze to 14x14x4, 3 scales of 4
blocks with factor-out, width 32, c = 0.9, 5 power iterations, 5-term series with one
Gaussian probe, learned diagonal Gaussian prior (51,680 parameters), batch 64.

    python -m iresnet_jax.data.prepare --dataset=mnist        # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/anchors_density.py \
        --workdir=/tmp/anchors_density
"""

from experiments.configs import common


def get_config():
    c = common.density("mnist", "anchors_density")
    c.batch_size = 64
    return c
