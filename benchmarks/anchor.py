"""Speed benchmark against the official PyTorch i-ResNet at the ANCHORS.md configuration.

Builds the two ANCHORS.md models (``models.build("anchors_density")``: 51,680 parameters;
``models.build("anchors_classifier")``: 214,650) at batch 64 on MNIST-shaped inputs
(28x28x1) and prints one JSON object with the steady-state seconds per call (median over
``--repeats`` calls after ``--warmup``), the compile seconds (``*.compile``) and, for the
inverses, the max abs reconstruction error (``*.recon_error``) of:

* ``density.forward``: evaluation forward to the latent ``z`` (no log-det);
* ``density.train``: one training forward + backward without the log-det;
* ``density.train_logdet``: the same with the 5-term power series (one Gaussian probe,
  gradient by differentiating through the series), loss = mean bits/dim; the powers are
  taken from both ends (``mode="split"``: ``v^T J^k v`` as ``(v^T J^a)(J^b v)``, the same
  estimate and gradient as the reference's chain of vector-Jacobian products);
* ``density.train_logdet_neumann``: the same estimate with the Neumann-series gradient
  (``LogDetConfig("series", n_terms=5, gradient="neumann")``);
* ``density.train_logdet_staged``, ``density.train_logdet_neumann_staged``: the same two
  gradients computed block by block (``train.staged.StagedDensityGrad``: one compiled
  program per distinct block, chained from Python); their ``*.compile`` is the first
  call's seconds minus a steady-state call's;
* ``density.inverse20``: the inverse with 20 fixed-point iterations per block
  (``tol=0, max_iter=20``);
* ``density.inverse_tol``: the inverse to a max reconstruction error of 1e-6 with a
  convergence test, the faster of the plain iteration and Anderson acceleration (both
  reported as ``*.inverse_tol_plain`` / ``*.inverse_tol_anderson``);
* the classifier's ``forward``, ``train`` (cross-entropy), ``inverse20``, ``inverse_tol``;
* ``density.train_logdet_two_processes``, ``classifier.train_two_processes``: the same
  gradients as two processes of 32 examples each, one per core, their ``(loss, gradient)``
  averaged through shared memory (``benchmarks.processes``; skipped with fewer than two
  CPUs): XLA:CPU runs these models' small products faster on one thread each than split
  over two (``benchmarks.gemm_ceiling``). ``*.compile`` is one rank's program compiled
  with the whole machine, which the ranks then load from a compilation cache.

What a "training step" is here: exactly what the reference's "forward + backward" times:
the training forward (``train=True``: 5 power iterations per spectrally normalized conv,
state update of the power-iteration vectors and, for the classifier, BatchNorm
statistics), the loss, and the gradient with respect to every parameter. The optimizer
update is *not* included (it is a few elementwise ops over 50k-215k parameters);
``density.train_logdet_step`` (with ``--with_step``) times the library's whole jitted training step
(``train.steps.make_train_step``: dequantization, the same loss and gradient, Adamax
update, state donated) for comparison.

Also reported: ``matmul_gflops`` (a float32 1024x1024 matmul through XLA, measured in the
same run, at its start; ``matmul_gflops_at_end`` at its end), ``density.train_logdet.flops``
(XLA's count) and the FLOP rate it implies (``*.fraction_of_matmul_rate``: against the
higher of the two matmul rates), the
reference times of ANCHORS.md (``reference.*``) and our time as a fraction of the
reference's (``ratio.*``), the log-det overhead, and the load average before and after.
On a shared machine ``machine_share`` (this run's matmul rate over the 239 GFLOP/s of
ANCHORS.md) and ``ratio_load_adjusted.*`` (ratio times that share) give a rough estimate
of the ratios on an unloaded machine; they are estimates, not measurements. Each timed
key also has ``*.page_faults`` and ``*.system_seconds`` per call, and each jitted key
``*.compile_lower`` (tracing + lowering), ``*.compile_xla`` (XLA) and ``*.compile_cpu``
(CPU seconds of the whole compile, on all threads). With ``--reference FILE``
(the JSON of ``python -m benchmarks.reference_torch``, which times the official PyTorch code
on this machine) the ratios to that measurement are added as ``ratio_measured.*``: the
comparison ANCHORS.md asks for, both timed on one machine in one session.

The allocator: by default the script restarts itself once with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``iresnet_jax.runtime``; transparent huge
pages for XLA's per-call buffers, as the experiment binaries do), and records the
setting under ``allocator``. ``--allocator=default`` runs as started, to measure the
difference.

    python -m benchmarks.anchor                      # everything (a few minutes)
    python -m benchmarks.anchor --only density.train_logdet,classifier.train

Nothing is asserted. Timings on a shared machine: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import report
from benchmarks.timing import compile_and_time, matmul_gflops, time_first_call
from iresnet_jax import logdet as logdet_lib
from iresnet_jax import models
from iresnet_jax import runtime
from iresnet_jax.models import density as density_lib
from iresnet_jax.train import multiprocess
from iresnet_jax.train import staged
from iresnet_jax.train import steps
from iresnet_jax.train.state import TrainState

BATCH = 64
SHAPE = (28, 28, 1)
DIM = 28 * 28
N_BINS = 256

# ANCHORS.md: the official PyTorch i-ResNet on a 2-core CPU (torch 2.13, 2 threads,
# float32, batch 64), medians over 15 runs, seconds per call.
REFERENCE = {
    "density.forward": 0.0220,
    "density.train": 0.0412,
    "density.train_logdet": 0.2173,
    "density.inverse20": 0.1675,
    "classifier.forward": 0.0301,
    "classifier.train": 0.1209,
    "classifier.inverse20": 0.5406,
}
REFERENCE_RECON_ERROR = 2.7e-7
# ANCHORS.md: this kind of machine's float32 matmul rate through XLA when not shared.
REFERENCE_MATMUL_GFLOPS = 239.0
# ANCHORS.md goals as fractions of the reference's time (inverse_tol: of its inverse20).
GOALS = {
    "density.train_logdet": 0.6,
    "density.train_logdet_neumann": 0.4,
    "density.train_logdet_staged": 0.6,
    "density.train_logdet_neumann_staged": 0.4,
    "density.train_logdet_two_processes": 0.6,
    "classifier.train_two_processes": 1.0,
    "density.train": 0.8,
    "density.forward": 0.4,
    "classifier.train": 1.0,
    "density.inverse20": 0.67,
    "classifier.inverse20": 0.67,
    "density.inverse_tol": 0.17,
    "classifier.inverse_tol": 0.17,
}
RECON_TOL = 1e-6
# Per-block convergence test of the tolerance inverses: relative, ``max|x^k - x^{k-1}| <=
# STEP_RTOL * max|x^k|`` per example (``inverse_tol=0, inverse_rtol=STEP_RTOL``). It keeps
# the max reconstruction error of both models below RECON_TOL (measured: 3.9e-7 and
# 3.6e-7) and adapts to the classifier's larger features, where an absolute step of 2e-7
# is below float32 resolution and would never be reached.
STEP_RTOL = 1e-6

# The reference's estimator and gradient; "split" computes each v^T J^k v from both ends
# (the image density presets' default for the series, README "Speed against the reference").
SERIES = logdet_lib.LogDetConfig("series", n_terms=5, mode="split")
NEUMANN = logdet_lib.LogDetConfig("series", n_terms=5, gradient="neumann")
NONE = logdet_lib.LogDetConfig("none")


def _data(batch: int = BATCH, shape: tuple[int, ...] = SHAPE):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, N_BINS, (batch,) + tuple(shape)).astype(np.float32)
    x = np.asarray(density_lib.dequantize(jax.random.key(7), jnp.asarray(pixels), N_BINS))
    labels = rng.integers(0, 10, (batch,)).astype(np.int32)
    return jnp.asarray(pixels), jnp.asarray(x), jnp.asarray(labels)


def density_loss(model, dim: int = DIM):
    """``(params, state, x) -> (mean bits/dim, new spectral state)``: what a density
    training step differentiates (log-det probes from a fixed key)."""
    rngs = {"logdet": jax.random.key(2)}

    def loss(params, state, x):
        log_prob, new_state = model.apply(
            {"params": params, **state}, x, train=True, mutable=["spectral"],
            rngs=rngs, method="log_prob")
        return jnp.mean(density_lib.bits_per_dim(log_prob, dim, N_BINS)), new_state

    return loss


def classifier_loss(model):
    """``(params, state, x, labels) -> (mean cross-entropy, new state)``."""
    def loss(params, state, x, labels):
        logits, new_state = model.apply({"params": params, **state}, x, train=True,
                                        mutable=["spectral", "batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.mean(ce), new_state

    return loss


def _record(results, name, r, extra=None):
    results[name] = r["median"]
    results[f"{name}.min"] = r["min"]
    results[f"{name}.compile"] = r["compile"]
    for key in ("page_faults", "system_seconds", "compile_lower", "compile_xla",
                "compile_cpu"):
        if key in r:
            results[f"{name}.{key}"] = r[key]
    if extra:
        results.update({f"{name}.{k}": v for k, v in extra.items()})
    print(f"{name}: {r['median']:.4f} s (min {r['min']:.4f}, compile {r['compile']:.1f} s)",
          flush=True)


def _inverse_iterations(inter) -> float:
    """Mean over blocks of the largest per-example iteration count."""
    leaves = [np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(inter)
              if "inverse_iterations" in jax.tree_util.keystr(p)]
    per_block = []
    for a in leaves:
        a = a.reshape((-1, a.shape[-1])) if a.ndim > 1 else a[None]
        per_block.extend(a.max(axis=-1).tolist())
    return float(np.mean(per_block)) if per_block else float("nan")


def _time_inverse(results, name, model, variables, z, x, repeats, warmup):
    def invert(v, z):
        out, inter = model.apply(v, z, method="inverse", mutable=["intermediates"])
        return out, inter

    r = compile_and_time(invert, variables, z, repeats=repeats, warmup=warmup)
    x_rec, inter = r["output"]
    _record(results, name, r, {
        "recon_error": float(jnp.max(jnp.abs(x_rec - x))),
        "iterations_per_block": _inverse_iterations(inter)})


def _tol_variants(results, prefix, build, variables, z, x, repeats, warmup, wanted):
    name = f"{prefix}.inverse_tol"
    if not wanted(name):
        return
    for method in ("plain", "anderson"):
        model = build(inverse_tol=0.0, inverse_rtol=STEP_RTOL, inverse_max_iter=100,
                      inverse_method=method)
        _time_inverse(results, f"{name}_{method}", model, variables, z, x, repeats, warmup)
    best = min(("plain", "anderson"), key=lambda m: results[f"{name}_{m}"])
    results[name] = results[f"{name}_{best}"]
    results[f"{name}.method"] = best
    for field in ("compile", "recon_error", "iterations_per_block", "min"):
        results[f"{name}.{field}"] = results[f"{name}_{best}.{field}"]


def _time_processes(results, key, repeats, warmup):
    """``{key}_two_processes``: ``key``'s gradient as two pinned processes
    (``benchmarks.processes``), where this process may use two CPUs."""
    from benchmarks import processes   # imports benchmarks.ab, which imports this module

    name = f"{key}_two_processes"
    if len(multiprocess.available_cpus()) < 2:
        print(f"{name}: skipped (fewer than two CPUs)", flush=True)
        return
    r = processes.time_data_parallel(key, 2, repeats=repeats, warmup=warmup)
    extra = {"loss": r["loss"], "load_seconds": max(r["load_seconds"])}
    if r.get("flops"):
        extra.update(flops=r["flops"], gflops_per_s=r["gflops_per_s"])
    _record(results, name, r, extra)


def density_benchmarks(results, repeats, warmup, wanted, with_step=False):
    pixels, x, _ = _data()

    def build(**kw):
        return models.build("anchors_density", **kw)

    base = build()
    variables = jax.jit(base.init)({"params": jax.random.key(0),
                                    "logdet": jax.random.key(1)}, x)
    results["density.num_params"] = models.count_params(variables["params"])
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}

    plain = base.clone(logdet=NONE)
    if wanted("density.forward"):
        r = compile_and_time(lambda v, x: plain.apply(v, x)[0], variables, x,
                             repeats=repeats, warmup=warmup)
        _record(results, "density.forward", r)

    for name, cfg in (("density.train", NONE), ("density.train_logdet", SERIES),
                      ("density.train_logdet_neumann", NEUMANN)):
        if not wanted(name):
            continue
        grad_fn = jax.value_and_grad(density_loss(base.clone(logdet=cfg)), has_aux=True)
        r = compile_and_time(grad_fn, params, model_state, x, repeats=repeats, warmup=warmup)
        extra = {"loss_bits_per_dim": float(r["output"][0][0])}
        if r["flops"]:
            extra["flops"] = r["flops"]
            extra["gflops_per_s"] = r["flops"] / r["median"] / 1e9
        _record(results, name, r, extra)

    for name, cfg in (("density.train_logdet_staged", SERIES),
                      ("density.train_logdet_neumann_staged", NEUMANN)):
        if not wanted(name):
            continue
        grad_fn = staged.StagedDensityGrad(base.clone(logdet=cfg), n_bins=N_BINS, dim=DIM)
        r = time_first_call(grad_fn, params, model_state, x, jax.random.key(2),
                            repeats=repeats, warmup=warmup)
        _record(results, name, r, {"loss_bits_per_dim": float(r["output"][0]),
                                   "first_call": r["first_call"]})

    if wanted("density.train_logdet_two_processes"):
        _time_processes(results, "density.train_logdet", repeats, warmup)

    if with_step and wanted("density.train_logdet_step"):
        model = base.clone(logdet=SERIES)
        state = TrainState.create(params=params, model_state=model_state,
                                  tx=optax.adamax(0.003),
                                  rng=jax.random.key_data(jax.random.key(3)))
        step = steps.make_train_step(model, "density", n_bins=N_BINS, dim=DIM)
        r = compile_and_time(lambda s, b: step(s, b)[1], state, {"image": pixels},
                             repeats=repeats, warmup=warmup)
        _record(results, "density.train_logdet_step", r)

    need_z = any(wanted(f"density.{k}") for k in ("inverse20", "inverse_tol"))
    if need_z:
        z = jax.jit(lambda v, x: plain.apply(v, x)[0])(variables, x)
    if wanted("density.inverse20"):
        model = build(logdet_method="none", inverse_tol=0.0, inverse_max_iter=20)
        _time_inverse(results, "density.inverse20", model, variables, z, x, repeats, warmup)
    if need_z:
        _tol_variants(results, "density", lambda **kw: build(logdet_method="none", **kw),
                      variables, z, x, repeats, warmup, wanted)


def classifier_benchmarks(results, repeats, warmup, wanted):
    _, x, labels = _data()

    def build(**kw):
        return models.build("anchors_classifier", **kw)

    base = build()
    variables = jax.jit(base.init)({"params": jax.random.key(0)}, x)
    results["classifier.num_params"] = models.count_params(variables["params"])
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}

    if wanted("classifier.forward"):
        r = compile_and_time(lambda v, x: base.apply(v, x), variables, x,
                             repeats=repeats, warmup=warmup)
        _record(results, "classifier.forward", r)

    if wanted("classifier.train"):
        grad_fn = jax.value_and_grad(classifier_loss(base), has_aux=True)
        r = compile_and_time(grad_fn, params, model_state, x, labels, repeats=repeats,
                             warmup=warmup)
        extra = {}
        if r["flops"]:
            extra = {"flops": r["flops"], "gflops_per_s": r["flops"] / r["median"] / 1e9}
        _record(results, "classifier.train", r, extra)

    if wanted("classifier.train_two_processes"):
        _time_processes(results, "classifier.train", repeats, warmup)

    if any(wanted(f"classifier.{k}") for k in ("inverse20", "inverse_tol")):
        z = jax.jit(lambda v, x: base.apply(v, x, method="features"))(variables, x)
        if wanted("classifier.inverse20"):
            model = build(inverse_tol=0.0, inverse_max_iter=20)
            _time_inverse(results, "classifier.inverse20", model, variables, z, x, repeats,
                          warmup)
        _tol_variants(results, "classifier", build, variables, z, x, repeats, warmup,
                      wanted)


def _reference_for(name: str, reference: dict) -> float | None:
    """The reference time a goal key is compared with (``inverse_tol``: their
    ``inverse20``; the Neumann step: their 5-term log-det step; a staged step: the
    same step's, as for two processes)."""
    name = name.removesuffix("_staged").removesuffix("_two_processes")
    if name.endswith("inverse_tol"):
        name = name.replace("inverse_tol", "inverse20")
    elif name.endswith("neumann"):
        name = "density.train_logdet"
    return reference.get(name)


def summarize_measured_reference(results, measured: dict):
    """Ratios to a reference measured on this machine (``benchmarks.reference_torch``):
    ``reference_measured.*`` and ``ratio_measured.*``."""
    for name in REFERENCE:
        if name in measured:
            results[f"reference_measured.{name}"] = measured[name]
    for key in ("torch", "matmul_gflops", "date_utc", "load_average_before"):
        if key in measured:
            results[f"reference_measured.{key}"] = measured[key]
    for name in list(GOALS) + ["classifier.forward"]:
        ref = _reference_for(name, measured)
        if name in results and ref:
            results[f"ratio_measured.{name}"] = results[name] / ref


def summarize(results):
    """Adds the reference times, our ratios, the log-det overhead and the FLOP rate."""
    for name, ref in REFERENCE.items():
        results[f"reference.{name}"] = ref
    results["reference.recon_error"] = REFERENCE_RECON_ERROR
    ratios = {}
    for name in GOALS:
        if name not in results:
            continue
        ratios[name] = results[name] / _reference_for(name, REFERENCE)
        results[f"ratio.{name}"] = ratios[name]
        results[f"goal.{name}"] = GOALS[name]
    if results.get("matmul_gflops"):
        # A rough correction for a shared machine: our time scaled by the fraction of the
        # unloaded matmul rate this run got. An estimate, not a measurement.
        share = results["matmul_gflops"] / REFERENCE_MATMUL_GFLOPS
        results["machine_share"] = share
        for name, ratio in ratios.items():
            results[f"ratio_load_adjusted.{name}"] = ratio * share
    if "classifier.forward" in results:
        results["ratio.classifier.forward"] = (results["classifier.forward"]
                                               / REFERENCE["classifier.forward"])
    if "density.train" in results:
        for name in ("density.train_logdet", "density.train_logdet_neumann",
                     "density.train_logdet_staged", "density.train_logdet_neumann_staged"):
            if name in results:
                results[f"logdet_overhead.{name.split('.')[1]}"] = (results[name]
                                                                    / results["density.train"])
    rates = [results[k] for k in ("matmul_gflops", "matmul_gflops_at_end") if results.get(k)]
    for name in ("density.train_logdet", "density.train_logdet_two_processes"):
        if results.get(f"{name}.flops") and rates:
            # Against the higher of the run's two matmul measurements (start and end): the
            # matmul rate moves by up to 20% within a run here, and the lower one would
            # flatter the fraction.
            results[f"{name}.fraction_of_matmul_rate"] = (
                results[f"{name}.gflops_per_s"] / max(rates))
    compiles = [v for k, v in results.items() if k.endswith(".compile")]
    if compiles:
        results["max_compile_seconds"] = max(compiles)
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", default="",
                        help="comma-separated keys or groups, e.g. "
                             "density.train,classifier (default: everything)")
    parser.add_argument("--with_step", action="store_true",
                        help="also time the library's whole training step "
                             "(density.train_logdet_step; one more long compile)")
    parser.add_argument("--output", default="", help="also write the JSON to this file")
    parser.add_argument("--reference", default="",
                        help="JSON of benchmarks.reference_torch measured on this machine: "
                             "adds ratio_measured.* (our time over that measurement)")
    parser.add_argument("--allocator", choices=("hugepages", "default"), default="hugepages",
                        help="hugepages: restart once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
                             " where that helps (iresnet_jax.runtime); default: run as started")
    args = parser.parse_args(argv)
    if args.allocator == "hugepages" and argv is None:
        runtime.relaunch_with_hugepages()
    only = [s.strip() for s in args.only.split(",") if s.strip()]

    def wanted(name):
        """Whether ``name`` (a key or a group such as "density") is to be measured."""
        return not only or any(name == o or name.startswith(o + ".")
                               or o.startswith(name + ".") for o in only)

    results = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "machine": platform.machine(), "cpu_count": os.cpu_count(),
               "jax": jax.__version__, "batch": BATCH, "repeats": args.repeats,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
               "optimizer_update_included": False, "allocator": runtime.status()}
    t0 = time.time()
    results["matmul_gflops"] = matmul_gflops()
    print(f"matmul: {results['matmul_gflops']:.1f} GFLOP/s", flush=True)
    if wanted("density"):
        density_benchmarks(results, args.repeats, args.warmup, wanted, args.with_step)
    if wanted("classifier"):
        classifier_benchmarks(results, args.repeats, args.warmup, wanted)
    results["matmul_gflops_at_end"] = matmul_gflops()
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["wall_seconds"] = time.time() - t0
    summarize(results)
    if args.reference:
        with open(args.reference) as f:
            summarize_measured_reference(results, json.load(f))
    report.emit(results, args.output)


if __name__ == "__main__":
    main()
