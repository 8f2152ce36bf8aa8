r"""Converts another library's checkpoint into a training workdir of this one.

    python -m experiments.convert --from=iresnet --checkpoint=model.t7 --workdir=DIR \
        [--params=params.txt] [--dataset=cifar10] \
        [--config=experiments/configs/cifar10_density.py --config.<field>=value]

``--from=iresnet``: the official PyTorch i-ResNet (a whole model saved by its training
script, or a state dict with ``--params``: its ``params.txt`` or a JSON of the
constructor's arguments), read without PyTorch; ``--from=resflow``: a checkpoint of the
official Residual Flows' ``train_img.py`` (its EMA weights; ``--weights=raw``: the
trained ones). Writes ``config.json`` and a step-0 checkpoint that ``iresnet_jax.load``,
``experiments.evaluate``, ``experiments.analyses`` and ``experiments.train`` (further
training) read like any trained run. The training
settings come from ``--config`` (its ``model`` replaced by the converted one, then its
``--config.model.*`` overrides applied) or, without it, from the task's defaults in
``experiments/configs/common.py`` on ``--dataset`` (default: the checkpoint's, else the
dataset whose image shape and classes fit). See docs/interop.md.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from experiments import setup_run

_FROM = flags.DEFINE_string("from", "iresnet", "Checkpoint format (iresnet_jax.interop.SOURCES).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The checkpoint file to convert.")
_WORKDIR = flags.DEFINE_string("workdir", None, "New workdir to write (config + checkpoint).")
_PARAMS = flags.DEFINE_string("params", None, "The model's settings where the checkpoint "
                              "holds a state dict: params.txt of the official script, or "
                              "a JSON file of the constructor's arguments.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset of the workdir (without --config).")
_WEIGHTS = flags.DEFINE_enum("weights", None, ["ema", "raw"], "Which weights of a "
                             "checkpoint that holds both (resflow): the EMA ones (its "
                             "default) or the trained ones.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config whose settings the workdir takes (optional).",
    lock_config=False)

TRAIN_SIZES = {"mnist": 60000, "cifar10": 50000, "cifar100": 50000, "digits": 1437}


def read_params(path: str) -> dict:
    """The settings in a JSON file (the official script's ``params.txt`` is one)."""
    with open(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON file of settings: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(value).__name__}")
    return value


def _dataset_for(converted, dataset: str | None) -> str:
    from iresnet_jax.data import DATASETS

    fits = [name for name, (s, classes, _) in DATASETS.items()
            if tuple(s) == tuple(converted.input_shape)
            and converted.model.get("num_classes") in (None, classes)]
    name = dataset or converted.dataset
    if name is None:
        if len(fits) != 1:
            raise ValueError(f"give --dataset: the datasets that fit the model are {fits}")
        return fits[0]
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if name not in fits:
        s, classes, _ = DATASETS[name]
        raise ValueError(f"the converted model does not fit {name} (images {s}, {classes} "
                         f"classes): it takes images {tuple(converted.input_shape)}"
                         + (f", {converted.model['num_classes']} classes"
                            if "num_classes" in converted.model else ""))
    return name


def make_config(converted, config=None, *, dataset: str | None = None,
                model_overrides: dict | None = None):
    """The training config of a converted model: ``config``'s settings (or the task's
    defaults on ``dataset``), its model the converted one, ``model_overrides``
    (``{"logdet.n_terms": 10}``) applied on top."""
    from experiments.configs import common

    spec = dict(converted.model)
    name, logdet = spec.pop("name"), spec.pop("logdet", None)
    model = common.model(name, logdet=logdet, **spec)
    if config is None:
        dataset = _dataset_for(converted, dataset)
        config = (common.density(dataset, TRAIN_SIZES[dataset], n_terms=1)
                  if converted.task == "density" else common.classification(dataset))
    else:
        config = config.copy_and_resolve_references()
        if config.task != converted.task:
            raise ValueError(f"the config is for task {config.task!r}, the checkpoint's "
                             f"model for {converted.task!r}")
        _dataset_for(converted, config.dataset)
    with config.unlocked():
        config.model = model
    for dotted, value in (model_overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = config.model
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"config.model has no field {dotted!r}")
        node[leaf] = value
    config.converted_from = json.dumps(converted.source, sort_keys=True)
    return config


def convert(source: str, checkpoint: str, workdir: str, *, params: dict | None = None,
            config=None, dataset: str | None = None, model_overrides: dict | None = None):
    """Reads ``checkpoint`` (``interop.read``) and writes ``workdir``; returns the
    config written."""
    from iresnet_jax import interop

    converted = interop.read(source, checkpoint, params)
    config = make_config(converted, config, dataset=dataset, model_overrides=model_overrides)
    interop.save_workdir(workdir, config, converted.variables, converted.input_shape)
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_run(cache=False)
    config, overrides = _CONFIG.value, {}
    if config is not None:
        overrides = {k[len("model."):]: v
                     for k, v in config_flags.get_override_values(flags.FLAGS["config"]).items()
                     if k.startswith("model.")}
    params = read_params(_PARAMS.value) if _PARAMS.value else None
    if _WEIGHTS.value:
        params = {**(params or {}), "weights": _WEIGHTS.value}
    written = convert(_FROM.value, _CHECKPOINT.value, _WORKDIR.value, params=params,
                      config=config, dataset=_DATASET.value, model_overrides=overrides)
    print(f"wrote {_WORKDIR.value}: {written.model.name} for {written.task} on "
          f"{written.dataset}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "workdir"])
    app.run(main)
