r"""The paper's six appendix analyses on digits, as PNG, CSV and JSON files.

    python -m experiments.analyses --workdir=/tmp/analyses --quick
    python -m experiments.analyses --workdir=/tmp/analyses --only=singular_values,samples \
        --checkpoint=/tmp/digits_vanilla --checkpoint=/tmp/digits_classifier

``--only`` takes a comma-separated subset of singular_values, reconstructions,
convergence, logdet_bias, runtime and samples (see ``experiments.analyses``).

Models: each ``--checkpoint`` is a workdir of ``experiments.train`` (digits or any
dataset); its role is read from its config (``vanilla``, ``batchnorm``, ``c=<coeff>`` or
``density``). Roles that no checkpoint provides are trained here in memory: with
``--quick`` small models for a few steps (minutes on a CPU; the figures then show the
methods, not converged models), otherwise the digits configs' full schedules
(``experiments/configs/digits_*.py``). ``--train_steps`` overrides the number of steps
(0: analyze the initialized models).
"""

from absl import app, flags

from experiments import analyses, setup_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for the figures and data.")
_QUICK = flags.DEFINE_bool("quick", False, "Small models, few steps, small settings.")
_ONLY = flags.DEFINE_list("only", [], f"Subset of {', '.join(analyses.ANALYSES)}.")
_CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", [], "Training workdir(s) to analyze "
                                         "instead of training the model of that role.")
_STEPS = flags.DEFINE_integer("train_steps", None, "Training steps of every model trained "
                              "here (default: the settings').")
_COEFFS = flags.DEFINE_list("coeffs", ["0.3", "0.5", "0.7", "0.9"],
                            "Lipschitz coefficients of the i-ResNet classifiers.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_run(cache=False)   # no compilation cache: the runtime table reports compile times
    s = analyses.get_settings(_QUICK.value)
    s.coeffs = tuple(float(c) for c in _COEFFS.value)
    from iresnet_jax import precision

    with precision.products(precision.AUTO, exact=True):   # float32 on every backend
        summary = analyses.run(_WORKDIR.value, s, only=_ONLY.value or analyses.ANALYSES,
                               checkpoints=_CHECKPOINTS.value, train_steps=_STEPS.value)
    print(f"done in {summary['seconds']['total']:.0f} s; files in {_WORKDIR.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
