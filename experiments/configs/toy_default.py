"""Quick toy-density run: the README's main job (checkerboard, i-ResNet, CPU, ~5 minutes).

    python -m experiments.toy_density --config=experiments/configs/toy_default.py \
        --workdir=runs/toy

Measured: see the README's results section (test NLL, steps, wall time on 2 CPU cores).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "checkerboard"
    c.model = "iresnet"
    c.seed = 0
    # Architecture: blocks x + g(x), g an MLP with ELU, ActNorm after each block.
    c.n_blocks = 30
    c.hidden = (48, 48)
    c.coeff = 0.99
    c.n_power_iter = 1
    c.activation = "elu"
    c.zero_init_last = False
    c.logdet = ml_collections.ConfigDict({"method": "exact", "n_terms": 10, "n_samples": 1})
    c.inverse_tol = 1e-5
    c.inverse_max_iter = 200
    # Optimization.
    c.num_steps = 20000
    # The global batch. With processes=2 each of two processes takes half of it and the
    # gradients are averaged through shared memory (train.multiprocess): one XLA:CPU
    # process leaves the second core idle at this model size, so the second half of the
    # batch costs ~11% more time per step instead of 50%. pin_processes pins each process
    # to its own CPU (93 steps/s against 77 unpinned). processes=1 gives the same
    # training, up to float rounding, in one process.
    c.batch_size = 250
    c.processes = 2
    c.pin_processes = True
    c.learning_rate = 1e-1
    c.adam_b1 = 0.9
    c.adam_b2 = 0.99
    c.warmup_steps = 100
    c.final_lr_fraction = 0.01
    c.grad_clip = 10.0
    # Evaluation, logging, checkpoints, figure.
    c.n_test = 20_000
    c.eval_every = 2000
    c.eval_chunk = 5000
    c.log_every = 500
    c.checkpoint_every = 2000
    c.grid_size = 120
    c.plot_range = 4.5
    c.n_plot_samples = 5000
    return c
