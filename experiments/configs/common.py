"""Defaults shared by the image-model configs (appendix C settings)."""

from __future__ import annotations

import ml_collections

from iresnet_jax import models


def model_config(preset: str) -> ml_collections.ConfigDict:
    """All keyword arguments of a model preset, so each can be overridden from the command
    line (e.g. ``--config.model.coeff=0.5``)."""
    return ml_collections.ConfigDict(models.model_kwargs(preset))


def classification(dataset: str, preset: str) -> ml_collections.ConfigDict:
    """Paper classification settings: SGD momentum 0.9, lr 0.1, weight decay 5e-4,
    x0.2 at epochs 60/120/160 of 200."""
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.dataset = dataset
    c.data_dir = ""
    c.model = model_config(preset)
    c.batch_size = 128
    c.eval_batch_size = 200
    c.num_epochs = 200.0
    c.num_steps = 0
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.lr_decay_epochs = (60.0, 120.0, 160.0)
    c.lr_decay_factor = 0.2
    c.warmup_epochs = 0.0
    c.grad_clip = 0.0
    c.normalization = "unit"
    c.augment = ml_collections.ConfigDict(dict(shift=2, flip=False, pad_mode="constant"))
    c.seed = 0
    c.init_batch_size = 512
    c.log_every = 100
    c.checkpoint_every = 1000
    c.eval_every = 0
    return c


def cifar_classification(dataset: str) -> ml_collections.ConfigDict:
    """The paper's 39-block classifier on ``dataset`` (cifar10 or cifar100): the paper's
    classification settings with standardized inputs, 4-pixel shifts and flips."""
    c = classification(dataset, f"paper_{dataset}_classifier")
    c.normalization = "standardize"
    c.augment.shift = 4
    c.augment.flip = True
    c.augment.pad_mode = "symmetric"
    return c


def density(dataset: str, preset: str) -> ml_collections.ConfigDict:
    """Paper density settings: Adamax lr 0.003, 200 epochs, no weight decay (official
    script), one warm-up epoch."""
    c = classification(dataset, preset)
    c.task = "density"
    c.optimizer = "adamax"
    c.learning_rate = 0.003
    c.weight_decay = 0.0
    c.lr_decay_epochs = ()
    c.warmup_epochs = 1.0
    c.normalization = "none"
    c.augment = ml_collections.ConfigDict(dict(shift=0, flip=False, pad_mode="constant"))
    # The training log-det (models.build): "series" (n_terms, the paper) or "roulette"
    # (Residual Flows); gradient "autodiff" (the paper) or "neumann" (Residual Flows, about
    # half the step); mode "auto" computes the series' powers from both ends when it can.
    c.model.logdet_method = "series"
    c.model.logdet_gradient = "autodiff"
    c.model.logdet_mode = "auto"
    # True: the training step's gradient block by block (train.staged), one compiled
    # program per distinct block: faster to compile, each step slower (README).
    c.staged = False
    c.evaluation = ml_collections.ConfigDict(dict(bias_tol=1e-4, se_tol=1e-4, n_samples=1,
                                                  max_passes=200, min_passes=2))
    return c
