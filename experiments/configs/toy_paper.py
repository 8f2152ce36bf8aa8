"""The paper's toy-density i-ResNet (appendix C.3): 100 blocks, MLP 2-64-64-64-2 with ELU,
ActNorm after each block, exact log-det.

    python -m experiments.toy_density --config=experiments/configs/toy_paper.py \
        --workdir=runs/toy_paper
"""

from experiments.configs import toy_default


def get_config():
    c = toy_default.get_config()
    c.model.update(n_blocks=100, hidden=(64, 64, 64), coeff=0.9)
    c.optimizer.update(learning_rate=1e-3, b2=0.999)
    c.batch_size = 500
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
