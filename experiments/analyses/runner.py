"""Runs the analyses and writes their PNG, CSV and JSON files and ``summary.json``."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from experiments.analyses import compute, models as models_lib, plots, runtime
from iresnet_jax.flow import describe_inverse
from iresnet_jax.train.tasks import save_figure

ANALYSES = ("singular_values", "reconstructions", "convergence", "logdet_bias", "runtime",
            "samples")


def get_settings(quick: bool) -> ml_collections.ConfigDict:
    """Settings of every analysis (``quick``: minutes on a 2-core CPU)."""
    s = ml_collections.ConfigDict()
    s.seed = 0
    s.coeffs = (0.3, 0.5, 0.7, 0.9)
    # Overrides of the digits configs' model fields, and training steps (-1: the config's
    # schedule, 0: the initialized model).
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


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def write_json(path: str, value: Any) -> None:
    """JSON with non-finite floats written as ``null``."""
    with open(path, "w") as f:
        json.dump(_clean(value), f, indent=1)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """Rows of equal keys as CSV with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _classifiers(models, coeffs):
    return [models[f"c={c:g}"] for c in coeffs if f"c={c:g}" in models]


def run(workdir: str, s: ml_collections.ConfigDict, *, only: Iterable[str] = ANALYSES,
        checkpoints: Iterable[str] = (), train_steps: int | None = None,
        models: dict | None = None, print_fn: Callable[[str], None] = print) -> dict:
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
    models = models_lib.get_models(models_lib.roles(only, coeffs), s, list(checkpoints),
                                   train_steps, models, print_fn)
    key = jax.random.key(s.seed)
    path = lambda name: os.path.join(workdir, name)
    summary: dict = {"settings": s.to_dict(), "models": {
        n: {"train_steps": t.step, "last_train_metrics": t.metrics, "dataset": t.task.name}
        for n, t in models.items()}, "seconds": {}}

    for name in only:
        t0 = time.perf_counter()
        if name == "singular_values":
            chosen = [models[r] for r in ("vanilla", "batchnorm") if r in models]
            rows = compute.singular_values(chosen + _classifiers(models, coeffs),
                                           n_power_iter=s.sv_power_iter)
            write_csv(path("singular_values.csv"), rows)
            save_figure(plots.plot_singular_values(rows), path("singular_values.png"))
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
                x_rec, res = compute.reconstruct(t, x, max_iter=s.recon_iterations)
                results.append(res)
                rows.append(x_rec)
                labels.append(f"{t.name}\nmax {res['max_error']:.1e}\nmean "
                              f"{res['mean_error']:.1e}" if res["finite"] else
                              f"{t.name}\ndiverged\n(inf / NaN)")
            fig = plots.plot_image_rows(rows, labels, vmin=float(x.min()),
                                        vmax=float(x.max()),
                                        title=f"{s.recon_iterations} fixed-point "
                                              "iterations per block")
            save_figure(fig, path("reconstructions.png"))
            write_json(path("reconstructions.json"), results)
            summary["reconstructions"] = {r["model"]: {"max_error": r["max_error"],
                                                       "mean_error": r["mean_error"],
                                                       "inverse": r["inverse"]}
                                          for r in results}
            for r in results:
                print_fn(f"reconstructions, {r['model']}: {describe_inverse(r['inverse'])}")
        elif name == "convergence":
            rows = []
            for t in _classifiers(models, coeffs):
                rows += compute.fixed_point_convergence(
                    t, t.test_inputs(s.convergence_images), s.convergence_iterations,
                    repeats=s.convergence_repeats)
            write_csv(path("fixed_point_convergence.csv"), rows)
            save_figure(plots.plot_convergence(rows), path("fixed_point_convergence.png"))
            summary["convergence"] = {
                r["model"]: {"iterations": r["iterations"], "max_error": r["max_error"],
                             "seconds_per_batch": r["seconds_per_batch"]}
                for r in rows if r["iterations"] == max(s.convergence_iterations)}
        elif name == "logdet_bias":
            t = models["density"]
            result = compute.logdet_bias(t, t.test_inputs(s.bias_examples),
                                         jax.random.fold_in(key, 4),
                                         max_terms=s.bias_max_terms, n_probes=s.bias_probes)
            write_json(path("logdet_bias.json"), result)
            save_figure(plots.plot_logdet_bias(result), path("logdet_bias.png"))
            summary["logdet_bias"] = {k: result[k] for k in (
                "examples", "probes_per_example", "exact_mean", "series_bias",
                "estimate_std", "theorem3_bound")}
        elif name == "runtime":
            result = runtime.runtime_comparison(seed=s.seed, **s.runtime.to_dict())
            write_json(path("runtime.json"), result)
            with open(path("runtime.md"), "w") as f:
                f.write(runtime.runtime_markdown(result))
            save_figure(plots.plot_runtime(result), path("runtime.png"))
            summary["runtime"] = {n: {"seconds": r["seconds"],
                                      "ratio_to_glow": r["ratio_to_glow"]}
                                  for n, r in result["models"].items()}
        elif name == "samples":
            t = models["density"]
            x, info = compute.sample_images(t, s.samples, jax.random.fold_in(key, 6),
                                            temperature=s.temperature)
            per_row = 8
            rows = [x[i:i + per_row] for i in range(0, len(x), per_row)]
            fig = plots.plot_image_rows(rows, [""] * len(rows), vmin=-0.5, vmax=0.5,
                                        title=f"{t.name}: samples after {t.step} steps, "
                                              f"T={s.temperature}")
            save_figure(fig, path("samples.png"))
            np.save(path("samples.npy"), x)
            write_json(path("samples.json"), info)
            summary["samples"] = info
            print_fn(f"samples: {describe_inverse(info['inverse'])}")
        summary["seconds"][name] = time.perf_counter() - t0
        print_fn(f"{name}: {summary['seconds'][name]:.1f} s")
    summary["seconds"]["total"] = time.perf_counter() - t_start
    write_json(path("summary.json"), summary)
    return summary
