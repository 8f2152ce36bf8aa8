r"""i-ResNet against the Glow baseline on toy densities, at equal depth and steps.

    python -m experiments.toy_compare --workdir=runs/toy_compare

Trains each model on each dataset with ``toy_default``'s budget (override any field with
``--config.<field>=...``; the Glow runs use their own learning rate,
``--glow_learning_rate``), then writes ``compare.json`` and ``compare.md`` (a Markdown
table of test NLL, the true NLL where known, and wall time) into --workdir and prints it.
Each run lives in ``<workdir>/<dataset>_<model>`` and resumes if interrupted.
"""

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import setup_run

from experiments.configs import toy_glow
from iresnet_jax.train import toy

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/toy_default.py", "Base config for every run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_DATASETS = flags.DEFINE_list("datasets", ["8gaussians", "checkerboard", "2spirals"],
                              "Toy datasets to compare on.")
_MODELS = flags.DEFINE_list("models", ["iresnet", "glow"], "Models to compare.")
_GLOW_DEFAULTS = toy_glow.get_config()
_GLOW_LR = flags.DEFINE_float(
    "glow_learning_rate", _GLOW_DEFAULTS.learning_rate,
    "Peak learning rate of the Glow runs (the base config's rate is the i-ResNet's; "
    "Glow, without a Lipschitz constraint, diverges at it).")
_GLOW_B2 = flags.DEFINE_float("glow_adam_b2", _GLOW_DEFAULTS.adam_b2,
                              "Adam's b2 for the Glow runs.")


def table(rows) -> str:
    lines = ["| dataset | model | blocks | steps | test NLL (nats) | true NLL | gap | "
             "wall time (s) | steps/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        true = f"{r['true_nll']:.3f}" if r["true_nll"] is not None else "–"
        gap = f"{r['gap_nats']:+.3f}" if r["gap_nats"] is not None else "–"
        rate = f"{r['steps_per_sec']:.1f}" if r.get("steps_per_sec") else "–"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['n_blocks']} | {r['steps']} | "
                     f"{r['test_nll']:.3f} | {true} | {gap} | "
                     f"{r['total_seconds_this_run']:.0f} | {rate} |")
    return "\n".join(lines)


def main(argv):
    setup_run()
    del argv
    rows = []
    for dataset in _DATASETS.value:
        for model in _MODELS.value:
            config = _CONFIG.value.copy_and_resolve_references()
            config.dataset = dataset
            config.model = model
            if model == "glow":
                config.learning_rate = _GLOW_LR.value
                config.adam_b2 = _GLOW_B2.value
            run_dir = os.path.join(_WORKDIR.value, f"{dataset}_{model}")
            rows.append(toy.train_and_evaluate(config, run_dir))
    md = table(rows)
    with open(os.path.join(_WORKDIR.value, "compare.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(_WORKDIR.value, "compare.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
