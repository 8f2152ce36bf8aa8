"""The paper's toy-density i-ResNet (appendix C.3): 100 blocks, MLP 2-64-64-64-2 with ELU,
ActNorm after each block, exact log-det.

    python -m experiments.toy_density --config=experiments/configs/toy_paper.py \
        --workdir=runs/toy_paper

Much slower per step than the default config on a CPU (100 blocks); see the README.
"""

from experiments.configs import toy_default


def get_config():
    c = toy_default.get_config()
    c.n_blocks = 100
    c.hidden = (64, 64, 64)
    c.coeff = 0.9
    c.num_steps = 20_000
    c.batch_size = 500
    c.learning_rate = 1e-3
    c.adam_b2 = 0.999
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
