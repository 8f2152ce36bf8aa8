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
    return c
