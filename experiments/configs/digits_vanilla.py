"""The vanilla ResNet baseline on digits: ``digits_classifier`` without the Lipschitz
constraint.

    python -m experiments.train --config=experiments/configs/digits_vanilla.py \
        --workdir=/tmp/digits_vanilla
"""

from experiments.configs import digits_classifier


def get_config():
    c = digits_classifier.get_config()
    c.model.coeff = None
    return c
