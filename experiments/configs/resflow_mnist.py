"""The published Residual Flows MNIST model (Chen et al. 2019; 0.97 bits/dim in the
paper): ``train_img.py --data mnist --imagesize 28 --actnorm True --wd 0`` with that
script's defaults, i.e. logit transform (alpha 1e-6), scales of 16-16-16 blocks with
ActNorm, 3-1-3 convs of 512 channels with LipSwish, c = 0.98 (2-norms), 4 fully connected
blocks of width 128 at the end, no factor-out, the roulette (Poisson(2), 2 exact terms)
with the Neumann gradient; Adam 1e-3 (betas 0.9, 0.99), 1000 warm-up steps, gradients
clipped at 1, batch 64. Its checkpoint (the ``.pth`` file on
github.com/rtqichen/residual-flows/releases) converts into this configuration:

    python -m experiments.convert --from=resflow --checkpoint=CHECKPOINT.pth \
        --config=experiments/configs/resflow_mnist.py --workdir=/tmp/resflow_mnist
    python -m experiments.evaluate --workdir=/tmp/resflow_mnist
"""

from experiments.configs import common
from iresnet_jax.interop.resflow import TRAIN_IMG_DEFAULTS

TRAIN_IMG_ARGS = {**TRAIN_IMG_DEFAULTS, "data": "mnist", "imagesize": 28}


def get_config():
    return common.residual_flow("mnist", TRAIN_IMG_ARGS)
