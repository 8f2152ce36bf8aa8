"""The paper's six appendix analyses (SPEC section 7) on digits, as PNG + CSV/JSON files.

    python -m experiments.analyses --workdir=/tmp/analyses --quick
    python -m experiments.analyses --workdir=/tmp/analyses --only=singular_values,samples \
        --checkpoint=/tmp/digits_vanilla --checkpoint=/tmp/digits_classifier

Analyses (``--only`` takes a comma-separated subset):

* ``singular_values`` (Fig. 6): largest singular value of every conv operator of the
  vanilla, BatchNorm and i-ResNet classifiers (c in ``--coeffs``), by FFT and by power
  iteration;
* ``reconstructions`` (Fig. 7): originals, i-ResNet (largest c) and vanilla (and BatchNorm)
  reconstructions with 100 fixed-point iterations per block, max and mean errors;
* ``convergence`` (Fig. 8): reconstruction error and time per batch against the number of
  fixed-point iterations, per c;
* ``logdet_bias`` (Fig. 9): bias and standard deviation of the power-series log-det
  estimator of the density model against the exact value, 1..20 terms, with Theorem 3;
* ``runtime`` (Table 5): one forward+backward pass of Glow, i-ResNet, i-ResNet + SN and
  i-ResNet + SN + log-det with the same layers, channels and batch;
* ``samples``: samples of the density model.

Models: each ``--checkpoint`` is a workdir of ``experiments/train.py`` (digits or any
dataset); its role is read from its config (``vanilla``, ``batchnorm``, ``c=<coeff>`` or
``density``). Roles that no checkpoint provides are trained here in memory: with
``--quick`` small models for a few steps (minutes on a CPU; the figures then show the
methods, not converged models), otherwise the digits configs' full schedules
(``experiments/configs/digits_*.py``). ``--train_steps`` overrides the number of steps
(0: analyze the initialized models).
"""

from __future__ import annotations

from iresnet_jax import runtime  # no JAX import

if __name__ == "__main__":
    # Restart once with huge pages for XLA's buffers (see runtime.py) before the heavy
    # imports below, so that they run only once.
    runtime.relaunch_with_hugepages()

import os
import time
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np
from absl import app, flags

from experiments import quiet_logs

from experiments.configs import digits_batchnorm, digits_classifier, digits_density
from experiments.configs import digits_vanilla
from iresnet_jax import analysis
from iresnet_jax.train import experiment

ANALYSES = ("singular_values", "reconstructions", "convergence", "logdet_bias", "runtime",
            "samples")

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for the figures and data.")
_QUICK = flags.DEFINE_bool("quick", False, "Small models, few steps, small settings.")
_ONLY = flags.DEFINE_list("only", [], f"Subset of {', '.join(ANALYSES)}.")
_CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", [], "Training workdir(s) to analyze "
                                         "instead of training the model of that role.")
_STEPS = flags.DEFINE_integer("train_steps", None, "Training steps of every model trained "
                              "here (default: the settings').")
_COEFFS = flags.DEFINE_list("coeffs", ["0.3", "0.5", "0.7", "0.9"],
                            "Lipschitz coefficients of the i-ResNet classifiers.")


def get_settings(quick: bool) -> ml_collections.ConfigDict:
    """Settings of every analysis (``quick``: minutes on a 2-core CPU)."""
    s = ml_collections.ConfigDict()
    s.seed = 0
    s.coeffs = (0.3, 0.5, 0.7, 0.9)
    # Model overrides of the digits presets, and training steps (-1: the config's schedule,
    # 0: the initialized model).
    s.classifier_model = dict(stages=(1, 1, 1), hidden=16) if quick else {}
    s.classifier_steps = 80 if quick else -1
    s.density_model = dict(blocks_per_scale=(1, 1, 1), hidden=16) if quick else {}
    s.density_steps = 150 if quick else -1
    s.batch_size = 64
    s.sv_power_iter = 200 if quick else 1000
    s.recon_images = 10
    s.recon_iterations = 100
    s.convergence_images = 100
    s.convergence_iterations = ((1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100) if quick
                                else tuple(range(1, 101)))
    s.convergence_repeats = 1 if quick else 3
    s.bias_examples = 100
    s.bias_probes = 4 if quick else 10
    s.bias_max_terms = 20
    s.runtime = (dict(shape=(8, 8, 16), batch=16, n_blocks=4, hidden=32, repeats=3) if quick
                 else dict(shape=(16, 16, 12), batch=32, n_blocks=8, hidden=64, repeats=5))
    s.samples = 32
    s.temperature = 1.0
    return s


