"""Our times at the reference configuration (docs/reference.md), against the official code's.

Builds the two models of ``experiments/configs/anchors_density.py`` (51,680 parameters)
and ``anchors_classifier.py`` (214,650) at batch 64 on MNIST-shaped inputs (28x28x1) and
times, as the median of ``--repeats`` calls after ``--warmup`` (seconds per call, with
``*.min`` and the compile seconds ``*.compile``):

* ``density.forward``: evaluation forward to the latent (no log-det);
* ``density.train``: training forward + backward without the log-det;
* ``density.train_logdet``: the same with the 5-term power series (one Gaussian probe,
  ``mode="auto"``: the powers taken from both ends, gradient by autodiff), loss = mean
  bits/dim; ``density.train_logdet_neumann``: with the Neumann-series gradient;
* ``density.inverse20``: the inverse with 20 fixed-point iterations per block;
* ``density.inverse_tol``: the inverse to a max reconstruction error of 1e-6 with a
  convergence test, the faster of the plain iteration and Anderson acceleration (both
  kept: ``*.inverse_tol_plain``, ``*.inverse_tol_anderson``); the inverses also give their
  ``*.recon_error`` and ``*.iterations_per_block``;
* the classifier's ``forward``, ``train`` (cross-entropy), ``inverse20``, ``inverse_tol``.

A training step is the training forward (5 power iterations per spectrally normalized
conv and their state update, BatchNorm statistics), the loss and the gradient; the
optimizer update is not included, as in the official code's timings.

Also: the float32 1024x1024 matmul rate through XLA at the start and the end of the run,
XLA's FLOP count of each step (``*.flops``, ``*.gflops_per_s``) and the log-det step's
FLOP rate as a fraction of the higher matmul rate, the log-det overhead, the official
code's times (``benchmarks/reference.json``: ``reference.*``) and our ratios to them
(``ratio.*``) with the goals (``goal.*``). With ``--reference FILE`` (the JSON of
``python -m benchmarks.reference_torch``, the official code timed on this machine) the
ratios to that measurement are added as ``ratio_measured.*``: the comparison
docs/reference.md asks for.

    python -m benchmarks.anchor                       # everything (a few minutes)
    python -m benchmarks.anchor --only density.train_logdet,classifier
    python -m benchmarks.anchor --reference benchmarks/results/reference_torch.json

Writes ``benchmarks/results/anchor.json`` (``--tiny``: tiny models at 8x8 inputs, a smoke
test of this script, written as ``anchor_tiny.json``). Nothing is asserted.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from experiments.configs import anchors_classifier, anchors_density
from iresnet_jax import distributions, models
from iresnet_jax.inverse import InverseConfig
from iresnet_jax.logdet import LogDetConfig

BATCH = 64
SHAPE = (28, 28, 1)
N_BINS = 256
TINY = {"batch": 4, "shape": (8, 8, 1),
        "density": dict(blocks_per_scale=(1, 1, 1), hidden=4),
        "classifier": dict(stages=(1, 1, 1), hidden=4)}

REFERENCE = common.REFERENCE["seconds"]
GOALS = common.REFERENCE["goals"]   # fractions of the official code's time

KEYS = ("density.forward", "density.train", "density.train_logdet",
        "density.train_logdet_neumann", "density.inverse20", "density.inverse_tol_plain",
        "density.inverse_tol_anderson", "classifier.forward", "classifier.train",
        "classifier.inverse20", "classifier.inverse_tol_plain",
        "classifier.inverse_tol_anderson")

LOGDET = {"train": LogDetConfig("none"),
          "train_logdet": LogDetConfig("series", n_terms=5, mode="auto"),
          "train_logdet_neumann": LogDetConfig("series", n_terms=5, mode="auto",
                                               gradient="neumann")}
# The tolerance inverses stop each example once its step is below 1e-6 of its own size:
# that keeps the max reconstruction error under 1e-6 for both models and adapts to the
# classifier's larger features, where an absolute step of 1e-6 is below float32 resolution.
STEP_RTOL = 1e-6
INVERSE = {"inverse20": InverseConfig(tol=0.0, max_iter=20),
           "inverse_tol_plain": InverseConfig(tol=0.0, rtol=STEP_RTOL, max_iter=100),
           "inverse_tol_anderson": InverseConfig(tol=0.0, rtol=STEP_RTOL, max_iter=100,
                                                 method="anderson")}


def density_loss(model, dim: int):
    """``(params, state, x) -> (mean bits/dim, new spectral state)``: what a density
    training step differentiates (log-det probes from a fixed key)."""
    rngs = {"logdet": jax.random.key(2)}

    def loss(params, state, x):
        log_prob, new_state = model.apply(
            {"params": params, **state}, x, train=True, mutable=["spectral"],
            rngs=rngs, method="log_prob")
        return jnp.mean(distributions.bits_per_dim(log_prob, dim, N_BINS)), new_state

    return loss


def classifier_loss(model):
    """``(params, state, x, labels) -> (mean cross-entropy, new state)``."""
    def loss(params, state, x, labels):
        logits, new_state = model.apply({"params": params, **state}, x, train=True,
                                        mutable=["spectral", "batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.mean(ce), new_state

    return loss


@functools.lru_cache(maxsize=2)
def _setup(kind: str, tiny: bool):
    """The model of the reference configuration, its variables and the inputs."""
    batch, shape = (TINY["batch"], TINY["shape"]) if tiny else (BATCH, SHAPE)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, N_BINS, (batch,) + shape).astype(np.float32)
    x = distributions.dequantize(jax.random.key(7), jnp.asarray(pixels), N_BINS)
    labels = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)
    overrides = TINY[kind] if tiny else {}
    if kind == "density":
        model = models.build(anchors_density.get_config().model, input_shape=shape,
                             **overrides)
    else:
        model = models.build(anchors_classifier.get_config().model, num_classes=10,
                             **overrides)
    variables = jax.jit(model.init)({"params": jax.random.key(0),
                                     "logdet": jax.random.key(1)}, x)
    return model, variables, x, labels


def _iterations_per_block(intermediates) -> float:
    """Mean over blocks of the largest per-example iteration count."""
    per_block = []
    for path, a in jax.tree_util.tree_leaves_with_path(intermediates):
        if "inverse_iterations" in jax.tree_util.keystr(path):
            a = np.asarray(a)
            a = a.reshape((-1, a.shape[-1])) if a.ndim > 1 else a[None]
            per_block.extend(a.max(axis=-1).tolist())
    return float(np.mean(per_block)) if per_block else float("nan")


def build(key: str, *, tiny: bool = False):
    """``(fn, args, extras)`` for a key of ``KEYS``: ``jax.jit(fn)(*args)`` is what is
    timed, ``extras(output)`` what is recorded beside the time (or ``None``)."""
    if key not in KEYS:
        raise ValueError(f"unknown key {key!r}; known: {', '.join(KEYS)}")
    kind, what = key.split(".", 1)
    model, variables, x, labels = _setup(kind, tiny)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    if kind == "density":
        plain = model.clone(logdet=LOGDET["train"])
        forward = lambda v, x: plain.apply(v, x)[0]  # noqa: E731
        encode = forward
    else:
        plain = model
        forward = lambda v, x: model.apply(v, x)  # noqa: E731
        encode = lambda v, x: model.apply(v, x, method="features")  # noqa: E731
    if what == "forward":
        return forward, (variables, x), None
    if what.startswith("train"):
        if kind == "density":
            loss = density_loss(model.clone(logdet=LOGDET[what]), int(np.prod(x.shape[1:])))
            fargs = (params, state, x)
        else:
            loss, fargs = classifier_loss(model), (params, state, x, labels)
        return (jax.value_and_grad(loss, has_aux=True), fargs,
                lambda out: {"loss": float(out[0][0])})
    inverse = plain.clone(inverse_config=INVERSE[what])
    z = jax.jit(encode)(variables, x)

    def invert(v, z):
        return inverse.apply(v, z, method="inverse", mutable=["intermediates"])

    return invert, (variables, z), lambda out: {
        "recon_error": float(jnp.max(jnp.abs(out[0] - x))),
        "iterations_per_block": _iterations_per_block(out[1])}


def select(only: list[str]) -> list[str]:
    """The keys that ``--only`` names: keys, groups (``density``, ``classifier``) or
    ``<kind>.inverse_tol`` (both of its methods)."""
    def named(k, o):
        return o in (k, k.split(".")[0], k.removesuffix("_plain").removesuffix("_anderson"))

    return [k for k in KEYS if not only or any(named(k, o) for o in only)]


def measure(keys, *, repeats: int, warmup: int, tiny: bool = False) -> dict:
    """Times ``keys``; also the parameter counts and the best tolerance inverse."""
    results: dict = {}
    for key in keys:
        fn, args, extras = build(key, tiny=tiny)
        r = common.compile_and_time(fn, *args, repeats=repeats, warmup=warmup)
        results[key] = r["median"]
        for field in ("min", "compile", "compile_lower", "compile_xla", "compile_cpu",
                      "flops"):
            if r.get(field) is not None:
                results[f"{key}.{field}"] = r[field]
        if r["flops"]:
            results[f"{key}.gflops_per_s"] = r["flops"] / r["median"] / 1e9
        for field, value in (extras(r["output"]) if extras else {}).items():
            results[f"{key}.{field}"] = value
        print(f"{key}: {r['median']:.4f} s (min {r['min']:.4f}, compile "
              f"{r['compile']:.1f} s)", file=sys.stderr, flush=True)
    for kind in ("density", "classifier"):
        if any(k.startswith(kind) for k in keys):
            results[f"{kind}.num_params"] = models.count_params(_setup(kind, tiny)[1]["params"])
        methods = [m for m in ("plain", "anderson") if f"{kind}.inverse_tol_{m}" in results]
        if methods:
            best = min(methods, key=lambda m: results[f"{kind}.inverse_tol_{m}"])
            name = f"{kind}.inverse_tol"
            results[name] = results[f"{name}_{best}"]
            results[f"{name}.method"] = best
            for field in ("min", "compile", "recon_error", "iterations_per_block"):
                results[f"{name}.{field}"] = results[f"{name}_{best}.{field}"]
    return results


def summarize(results: dict) -> None:
    """Adds the official code's times, our ratios and the goals, the log-det overhead,
    the FLOP rate against the higher matmul rate and the longest compile."""
    for name, seconds in REFERENCE.items():
        results[f"reference.{name}"] = seconds
    results["reference.recon_error"] = common.REFERENCE["recon_error_after_20_iterations"]
    for name in list(GOALS) + ["classifier.forward"]:
        if name in results:
            results[f"ratio.{name}"] = results[name] / REFERENCE[common.reference_key(name)]
            if name in GOALS:
                results[f"goal.{name}"] = GOALS[name]
    if "density.train" in results:
        for name in ("train_logdet", "train_logdet_neumann"):
            if f"density.{name}" in results:
                results[f"logdet_overhead.{name}"] = (results[f"density.{name}"]
                                                      / results["density.train"])
    rates = [results[k] for k in ("matmul_gflops", "matmul_gflops_at_end") if results.get(k)]
    if rates:
        # Against the higher of the run's two measurements: the matmul rate moves within a
        # run, and the lower one would flatter the fraction.
        results["machine_share"] = max(rates) / common.REFERENCE["matmul_gflops"]
        if results.get("density.train_logdet.gflops_per_s"):
            results["density.train_logdet.fraction_of_matmul_rate"] = (
                results["density.train_logdet.gflops_per_s"] / max(rates))
    compiles = [v for k, v in results.items() if k.endswith(".compile")]
    if compiles:
        results["max_compile_seconds"] = max(compiles)


def summarize_measured_reference(results: dict, measured: dict) -> None:
    """Ratios to the official code timed on this machine (``benchmarks.reference_torch``'s
    results): ``reference_measured.*`` and ``ratio_measured.*``."""
    for name in list(REFERENCE) + ["torch", "threads", "matmul_gflops"]:
        if name in measured:
            results[f"reference_measured.{name}"] = measured[name]
    for name in list(GOALS) + ["classifier.forward"]:
        ref = measured.get(common.reference_key(name))
        if name in results and ref:
            results[f"ratio_measured.{name}"] = results[name] / ref


def main(argv=None) -> dict:
    common.setup(argv)
    parser = common.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", default="",
                        help="comma-separated keys or groups, e.g. density.train,classifier "
                             "(default: everything)")
    parser.add_argument("--reference", default="",
                        help="results of benchmarks.reference_torch on this machine: adds "
                             "ratio_measured.* (our time over that measurement)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models at 8x8 inputs (a smoke test, not a measurement)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [o for o in only if not select([o])]
    if unknown:
        parser.error(f"--only names no key in {unknown}; known: {', '.join(KEYS)}")
    keys = select(only)
    results = {"batch": TINY["batch"] if args.tiny else BATCH, "repeats": args.repeats,
               "warmup": args.warmup, "tiny": args.tiny, "optimizer_update_included": False,
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
               "matmul_gflops": common.matmul_gflops()}
    results.update(measure(keys, repeats=args.repeats, warmup=args.warmup, tiny=args.tiny))
    results["matmul_gflops_at_end"] = common.matmul_gflops()
    results["conv"] = {kind: _setup(kind, args.tiny)[0].conv
                       for kind in ("density", "classifier") if f"{kind}.num_params" in results}
    summarize(results)
    if args.reference:
        with open(args.reference) as f:
            measured = json.load(f)
        summarize_measured_reference(results, measured.get("results", measured))
        results["reference_measured.timestamp_utc"] = measured.get("timestamp_utc")
    common.write("anchor_tiny" if args.tiny else "anchor", results, common.command(
        "anchor", argv), args.results_dir)
    return results


if __name__ == "__main__":
    main()
