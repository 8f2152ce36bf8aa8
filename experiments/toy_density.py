r"""Train a flow on a 2-D toy density and plot it (the README's main job).

    python -m experiments.toy_density --workdir=runs/toy
    python -m experiments.toy_density --config=experiments/configs/toy_paper.py \
        --workdir=runs/toy_paper --config.dataset=8gaussians

Rerunning the same command resumes from the last checkpoint in --workdir. Any config field
can be overridden on the command line (``--config.num_steps=500``).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import setup_run

from iresnet_jax.train import toy

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/toy_default.py", "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, figure.")


def main(argv):
    setup_run()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    toy.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
