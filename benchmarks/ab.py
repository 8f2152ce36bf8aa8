"""Interleaved A/B timing of model variants in one process.

This machine's run-to-run spread (10-20% per key between two runs of the same code) hides
most single changes. This script compiles every variant of one ANCHORS.md function in the
same process and times them in interleaved rounds (``--rounds`` rounds of ``--calls``
calls of each variant, the order reversed every other round), so that the variants share
the machine's state; it prints one JSON
object with each variant's compile seconds (trace + lower + compile), median and min
seconds per call, and its median relative to the first variant.

Variants are keyword overrides of the model preset, as JSON objects::

    python -m benchmarks.ab --key classifier.train '{"narrowing": "conv"}' '{"narrowing": "col2im"}'
    python -m benchmarks.ab --key density.train_logdet_neumann '{}' '{"narrowing": "col2im"}'
    python -m benchmarks.ab --key density.train_logdet '{"remat": true}' '{"remat": false}'
    python -m benchmarks.ab --key density.train_logdet '{}' '{"staged": true}'

``"logdet_mode"`` (density training keys) sets the series' ``mode`` (``"split"``, the
default of ``benchmarks.anchor``'s autodiff step; ``"vjp"``, Algorithm 2's single chain;
``"jvp"``)::

    python -m benchmarks.ab --key density.train_logdet '{"logdet_mode": "vjp"}' '{}'

``"staged": true`` (density training keys) times ``train.staged.StagedDensityGrad`` instead
of the jitted gradient (``"staged": "dots"`` or ``"nothing"``: with that ``save``); its
compile seconds are its first call's minus its second call's.

``"compiler_options"`` (an object of XLA debug options and their values, as strings)
compiles that variant's program with them (``Lowered.compile(compiler_options=...)``), so
that XLA settings can be compared in one process on the same model, without
``XLA_FLAGS``::

    python -m benchmarks.ab --key density.forward '{}' \
        '{"compiler_options": {"xla_cpu_max_isa": "AVX2"}}'

Keys (as in ``benchmarks.anchor``): ``density.forward``, ``density.train``,
``density.train_logdet``, ``density.train_logdet_neumann``, ``density.inverse20``,
``density.inverse_tol`` (plain iteration), and the classifier's ``forward``, ``train``,
``inverse20``, ``inverse_tol``. The README's A/B
numbers of 2026-11-29 ("Narrowing convs output-side") were measured this way. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import anchor
from benchmarks.timing import time_first_call
from iresnet_jax import models
from iresnet_jax import runtime
from iresnet_jax.train import staged

KEYS = ("density.forward", "density.train", "density.train_logdet",
        "density.train_logdet_neumann", "density.inverse20", "density.inverse_tol",
        "classifier.forward", "classifier.train", "classifier.inverse20",
        "classifier.inverse_tol")
# The inverses: 20 iterations per block, or to benchmarks.anchor's relative step test.
_INVERSE = {"inverse20": {"inverse_tol": 0.0, "inverse_max_iter": 20},
            "inverse_tol": {"inverse_tol": 0.0, "inverse_rtol": anchor.STEP_RTOL,
                            "inverse_max_iter": 100}}
_LOGDET = {"density.train": anchor.NONE, "density.train_logdet": anchor.SERIES,
           "density.train_logdet_neumann": anchor.NEUMANN}


def build(key: str, overrides: dict, preset: str | None, batch: int,
          shape: tuple[int, ...]):
    """``(fn, args)`` for ``key`` on the preset with ``overrides`` (``"staged": true``:
    ``fn`` is a ``train.staged.StagedDensityGrad``, not to be jitted)."""
    if key not in KEYS:
        raise ValueError(f"unknown key {key!r}; known: {KEYS}")
    overrides = dict(overrides)
    staged_grad = overrides.pop("staged", False)
    logdet_mode = overrides.pop("logdet_mode", None)
    kind, what = key.split(".", 1)
    if staged_grad and key not in _LOGDET:
        raise ValueError(f'"staged" applies to {tuple(_LOGDET)}, not {key!r}')
    if logdet_mode is not None and key not in _LOGDET:
        raise ValueError(f'"logdet_mode" applies to {tuple(_LOGDET)}, not {key!r}')
    cfg = _LOGDET.get(key)
    if logdet_mode is not None:
        cfg = dataclasses.replace(cfg, mode=logdet_mode)
    preset = preset or f"anchors_{kind}"
    _, x, labels = anchor._data(batch, shape)
    if kind == "density":
        model = models.build(preset, **overrides)
        variables = jax.jit(model.init)({"params": jax.random.key(0),
                                         "logdet": jax.random.key(1)}, x)
        plain = model.clone(logdet=anchor.NONE)
        if key == "density.forward":
            return (lambda v, x: plain.apply(v, x)[0]), (variables, x)
        if what in _INVERSE:
            inv = models.build(preset, **{**overrides, "logdet_method": "none",
                                          **_INVERSE[what]})
            z = jax.jit(lambda v, x: plain.apply(v, x)[0])(variables, x)
            return (lambda v, z: inv.apply(v, z, method="inverse")), (variables, z)
        state = {k: v for k, v in variables.items() if k != "params"}
        if staged_grad:
            save = staged_grad if isinstance(staged_grad, str) else "all"
            fn = staged.StagedDensityGrad(model.clone(logdet=cfg),
                                          n_bins=anchor.N_BINS, dim=int(np.prod(shape)),
                                          save=save)
            return fn, (variables["params"], state, x, jax.random.key(2))
        loss = anchor.density_loss(model.clone(logdet=cfg), int(np.prod(shape)))
        return jax.value_and_grad(loss, has_aux=True), (variables["params"], state, x)

    model = models.build(preset, **overrides)
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, x)
    if key == "classifier.forward":
        return (lambda v, x: model.apply(v, x)), (variables, x)
    if what in _INVERSE:
        inv = models.build(preset, **{**overrides, **_INVERSE[what]})
        z = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, x)
        return (lambda v, z: inv.apply(v, z, method="inverse")), (variables, z)
    state = {k: v for k, v in variables.items() if k != "params"}
    return jax.value_and_grad(anchor.classifier_loss(model), has_aux=True), (
        variables["params"], state, x, labels)


def compare(key: str, variants: list[dict], *, rounds: int = 6, calls: int = 3,
            preset: str | None = None, batch: int = 64,
            shape: tuple[int, ...] = (28, 28, 1)) -> dict:
    """Compiles every variant, then times them in interleaved rounds."""
    compiled = []
    results = {"key": key, "rounds": rounds, "calls_per_round": calls, "batch": batch,
               "variants": []}
    for overrides in variants:
        model_overrides = dict(overrides)
        options = model_overrides.pop("compiler_options", None)
        if options is not None:
            if not isinstance(options, dict):
                raise ValueError(f'"compiler_options" must be an object of XLA options, got '
                                 f'{options!r}')
            if overrides.get("staged"):
                raise ValueError('"compiler_options" applies to jitted variants, not to '
                                 '"staged" ones (which compile on their first call)')
        fn, args = build(key, model_overrides, preset, batch, shape)
        if overrides.get("staged"):
            # Compiles on its first call: first call minus a second, steady one.
            c = fn
            compile_s = time_first_call(fn, *args, repeats=1, warmup=1)["compile"]
        else:
            t0 = time.perf_counter()
            c = jax.jit(fn).lower(*args).compile(compiler_options=options)
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(c(*args))
        compiled.append((c, args))
        results["variants"].append({"overrides": overrides, "compile": compile_s})
        print(f"compiled {json.dumps(overrides)} in {compile_s:.1f} s", file=sys.stderr,
              flush=True)
    times = [[] for _ in variants]
    for r in range(rounds):
        # Alternate the order between rounds, so that no variant always runs first.
        order = range(len(compiled)) if r % 2 == 0 else reversed(range(len(compiled)))
        for i in order:
            c, args = compiled[i]
            for _ in range(calls):
                t0 = time.perf_counter()
                jax.block_until_ready(c(*args))
                times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    for entry, ts in zip(results["variants"], times):
        entry.update(median=statistics.median(ts), min=min(ts),
                     median_relative_to_first=statistics.median(ts) / base)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--key", required=True, choices=KEYS)
    parser.add_argument("variants", nargs="+",
                        help="JSON objects of model overrides, e.g. '{\"narrowing\": \"conv\"}'"
                        " (\"compiler_options\": XLA options for that variant's compile)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=3, help="calls per variant per round")
    parser.add_argument("--preset", default=None,
                        help="model preset (default: anchors_density / anchors_classifier)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", default="28,28,1", help="input shape H,W,C")
    args = parser.parse_args(argv)
    if argv is None:
        runtime.relaunch_with_hugepages()
    try:
        variants = [json.loads(v) for v in args.variants]
    except json.JSONDecodeError as e:
        parser.error(f"each variant must be a JSON object of model overrides: {e}")
    if not all(isinstance(v, dict) for v in variants):
        parser.error("each variant must be a JSON object, e.g. '{\"narrowing\": \"conv\"}'")
    shape = tuple(int(s) for s in args.shape.split(","))
    results = compare(args.key, variants, rounds=args.rounds, calls=args.calls,
                      preset=args.preset, batch=args.batch, shape=shape)
    results["allocator"] = runtime.status()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
