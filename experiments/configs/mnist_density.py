"""The paper's MNIST density model (appendix C): 3 scale-blocks of 32 i-ResNet blocks, 32
filters, c = 0.9, 10 series terms, one Gaussian probe; Adamax lr 0.003, 200 epochs.

    python -m iresnet_jax.data.prepare --dataset=mnist        # once, needs TensorFlow
    python -m experiments.train --config=experiments/configs/mnist_density.py \
        --workdir=/tmp/mnist_density
    python -m experiments.evaluate --workdir=/tmp/mnist_density

Not run here (no MNIST download on these machines, and 200 epochs need an accelerator);
the paper reports 1.06 bits/dim.

On a CPU the default fused step of this 96-block model is a rolled ``nn.scan`` loop, which
XLA:CPU runs slowly. At batch 64 with a 5-term series on a 2-core CPU (``python -m
benchmarks.ab --key density.train_logdet --preset paper_mnist_density '{"staged": true}'
'{}'``, and ``'{"unroll": 32}'``): rolled, 20.9 s to compile and 15.6 s per step;
``--config.staged=True`` (``iresnet_jax.train.staged``, one device), 16.3 s and 4.1 s;
``--config.model.unroll=32``, 186 s and 2.2 s. Staged for short runs, unrolled for long.
"""

from experiments.configs import common


def get_config():
    return common.density("mnist", "paper_mnist_density")
