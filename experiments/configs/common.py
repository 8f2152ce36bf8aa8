"""Building blocks of the config files: every task nests its settings the same way.

``config.model`` holds every field of the model class (``model(name, **fields)``), with
``config.model.logdet`` (``LogDetConfig``'s fields) and ``config.model.inverse``
(``InverseConfig``'s) nested; ``config.optimizer`` holds every optimizer setting. So any
setting can be overridden on the command line, e.g.
``--config.model.logdet.gradient=neumann`` or ``--config.optimizer.learning_rate=0.01``.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from iresnet_jax import models
from iresnet_jax.inverse import InverseConfig
from iresnet_jax.logdet import LogDetConfig
from iresnet_jax.train import optim

# Model fields that the data decides (the task fills them in when they are None).
FROM_DATA = {"input_shape": tuple, "num_classes": int, "dim": int}


def model(name: str, *, logdet: dict | None = None, inverse: dict | None = None,
          **fields) -> ml_collections.ConfigDict:
    """Every field of ``models.MODELS[name]`` at its default, updated with ``fields``;
    ``logdet`` and ``inverse`` update the nested ``LogDetConfig`` / ``InverseConfig``."""
    spec = {"name": name}
    for f in dataclasses.fields(models.MODELS[name]):
        if f.name in ("parent", "name"):
            continue
        if f.name in FROM_DATA:
            spec[f.name] = config_dict.placeholder(FROM_DATA[f.name])
        elif f.name == "logdet":
            spec["logdet"] = {**dataclasses.asdict(f.default), **(logdet or {})}
            LogDetConfig(**spec["logdet"])      # checks the settings ("auto" stays)
        elif f.name == "inverse_config":
            spec["inverse"] = {**dataclasses.asdict(f.default), **(inverse or {})}
            InverseConfig(**spec["inverse"])
        elif f.default is not dataclasses.MISSING:
            spec[f.name] = f.default
    unknown = set(fields) - set(spec)
    if unknown:
        raise ValueError(f"{name} has no fields {sorted(unknown)}")
    spec.update(fields)
    # Typed so that the command line can set a field the default leaves at None.
    if spec.get("coeff", 0) is None:
        spec["coeff"] = config_dict.placeholder(float)
    return ml_collections.ConfigDict(spec)


def base(task: str, dataset: str) -> ml_collections.ConfigDict:
    """The settings every task has."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.dataset = dataset
    c.seed = 0
    c.batch_size = 64
    c.eval_batch_size = 200
    c.num_steps = 0            # 0: num_epochs over the training set (image tasks)
    c.log_every = 100
    c.checkpoint_every = 1000
    c.eval_every = 0           # 0: evaluate at the end only
    c.processes = 1            # processes of one data-parallel run on this machine
    c.precision = "auto"       # products: fast in training, float32 where exact (precision.py)
    return c


def image(task: str, dataset: str) -> ml_collections.ConfigDict:
    """The settings of the image tasks (data, augmentation, epochs)."""
    c = base(task, dataset)
    c.data_dir = ""            # TFDS's default
    c.num_epochs = 200.0
    c.normalization = "unit"   # classification inputs: "unit" ([-0.5, 0.5]), "standardize"
    c.augment = ml_collections.ConfigDict(dict(shift=0, flip=False, pad_mode="constant"))
    c.init_batch_size = 512    # images that initialize ActNorm
    return c


def classification(dataset: str, **model_fields) -> ml_collections.ConfigDict:
    """The paper's classification settings (appendix C.2): SGD, momentum 0.9, lr 0.1,
    weight decay 5e-4, x0.2 at epochs 60/120/160 of 200; shifts of up to 2 pixels."""
    c = image("classification", dataset)
    c.batch_size = 128
    c.model = model("classifier", **model_fields)
    c.optimizer = optim.settings(name="sgd", learning_rate=0.1, momentum=0.9,
                                 weight_decay=5e-4, schedule="step",
                                 decay_at=(0.3, 0.6, 0.8), decay_factor=0.2)
    c.augment.shift = 2
    return c


def density(dataset: str, train_size: int, *, n_terms: int, batch_size: int = 128,
            **model_fields) -> ml_collections.ConfigDict:
    """The paper's density settings (appendix C): Adamax, lr 0.003, 200 epochs, one
    warm-up epoch (``train_size`` examples); the ``n_terms``-term series with one Gaussian
    probe, its powers from both ends where it can (``mode="auto"``)."""
    c = image("density", dataset)
    c.batch_size = batch_size
    c.model = model("multiscale_density", logdet=dict(method="series", n_terms=n_terms,
                                                      mode="auto"), **model_fields)
    c.optimizer = optim.settings(name="adamax", learning_rate=0.003, schedule="step",
                                 warmup_steps=train_size // c.batch_size)
    c.normalization = "none"
    return c


def residual_flow(dataset: str, train_img_args: dict) -> ml_collections.ConfigDict:
    """The Residual Flows code's settings (``train_img.py``): the model its arguments
    build (``interop.resflow.model_spec``), Adam 1e-3 with betas (0.9, 0.99), 1000
    warm-up steps, gradients clipped at 1, batch 64, 1000 epochs."""
    from iresnet_jax.interop import resflow

    c = image("density", dataset)
    c.batch_size = 64
    c.normalization = "none"
    c.num_epochs = 1000.0
    spec = resflow.model_spec(train_img_args)
    del spec["name"]
    logdet = spec.pop("logdet")
    c.model = model("residual_flow", logdet=logdet, **{**spec, "stored_sigma": False,
                                                        "conv": "auto"})
    c.optimizer = optim.settings(name="adam", learning_rate=1e-3, b2=0.99, grad_clip=1.0,
                                 warmup_steps=1000)
    return c


# The paper's multiscale layout for 28x28 (MNIST) inputs: squeeze to 14x14x4, three
# scale-blocks, a squeeze before the second, half the channels factored out after the
# first two; c = 0.9, 5 power iterations, ELU, convs as fast as the backend allows.
MNIST_DENSITY = dict(initial_squeeze=True, squeeze=(False, True, False), factor_out=True,
                     coeff=0.9, n_power_iter=5, activation="elu", conv="auto")
