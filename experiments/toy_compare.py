r"""The i-ResNet against the Glow baseline on toy densities, at equal depth and steps.

    python -m experiments.toy_compare --workdir=runs/toy_compare --config.num_steps=4000

Trains each model on each dataset with ``toy_default``'s budget (the Glow runs with
``toy_glow``'s model and optimizer), then writes ``compare.json`` and ``compare.md`` (test
NLL, the true NLL where known, wall time) into --workdir. Each run lives in
``<workdir>/<dataset>_<model>`` and resumes if interrupted.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import setup_run
from experiments.configs import toy_glow

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "toy_default.py"),
    "Base config of every run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_DATASETS = flags.DEFINE_list("datasets", ["8gaussians", "checkerboard", "2spirals"],
                              "Toy datasets to compare on.")


def table(rows) -> str:
    lines = ["| dataset | model | steps | test NLL (nats) | true NLL | gap | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        true = f"{r['true_nll']:.3f}" if r["true_nll"] is not None else "–"
        gap = f"{r['gap_nats']:+.3f}" if r["gap_nats"] is not None else "–"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['final']['step']} | "
                     f"{r['final']['test_nll']:.3f} | {true} | {gap} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    setup_run()
    from iresnet_jax import train

    glow = toy_glow.get_config()
    rows = []
    for dataset in _DATASETS.value:
        for name in ("iresnet", "glow"):
            config = _CONFIG.value.copy_and_resolve_references()
            config.dataset = dataset
            if name == "glow":
                config.model = glow.model
                config.optimizer = glow.optimizer
            rows.append(train.train_and_evaluate(
                config, os.path.join(_WORKDIR.value, f"{dataset}_{name}")))
    md = table(rows)
    with open(os.path.join(_WORKDIR.value, "compare.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(_WORKDIR.value, "compare.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
