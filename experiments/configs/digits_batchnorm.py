"""The BatchNorm ResNet baseline on digits: ``digits_classifier`` with BatchNorm before
every nonlinearity instead of ActNorm and no Lipschitz constraint.

    python -m experiments.train --config=experiments/configs/digits_batchnorm.py \
        --workdir=/tmp/digits_batchnorm
"""

from experiments.configs import digits_classifier


def get_config():
    c = digits_classifier.get_config()
    c.model.coeff = None
    c.model.norm = "batchnorm"
    return c
