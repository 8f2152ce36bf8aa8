"""The BatchNorm ResNet baseline on scikit-learn's digits: the same topology, data,
optimizer and number of steps as ``digits_classifier.py``, with BatchNorm before every
nonlinearity instead of ActNorm and no Lipschitz constraint.

    python -m experiments.train --config=experiments/configs/digits_batchnorm.py \
        --workdir=/tmp/digits_batchnorm

Not yet measured.
"""

from experiments.configs import common, digits_classifier


def get_config():
    c = digits_classifier.get_config()
    c.model = common.model_config("digits_batchnorm")
    return c
