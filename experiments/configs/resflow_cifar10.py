"""The published Residual Flows CIFAR-10 model (Chen et al. 2019; 3.28 bits/dim in the
paper): ``train_img.py --data cifar10 --actnorm True`` with that script's defaults, i.e.
logit transform (alpha 0.05), scales of 16-16-16 blocks with ActNorm, 3-1-3 convs of 512
channels with LipSwish, c = 0.98 (2-norms), 4 fully connected blocks of width 128 at the
end, no factor-out, the roulette (Poisson(2), 2 exact terms) with the Neumann gradient;
Adam 1e-3 (betas 0.9, 0.99), 1000 warm-up steps, gradients clipped at 1, batch 64. Its
checkpoint converts into this configuration (docs/residual_flows.md):

    python -m experiments.convert --from=resflow --checkpoint=CHECKPOINT.pth \
        --config=experiments/configs/resflow_cifar10.py --workdir=/tmp/resflow_cifar10
    python -m experiments.evaluate --workdir=/tmp/resflow_cifar10
"""

from experiments.configs import common
from iresnet_jax.interop.resflow import TRAIN_IMG_DEFAULTS

TRAIN_IMG_ARGS = {**TRAIN_IMG_DEFAULTS, "data": "cifar10", "imagesize": 32}


def get_config():
    return common.residual_flow("cifar10", TRAIN_IMG_ARGS)
