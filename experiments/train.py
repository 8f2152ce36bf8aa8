r"""Trains any task from a config file; rerunning the same command resumes.

    python -m experiments.train --config=experiments/configs/digits_density.py \
        --workdir=/tmp/digits_density [--config.model.logdet.gradient=neumann]

Every config field can be overridden on the command line (``--config.<field>=value``).
``--config.processes=N`` runs N processes of one data-parallel run on this machine
(``iresnet_jax.train.distributed``). Writes checkpoints, ``metrics.jsonl``, TensorBoard
logs, ``config.json`` and ``metrics.json`` into ``--workdir``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import setup_run


def define_flags(default_config: str | None = None):
    """The ``--config`` and ``--workdir`` flags (``default_config``: a config file); a
    ``--config.<field>`` that names no field stops here with the nearest valid ones."""
    from experiments.configs import overrides

    overrides.check_argv(default_config=default_config)
    config = config_flags.DEFINE_config_file("config", default_config,
                                             "Path to a config file (experiments/configs).",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None,
                                  "Directory for checkpoints, metrics and figures.")
    return config, workdir


def make_main(config_flag, workdir_flag):
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        setup_run()
        from iresnet_jax import train
        from iresnet_jax.train import distributed

        processes = config_flag.value.get("processes", 1)
        if processes > 1 and not distributed.launched():
            import jax

            if jax.process_count() > 1:
                raise app.UsageError(
                    "--config.processes starts processes on this machine; a multi-host "
                    "run (--jax_distributed or --coordinator_address) already has its own")
            sys.exit(distributed.launch(processes))   # the processes run this command
        train.train_and_evaluate(config_flag.value, workdir_flag.value)
    return main


if __name__ == "__main__":
    _CONFIG, _WORKDIR = define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(make_main(_CONFIG, _WORKDIR))
