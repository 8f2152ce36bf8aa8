"""The vanilla ResNet baseline on scikit-learn's digits: the same topology, data, optimizer
and number of steps as ``digits_classifier.py``, without the Lipschitz constraint.

    python -m experiments.train --config=experiments/configs/digits_vanilla.py \
        --workdir=/tmp/digits_vanilla

Measured: see README ("Image models").
"""

from experiments.configs import common, digits_classifier


def get_config():
    c = digits_classifier.get_config()
    c.model = common.model_config("digits_vanilla")
    return c
