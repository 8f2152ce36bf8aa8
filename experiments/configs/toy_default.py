"""The README's main job: an i-ResNet on the checkerboard density (CPU, about 4 minutes).

    python -m experiments.toy_density --workdir=runs/toy

30 blocks of x + g(x), g an MLP 2-48-48-2 with ELU (c = 0.99), ActNorm after each block,
the exact log-det; Adam at 0.1 with a cosine schedule, 20,000 steps of batch 250. What it
reaches and how long it takes: docs/toy.md.
"""

from experiments.configs import common
from iresnet_jax.train import optim


def get_config():
    c = common.base("toy_density", "checkerboard")
    c.model = common.model(
        "toy_iresnet", n_blocks=30, hidden=(48, 48), coeff=0.99, n_power_iter=1,
        logdet=dict(method="exact", n_terms=10), inverse=dict(tol=1e-5, max_iter=200))
    c.optimizer = optim.settings(name="adam", learning_rate=0.1, b1=0.9, b2=0.99,
                                 schedule="cosine", warmup_steps=100, final_fraction=0.01,
                                 grad_clip=10.0)
    c.num_steps = 20_000
    c.batch_size = 250
    c.n_test = 20_000          # held-out points for the test NLL
    c.eval_batch_size = 5000
    c.eval_every = 2000
    c.log_every = 500
    c.checkpoint_every = 2000
    c.grid_size = 120          # the figure: density on a grid over [-plot_range, plot_range]^2
    c.plot_range = 4.5
    c.n_plot_samples = 5000
    return c
