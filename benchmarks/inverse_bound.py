"""How many fixed-point iterations could *any* accelerated inverse save at ANCHORS.md?

The tolerance inverse of the ANCHORS.md models (``python -m benchmarks.anchor``) needs
about six plain iterations per block to reach a relative step of 1e-6. Acceleration
(Anderson, GMRES, Chebyshev, any polynomial method) builds its k-th iterate from the
first k evaluations of ``g``; for the problem linearized at the solution,
``(I + J) x = b`` with ``J`` the branch's Jacobian, every such iterate lies in
``x0 + K_k(I + J, r0)`` (the Krylov space of the residual; Anderson with a memory of at
least k is equivalent to GMRES there: Walker & Ni, 2011). The smallest error over that
space is therefore a lower bound on what any of them can reach after k evaluations.

For each block of the two ANCHORS.md models at initialization (batch 64 MNIST-shaped
inputs, as in ``benchmarks.anchor``), for one example, this script computes the dense
Jacobian of the branch at the solution, and in float64:

* ``sigma_max``: its largest singular value (``Lip`` bound used by the theory);
* ``spectral_radius`` (with ``--eig``): the plain iteration's asymptotic rate;
* ``plain_iterations``: k with ``|e_k|_2 <= rtol |x|_2`` for the plain iteration on the
  linearized problem (``e_k = (-J)^k e_0``, ``e_0 = y - x``);
* ``krylov_iterations``: the same threshold for the optimal Krylov iterate (the bound);
* ``measured_iterations``: the model's own nonlinear iteration count for that example
  (step test ``max|x^k - x^{k-1}| <= rtol max|x^k|``, as the benchmark times it).

If ``krylov_iterations`` is close to ``plain_iterations``, no accelerator that evaluates
``g`` once per iteration can make the tolerance inverse much faster than the plain
iteration. At initialization the spectrum of ``J`` is spread around 0 in every
direction (for a disk, ``z^k`` is the optimal polynomial), which is why.

    python -m benchmarks.inverse_bound              # both models, every block
    python -m benchmarks.inverse_bound --eig        # + spectral radii (slower)
    python -m benchmarks.inverse_bound --workdir=DIR  # a trained model (experiments/train.py)

Prints one JSON object; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax import analysis
from iresnet_jax import inverse as inverse_lib
from iresnet_jax import models


def plain_errors(jac: np.ndarray, e0: np.ndarray, k_max: int) -> np.ndarray:
    """2-norms of the plain iteration's errors ``(-J)^k e0``, ``k = 0..k_max``."""
    e = np.asarray(e0, np.float64)
    out = [np.linalg.norm(e)]
    for _ in range(k_max):
        e = -(jac @ e)
        out.append(np.linalg.norm(e))
    return np.asarray(out)


def krylov_errors(jac: np.ndarray, e0: np.ndarray, k_max: int) -> np.ndarray:
    """Smallest 2-norm error over ``x0 + K_k(I + J, r0)``, ``k = 0..k_max``.

    With ``A = I + J`` and initial error ``e0 = x0 - x``, the residual is ``r0 = -A e0``
    and a Krylov iterate's error is ``e0 + z`` with ``z`` in ``span{A e0, ..., A^k e0}``;
    the smallest one is ``e0``'s distance to that space (Arnoldi basis, float64, with
    reorthogonalization). Stops early (constant afterwards) once the space is invariant.
    """
    a = np.eye(jac.shape[0]) + np.asarray(jac, np.float64)
    e0 = np.asarray(e0, np.float64)
    basis = []
    out = [np.linalg.norm(e0)]
    v = a @ e0
    for _ in range(k_max):
        for _ in range(2):   # Gram-Schmidt twice: orthogonal to machine precision
            for q in basis:
                v = v - (q @ v) * q
        norm = np.linalg.norm(v)
        if norm <= 1e-14 * max(out[0], 1e-300):
            out.extend([out[-1]] * (k_max + 1 - len(out)))
            break
        q = v / norm
        basis.append(q)
        q_mat = np.stack(basis, axis=1)
        out.append(np.linalg.norm(e0 - q_mat @ (q_mat.T @ e0)))
        v = a @ q
    return np.asarray(out)


def iterations_to(errors: np.ndarray, threshold: float) -> int | None:
    """The first k with ``errors[k] <= threshold``, or ``None``."""
    hits = np.flatnonzero(np.asarray(errors) <= threshold)
    return int(hits[0]) if hits.size else None


