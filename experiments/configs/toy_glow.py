"""The Glow baseline on the toy densities: ActNorm, channel reversal, affine coupling
(MLP 1-48-48-2), as many layers and steps as ``toy_default``.

    python -m experiments.toy_density --config=experiments/configs/toy_glow.py \
        --workdir=runs/toy_glow
"""

from experiments.configs import common, toy_default


def get_config():
    c = toy_default.get_config()
    c.model = common.model("glow", n_steps=30, hidden=(48, 48))
    # No Lipschitz constraint: the i-ResNet's learning rate (0.1) diverges here.
    c.optimizer.update(learning_rate=3e-3, b2=0.999)
    return c
