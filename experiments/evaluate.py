r"""Evaluates the newest checkpoint of a training workdir on its test set.

    python -m experiments.evaluate --workdir=/tmp/digits_density [--bias_tol=1e-4] \
        [--se_tol=1e-4]

Toy densities: the test NLL. Classifiers: test accuracy. Density models: bits/dim with
the paper's protocol (series terms from the Theorem 3 bound so the bias is below
``--bias_tol`` bits/dim, Hutchinson passes until the standard error is below
``--se_tol``). Writes ``<workdir>/evaluation.json``.
"""

from absl import app, flags

from experiments import setup_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).")
_BIAS_TOL = flags.DEFINE_float("bias_tol", 1e-4, "Bound on the log-det bias, bits/dim.")
_SE_TOL = flags.DEFINE_float("se_tol", 1e-4, "Target standard error, bits/dim.")
_N_SAMPLES = flags.DEFINE_integer("n_samples", 1, "Hutchinson probes per example per pass.")
_MIN_PASSES = flags.DEFINE_integer("min_passes", 2, "Fewest passes over the test set.")
_MAX_PASSES = flags.DEFINE_integer("max_passes", 100, "Most passes over the test set.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Evaluation batch (0: the config's).")
_BOUND = flags.DEFINE_enum("lipschitz_bound", "auto", ["auto", "dense", "power", "circular"],
                           "How each conv's operator norm is obtained "
                           "(iresnet_jax.lipschitz.conv_operator_norm).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_run()
    from iresnet_jax import precision
    from iresnet_jax.train import evaluation

    with precision.products(precision.AUTO, exact=True):   # float32 on every backend
        evaluation.evaluate_workdir(
            _WORKDIR.value, bias_tol=_BIAS_TOL.value, se_tol=_SE_TOL.value,
            n_samples=_N_SAMPLES.value, min_passes=_MIN_PASSES.value,
            max_passes=_MAX_PASSES.value, bound=_BOUND.value, batch_size=_BATCH.value or None)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