def block_jacobians(model, variables, inputs, *, example: int = 0) -> list[dict]:
    """Runs ``model``'s inverse on ``inputs`` and, for every residual block, returns the
    dense Jacobian of its branch at the solution for one example, with that example's
    ``y``, ``x`` and measured iteration count (blocks in the order the inverse visits
    them: last block first)."""
    records = []
    original = inverse_lib.fixed_point

    def record(jac, y, x, iterations):
        records.append({"jacobian": np.asarray(jac, np.float64),
                        "y": np.asarray(y, np.float64).ravel(),
                        "x": np.asarray(x, np.float64).ravel(),
                        "measured_iterations": int(iterations)})

    def spy(g, y, **kwargs):
        x, info = original(g, y, **kwargs)
        x0 = x[example]
        flat = lambda v: g(v.reshape((1,) + x0.shape)).reshape(-1)
        jac = jax.jacfwd(flat)(x0.reshape(-1))
        jax.debug.callback(record, jac, y[example], x0, info.iterations[example],
                           ordered=True)
        return x, info

    inverse_lib.fixed_point = spy
    try:
        out = model.apply(variables, inputs, method="inverse")
        jax.block_until_ready(out)
        jax.effects_barrier()
    finally:
        inverse_lib.fixed_point = original
    return records


def analyse(records: list[dict], rtol: float, k_max: int, eig: bool) -> list[dict]:
    rows = []
    for i, r in enumerate(records):
        jac, x, y = r["jacobian"], r["x"], r["y"]
        e0 = y - x
        threshold = rtol * np.linalg.norm(x)
        plain, krylov = plain_errors(jac, e0, k_max), krylov_errors(jac, e0, k_max)
        row = {"block": i, "dim": int(x.size),
               "sigma_max": float(np.linalg.norm(jac, 2)),
               "initial_relative_error": float(np.linalg.norm(e0) / np.linalg.norm(x)),
               "measured_iterations": r["measured_iterations"],
               "plain_iterations": iterations_to(plain, threshold),
               "krylov_iterations": iterations_to(krylov, threshold),
               "plain_relative_errors": (plain / np.linalg.norm(x)).tolist(),
               "krylov_relative_errors": (krylov / np.linalg.norm(x)).tolist()}
        if eig:
            row["spectral_radius"] = float(np.max(np.abs(np.linalg.eigvals(jac))))
        rows.append(row)
    return rows


def _inputs(preset: str, variables, model, x):
    if preset == "anchors_classifier":
        return jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, x)
    return jax.jit(lambda v, x: model.apply(v, x)[0])(variables, x)


def _with_tolerance(model, rtol: float):
    """``model`` with the tolerance inverse of ``benchmarks.anchor`` (relative step test,
    at most 100 iterations)."""
    return analysis._with_inverse(model, 0.0, 100, rtol=rtol)


def _summary(rows: list[dict], eig: bool) -> dict:
    summary = {key: float(np.mean([r[key] for r in rows]))
               for key in ("measured_iterations", "plain_iterations", "krylov_iterations",
                           "sigma_max")
               if all(r[key] is not None for r in rows)}
    if eig:
        summary["spectral_radius"] = float(np.mean([r["spectral_radius"] for r in rows]))
    return summary


def run(presets=("anchors_classifier", "anchors_density"), *, rtol: float = 1e-6,
        k_max: int = 12, eig: bool = False, batch: int = 64) -> dict:
    """The bound for the ANCHORS.md models at initialization (the benchmark's inputs)."""
    from benchmarks import anchor
    _, x, _ = anchor._data(batch=batch)
    results = {"rtol": rtol, "models": {}}
    for preset in presets:
        kw = {"logdet_method": "none"} if preset == "anchors_density" else {}
        model = _with_tolerance(models.build(preset, **kw), rtol)
        rngs = {"params": jax.random.key(0), "logdet": jax.random.key(1)}
        variables = jax.jit(model.init)(rngs, x)
        rows = analyse(block_jacobians(model, variables, _inputs(preset, variables, model, x)),
                       rtol, k_max, eig)
        summary = _summary(rows, eig)
        results["models"][preset] = {"blocks": rows, "mean": summary}
        print(preset, json.dumps(summary), flush=True)
    return results


def run_trained(workdir: str, *, rtol: float = 1e-6, k_max: int = 12, eig: bool = False,
                batch: int = 64) -> dict:
    """The bound for a model trained by ``experiments/train.py`` (its latest checkpoint),
    on the first ``batch`` test images."""
    t = analysis.load_workdir(workdir)
    model = _with_tolerance(t.model, rtol)
    x = jnp.asarray(t.test_inputs(batch))
    z = jax.jit(analysis._forward(t, model))(t.variables, x)
    rows = analyse(block_jacobians(model, t.variables, z), rtol, k_max, eig)
    summary = _summary(rows, eig)
    print(t.name, json.dumps(summary), flush=True)
    return {"rtol": rtol, "models": {workdir: {"name": t.name, "step": t.step,
                                               "blocks": rows, "mean": summary}}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="anchors_classifier,anchors_density")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--k_max", type=int, default=12)
    parser.add_argument("--eig", action="store_true", help="also the spectral radii")
    parser.add_argument("--workdir", default=None,
                        help="a model trained by experiments/train.py instead of the "
                             "ANCHORS.md models at initialization")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.workdir:
        results = run_trained(args.workdir, rtol=args.rtol, k_max=args.k_max, eig=args.eig)
    else:
        results = run(tuple(args.presets.split(",")), rtol=args.rtol, k_max=args.k_max,
                      eig=args.eig)
    results["machine"] = platform.processor() or platform.machine()
    text = json.dumps(results)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
