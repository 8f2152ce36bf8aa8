r"""Trains a flow on a 2-D toy density and draws it (the README's main job).

    python -m experiments.toy_density --workdir=runs/toy
    python -m experiments.toy_density --workdir=runs/toy_paper \
        --config=experiments/configs/toy_paper.py --config.dataset=8gaussians

``experiments.train`` with ``experiments/configs/toy_default.py`` as the default config;
rerunning the same command resumes, and every config field can be overridden
(``--config.num_steps=500``, ``--config.model.logdet.method=series``).
"""

import os

from absl import app, flags

from experiments import train

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "toy_default.py")

if __name__ == "__main__":
    _CONFIG, _WORKDIR = train.define_flags(DEFAULT_CONFIG)
    flags.mark_flag_as_required("workdir")
    app.run(train.make_main(_CONFIG, _WORKDIR))
