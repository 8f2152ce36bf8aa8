"""Glow-style baseline on the toy densities: ActNorm, channel reversal, affine coupling
(MLP 1-64-64-64-2), with the same number of layers and the same training budget as
``toy_default``.

    python -m experiments.toy_density --config=experiments/configs/toy_glow.py \
        --workdir=runs/toy_glow
"""

from experiments.configs import toy_default


def get_config():
    c = toy_default.get_config()
    c.model = "glow"
    # No Lipschitz constraint: the i-ResNet's learning rate (0.1) diverges here. 3e-3 was the
    # best of {1e-3, 3e-3, 1e-2} on the checkerboard at 4000 steps.
    c.learning_rate = 3e-3
    c.adam_b2 = 0.999
    return c