NEEDS = {
    "singular_values": ("vanilla", "batchnorm", "coeffs"),
    "reconstructions": ("vanilla", "batchnorm", "max_coeff"),
    "convergence": ("coeffs",),
    "logdet_bias": ("density",),
    "runtime": (),
    "samples": ("density",),
}


def _roles(only: Iterable[str], coeffs) -> list[str]:
    roles = []
    for name in only:
        for need in NEEDS[name]:
            if need == "coeffs":
                roles += [f"c={c:g}" for c in coeffs]
            elif need == "max_coeff":
                roles.append(f"c={max(coeffs):g}")
            else:
                roles.append(need)
    return list(dict.fromkeys(roles))


def model_config(role: str, s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training config of a role: a digits config with the settings' overrides."""
    if role == "density":
        c = digits_density.get_config()
        c.model.update(s.density_model)
    else:
        module = {"vanilla": digits_vanilla, "batchnorm": digits_batchnorm}.get(
            role, digits_classifier)
        c = module.get_config()
        c.model.update(s.classifier_model)
        if role.startswith("c="):
            c.model.coeff = float(role[2:])
    c.batch_size = s.batch_size
    c.seed = s.seed
    return c


def get_models(roles, s, checkpoints=(), train_steps=None, models=None,
               print_fn: Callable[[str], None] = print) -> dict[str, analysis.Trained]:
    """``models`` (role -> ``Trained``), then the checkpoints, then the roles still missing
    trained here."""
    models = dict(models or {})
    for workdir in checkpoints:
        t = analysis.load_workdir(workdir)
        print_fn(f"{t.name}: restored step {t.step} from {workdir}")
        models[t.name] = t
    for role in roles:
        if role in models:
            continue
        config = model_config(role, s)
        steps = train_steps
        if steps is None:
            steps = s.density_steps if role == "density" else s.classifier_steps
        if steps < 0:
            steps = experiment.total_steps(config, experiment.load_data(config)[0])
        models[role] = analysis.train_quick(config, steps, name=role, print_fn=print_fn)
    return models


def _classifiers(models, coeffs):
    return [models[f"c={c:g}"] for c in coeffs if f"c={c:g}" in models]


def run(workdir: str, s: ml_collections.ConfigDict, *, only: Iterable[str] = ANALYSES,
        checkpoints: Iterable[str] = (), train_steps: int | None = None,
        models: dict[str, analysis.Trained] | None = None,
        print_fn: Callable[[str], None] = print) -> dict:
    """Runs the analyses ``only`` and writes their files into ``workdir``; returns a
    summary (also written to ``summary.json``). ``models`` gives already trained models by
    role (``"vanilla"``, ``"batchnorm"``, ``"c=0.9"``, ``"density"``...)."""
    only = list(only)
    unknown = set(only) - set(ANALYSES)
    if unknown:
        raise ValueError(f"unknown analyses {sorted(unknown)}; known: {ANALYSES}")
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    coeffs = tuple(float(c) for c in s.coeffs)
    models = get_models(_roles(only, coeffs), s, list(checkpoints), train_steps, models,
                        print_fn)
    key = jax.random.key(s.seed)
    path = lambda name: os.path.join(workdir, name)
    summary: dict = {"settings": s.to_dict(), "models": {
        n: {"train_steps": t.step, "last_train_metrics": t.metrics,
            "dataset": t.train_data.name} for n, t in models.items()}, "seconds": {}}

    for name in only:
        t0 = time.perf_counter()
        if name == "singular_values":
            chosen = [models[r] for r in ("vanilla", "batchnorm") if r in models]
            chosen += _classifiers(models, coeffs)
            rows = analysis.singular_values(chosen, n_power_iter=s.sv_power_iter)
            analysis.write_csv(path("singular_values.csv"), rows)
            analysis.save_figure(analysis.plot_singular_values(rows),
                                 path("singular_values.png"))
            summary["singular_values"] = {
                m: {"max_fft": max(r["fft"] for r in rows if r["model"] == m),
                    "max_power": max(r["power"] for r in rows if r["model"] == m),
                    "layers": sum(r["model"] == m for r in rows)}
                for m in dict.fromkeys(r["model"] for r in rows)}
        elif name == "reconstructions":
            ires = f"c={max(coeffs):g}"
            chosen = [models[r] for r in (ires, "vanilla", "batchnorm") if r in models]
            x = chosen[0].test_inputs(s.recon_images)
            rows, labels, results = [x], ["original"], []
            for t in chosen:
                x_rec, res = analysis.reconstruct(t, x, max_iter=s.recon_iterations)
                results.append(res)
                rows.append(x_rec)
                labels.append(f"{t.name}\nmax {res['max_error']:.1e}\nmean "
                              f"{res['mean_error']:.1e}" if res["finite"] else
                              f"{t.name}\ndiverged\n(inf / NaN)")
            fig = analysis.plot_image_rows(rows, labels, vmin=float(x.min()),
                                           vmax=float(x.max()),
                                           title=f"{s.recon_iterations} fixed-point "
                                                 "iterations per block")
            analysis.save_figure(fig, path("reconstructions.png"))
            analysis.write_json(path("reconstructions.json"), results)
            summary["reconstructions"] = {r["model"]: {"max_error": r["max_error"],
                                                       "mean_error": r["mean_error"]}
                                          for r in results}
        elif name == "convergence":
            rows = []
            for t in _classifiers(models, coeffs):
                rows += analysis.fixed_point_convergence(
                    t, t.test_inputs(s.convergence_images), s.convergence_iterations,
                    repeats=s.convergence_repeats)
            analysis.write_csv(path("fixed_point_convergence.csv"), rows)
            analysis.save_figure(analysis.plot_convergence(rows),
                                 path("fixed_point_convergence.png"))
            summary["convergence"] = {
                r["model"]: {"iterations": r["iterations"], "max_error": r["max_error"],
                             "seconds_per_batch": r["seconds_per_batch"]}
                for r in rows if r["iterations"] == max(s.convergence_iterations)}
        elif name == "logdet_bias":
            t = models["density"]
            result = analysis.logdet_bias(t, t.test_inputs(s.bias_examples),
                                          jax.random.fold_in(key, 4),
                                          max_terms=s.bias_max_terms,
                                          n_probes=s.bias_probes)
            analysis.write_json(path("logdet_bias.json"), result)
            analysis.save_figure(analysis.plot_logdet_bias(result), path("logdet_bias.png"))
            summary["logdet_bias"] = {k: result[k] for k in (
                "examples", "probes_per_example", "exact_mean", "series_bias",
                "estimate_std", "theorem3_bound")}
        elif name == "runtime":
            result = analysis.runtime_comparison(seed=s.seed, **s.runtime.to_dict())
            analysis.write_json(path("runtime.json"), result)
            with open(path("runtime.md"), "w") as f:
                f.write(analysis.runtime_markdown(result))
            analysis.save_figure(analysis.plot_runtime(result), path("runtime.png"))
            summary["runtime"] = {n: {"seconds": r["seconds"],
                                      "ratio_to_glow": r["ratio_to_glow"]}
                                  for n, r in result["models"].items()}
        elif name == "samples":
            t = models["density"]
            x, info = analysis.sample_images(t, s.samples, jax.random.fold_in(key, 6),
                                             temperature=s.temperature)
            per_row = 8
            rows = [x[i:i + per_row] for i in range(0, len(x), per_row)]
            fig = analysis.plot_image_rows(rows, [""] * len(rows), vmin=-0.5, vmax=0.5,
                                           title=f"{t.name}: samples after {t.step} steps, "
                                                 f"T={s.temperature}")
            analysis.save_figure(fig, path("samples.png"))
            np.save(path("samples.npy"), x)
            analysis.write_json(path("samples.json"), info)
            summary["samples"] = info
        summary["seconds"][name] = time.perf_counter() - t0
        print_fn(f"{name}: {summary['seconds'][name]:.1f} s")
    summary["seconds"]["total"] = time.perf_counter() - t_start
    analysis.write_json(path("summary.json"), summary)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logs()  # no compilation cache: the runtime table reports compile seconds
    s = get_settings(_QUICK.value)
    s.coeffs = tuple(float(c) for c in _COEFFS.value)
    summary = run(_WORKDIR.value, s, only=_ONLY.value or ANALYSES,
                  checkpoints=_CHECKPOINTS.value, train_steps=_STEPS.value)
    print(f"done in {summary['seconds']['total']:.0f} s; files in {_WORKDIR.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
