"""Smoke tests of the benchmark scripts' building blocks (their numbers are not asserted,
only that they measure what they claim on tiny models)."""

import math

import jax
import numpy as np
import pytest

from benchmarks import accelerator
from iresnet_jax import models


def test_time_train_step_runs_the_library_step_and_reports_memory():
    model = models.build("digits_classifier", stages=(1, 1, 1), hidden=4)
    r = accelerator.time_train_step(model, "classification", 4, (8, 8, 1), repeats=2)
    assert r["batch"] == 4 and r["params"] > 0
    assert math.isfinite(r["loss"]) and r["step_seconds"] > 0
    assert r["examples_per_second"] == 4 / r["step_seconds"]


def test_precision_check_reconstructs_on_cpu_at_both_precisions():
    r = accelerator.precision_check("digits_density", dict(blocks_per_scale=(1, 1, 1),
                                                           hidden=8), 2, (8, 8, 1))
    if jax.default_backend() == "cpu":   # no TF32 on CPU: both precisions are float32
        assert r["default"]["recon_max_abs_error"] < 1e-5
        assert r["log_prob_difference_default_vs_highest"] < 1e-3
    assert r["highest"]["recon_max_abs_error"] < 1e-5
    assert np.isfinite(r["default"]["log_prob_first"])


def test_compile_and_time_splits_the_compile_and_returns_the_output():
    from benchmarks import timing
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    r = timing.compile_and_time(lambda a: jax.numpy.tanh(a) @ a.T, x, repeats=2, warmup=1)
    np.testing.assert_allclose(np.asarray(r["output"]), np.tanh(x) @ x.T, rtol=1e-6)
    assert r["compile_lower"] > 0 and r["compile_xla"] > 0
    assert r["compile_lower"] + r["compile_xla"] == pytest.approx(r["compile"])
    if "compile_cpu" in r:   # where the resource module exists
        assert r["compile_cpu"] > 0
    assert r["median"] >= r["min"] > 0
    assert r["flops"] is None or r["flops"] >= 0


def test_ab_compares_variants_of_one_function_on_a_tiny_model():
    from benchmarks import ab
    small = {"blocks_per_scale": [1, 1, 1], "hidden": 4}
    variants = [{**small, "narrowing": "conv"}, {**small, "narrowing": "col2im"}]
    r = ab.compare("density.inverse20", variants, rounds=1, calls=1,
                   preset="digits_density", batch=2, shape=(8, 8, 1))
    assert [v["overrides"] for v in r["variants"]] == variants
    assert r["variants"][0]["median_relative_to_first"] == 1.0
    assert all(v["median"] > 0 and v["compile"] > 0 for v in r["variants"])
    r = ab.compare("classifier.train", [{"stages": [1, 1, 1], "hidden": 4}], rounds=1,
                   calls=1, preset="digits_classifier", batch=2, shape=(8, 8, 1))
    assert r["variants"][0]["min"] > 0
    # the staged gradient as a variant of the fused one: the same loss (no log-det)
    fused, _ = ab.build("density.train", small, "digits_density", 2, (8, 8, 1))
    staged_fn, args = ab.build("density.train", {**small, "staged": True},
                               "digits_density", 2, (8, 8, 1))
    (loss, _), _ = jax.jit(fused)(*args[:3])
    assert abs(float(staged_fn(*args)[0]) - float(loss)) < 1e-5
    with pytest.raises(ValueError, match='"staged" applies to'):
        ab.build("density.forward", {"staged": True}, "digits_density", 2, (8, 8, 1))
    # the series' mode as a variant: the split default and the single chain, same loss
    fns = [ab.build("density.train_logdet", {**small, **m}, "digits_density", 2, (8, 8, 1))
           for m in ({}, {"logdet_mode": "vjp"})]
    losses = [float(jax.jit(fn)(*args)[0][0]) for fn, args in fns]
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    with pytest.raises(ValueError, match='"logdet_mode" applies to'):
        ab.build("density.forward", {"logdet_mode": "vjp"}, "digits_density", 2, (8, 8, 1))
    with pytest.raises(ValueError, match="split.*gradient='autodiff'"):
        ab.build("density.train_logdet_neumann", {"logdet_mode": "split"},
                 "digits_density", 2, (8, 8, 1))
    # XLA options per variant reach the compiler: an unknown one is XLA's error
    opts = {"compiler_options": {"xla_backend_optimization_level": "1"}}
    r = ab.compare("density.forward", [small, {**small, **opts}], rounds=1, calls=1,
                   preset="digits_density", batch=2, shape=(8, 8, 1))
    assert r["variants"][1]["overrides"] == {**small, **opts}
    with pytest.raises(Exception, match="xla_no_such_option"):
        ab.compare("density.forward", [{**small, "compiler_options": {
            "xla_no_such_option": "1"}}], rounds=1, calls=1, preset="digits_density",
            batch=2, shape=(8, 8, 1))
    with pytest.raises(ValueError, match='not to "staged"'):
        ab.compare("density.train", [{**small, "staged": True, **opts}], rounds=1, calls=1,
                   preset="digits_density", batch=2, shape=(8, 8, 1))


def test_anchor_flop_rate_is_taken_against_the_higher_matmul_rate():
    from benchmarks import anchor
    results = {"density.train_logdet.flops": 9e9, "density.train_logdet.gflops_per_s": 45.0,
               "matmul_gflops": 150.0, "matmul_gflops_at_end": 180.0}
    anchor.summarize(results)
    assert results["density.train_logdet.fraction_of_matmul_rate"] == 45.0 / 180.0
    del results["matmul_gflops_at_end"]
    anchor.summarize(results)
    assert results["density.train_logdet.fraction_of_matmul_rate"] == 45.0 / 150.0


def test_anchor_ratios_to_a_reference_measured_on_this_machine():
    """``benchmarks.anchor --reference FILE``: our time over the measured reference's,
    with the same pairing as the ANCHORS.md ratios (the tolerance inverse against their
    20-iteration inverse, the Neumann step against their 5-term log-det step)."""
    from benchmarks import anchor
    results = {"density.train_logdet": 0.3, "density.train_logdet_neumann": 0.15,
               "density.train_logdet_staged": 0.36,
               "density.inverse_tol": 0.05, "classifier.forward": 0.06}
    measured = {"density.train_logdet": 0.6, "density.inverse20": 0.25,
                "classifier.forward": 0.04, "torch": "2.13.0", "matmul_gflops": 150.0}
    anchor.summarize_measured_reference(results, measured)
    assert results["ratio_measured.density.train_logdet"] == 0.5
    assert results["ratio_measured.density.train_logdet_neumann"] == 0.25
    assert results["ratio_measured.density.train_logdet_staged"] == 0.6
    assert results["ratio_measured.density.inverse_tol"] == 0.2
    assert results["ratio_measured.classifier.forward"] == 1.5
    assert results["reference_measured.torch"] == "2.13.0"
    assert "ratio_measured.density.train" not in results   # neither side has it


def test_reference_torch_names_a_missing_checkout(tmp_path, capsys):
    import pytest
    from benchmarks import reference_torch
    with pytest.raises(SystemExit):
        reference_torch.main(["--repo", str(tmp_path)])
    assert "models/conv_iResNet.py" in capsys.readouterr().err


def test_side_by_side_pairs_keys_as_anchors_md_does():
    from benchmarks import ab, side_by_side
    assert side_by_side._their_key("density.inverse_tol") == "density.inverse20"
    assert side_by_side._their_key("classifier.inverse_tol") == "classifier.inverse20"
    assert side_by_side._their_key("density.train_logdet_neumann") == "density.train_logdet"
    assert side_by_side._their_key("classifier.train") == "classifier.train"
    # Every key it times has a counterpart that benchmarks.reference_torch builds.
    built = {"density.forward", "density.train", "density.train_logdet", "density.inverse20",
             "classifier.forward", "classifier.train", "classifier.inverse20"}
    assert {side_by_side._their_key(k) for k in ab.KEYS} == built


def test_wgrad_batched_kernel_gradients_equal_the_sum_of_separate_ones():
    from benchmarks import wgrad
    r = wgrad.measure(4, 2, 3, repeats=1)
    for name in ("batched", "batched_patches"):
        assert r[name]["max_relative_difference"] < 1e-5
        assert r[name]["compile"] > 0 and r[name]["median"] > 0


def test_gemm_ceiling_reads_every_product_with_the_flops_xla_counts():
    from jax import lax
    from benchmarks import gemm_ceiling

    def f(x, k, a, b, c, d):
        y = lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y, a @ b, jax.numpy.einsum("bij,bjk->bik", c, d)

    shapes = ((2, 6, 6, 3), (3, 3, 3, 5), (4, 7), (7, 2), (3, 4, 5), (3, 5, 6))
    args = [np.ones(s, np.float32) for s in shapes]
    compiled = jax.jit(f).lower(*args).compile()
    found = gemm_ceiling.products(compiled.as_text())
    # the conv: M = 2 * 4 * 4 output pixels, K = 3 * 3 taps * 3 channels, N = 5
    assert sorted(found) == [(1, 4, 7, 2), (1, 32, 27, 5), (3, 4, 5, 6)]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert sum(2 * b * m * k * n for b, m, k, n in found) == cost["flops"]


def test_gemm_ceiling_times_a_tiny_model_step():
    from benchmarks import gemm_ceiling
    r = gemm_ceiling.ceiling("density.train_logdet", calls=1, step_calls=1,
                             overrides={"blocks_per_scale": [1, 1, 1], "hidden": 4},
                             preset="digits_density", batch=2, shape=(8, 8, 1))
    assert r["products"] and all(g["count"] >= 1 and g["best_seconds"] > 0
                                 for g in r["products"])
    assert r["product_flops"] == pytest.approx(sum(
        g["count"] * g["gflop_each"] * 1e9 for g in r["products"]))
    assert r["ceiling_seconds"] > 0 and r["step_seconds"] > 0 and r["matmul_gflops"] > 0


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="two processes need two CPUs")
def test_two_process_gradient_is_the_full_batch_gradient():
    from jax.flatten_util import ravel_pytree
    from benchmarks import ab, processes
    tiny = {"blocks_per_scale": [1, 1, 1], "hidden": 4}
    r = processes.time_data_parallel("density.train", 2, repeats=2, warmup=1,
                                     overrides=tiny, preset="digits_density", batch=4,
                                     shape=(8, 8, 1))
    fn, args = ab.build("density.train", tiny, "digits_density", 4, (8, 8, 1))
    (loss, _), grads = fn(*args)
    full = np.asarray(ravel_pytree((loss, grads))[0])
    np.testing.assert_allclose(r["mean_vector"], full, rtol=2e-5, atol=1e-6)
    assert r["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert r["median"] > 0 and r["compile"] > 0 and len(r["load_seconds"]) == 2
    assert r["flops"] > 0
    with pytest.raises(ValueError, match="training key"):
        processes.time_data_parallel("density.forward", 2)
    with pytest.raises(ValueError, match="dividing the batch"):
        processes.time_data_parallel("density.train", 3, batch=4)


def test_krylov_bound_has_its_known_values():
    from benchmarks.inverse_bound import iterations_to, krylov_errors, plain_errors
    # J = rho * cyclic shift: eigenvalues fill a circle, where (-J)^k is nearly optimal;
    # from e0 = e_1 the best degree-k error is exactly (sum_{j<=k} rho^(-2j))^(-1/2).
    n, rho = 64, 0.5
    jac = rho * np.roll(np.eye(n), 1, axis=0)
    e0 = np.eye(n)[0]
    np.testing.assert_allclose(plain_errors(jac, e0, 10), rho ** np.arange(11), rtol=1e-12)
    expected = [sum(rho ** (-2.0 * j) for j in range(k + 1)) ** -0.5 for k in range(11)]
    np.testing.assert_allclose(krylov_errors(jac, e0, 10), expected, rtol=1e-10)
    # symmetric J with spectrum in [0, 0.9]: Krylov (Chebyshev-like) needs far fewer steps
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    jac = q @ np.diag(rng.uniform(0.0, 0.9, 200)) @ q.T
    e0 = rng.normal(size=200)
    plain, krylov = plain_errors(jac, e0, 150), krylov_errors(jac, e0, 150)
    threshold = 1e-6 * np.linalg.norm(e0)
    assert iterations_to(plain, threshold) > 80 and iterations_to(krylov, threshold) <= 12
    # the Krylov optimum is never worse than the plain iteration (whose iterate it contains)
    jac = 0.3 * rng.normal(size=(50, 50)) / np.sqrt(50)
    e0 = rng.normal(size=50)
    assert np.all(krylov_errors(jac, e0, 20) <= plain_errors(jac, e0, 20) * (1 + 1e-12))
    assert iterations_to(np.array([1.0, 0.5]), 0.1) is None


def test_block_jacobians_records_the_branch_jacobian_at_the_solution():
    import flax.linen as nn
    import jax.numpy as jnp
    from benchmarks.inverse_bound import analyse, block_jacobians
    from iresnet_jax import inverse as inverse_lib

    w = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32) * 0.2

    def g(x):
        return 0.5 * jnp.tanh(x @ w)

    class OneBlock(nn.Module):
        def __call__(self, x):
            return x + g(x)

        def inverse(self, y):
            return inverse_lib.fixed_point(g, y, tol=0.0, rtol=1e-6, max_iter=50)[0]

    model = OneBlock()
    x_true = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    y = model.apply({}, x_true)
    (rec,) = block_jacobians(model, {}, y, example=1)
    x = rec["x"]
    np.testing.assert_allclose(x, x_true[1], atol=1e-5)
    expected = 0.5 * (1 - np.tanh(x @ w) ** 2)[:, None] * w.T   # d g_i / d x_j
    np.testing.assert_allclose(rec["jacobian"], expected, rtol=1e-5, atol=1e-6)
    (row,) = analyse([rec], rtol=1e-6, k_max=30, eig=True)
    assert row["sigma_max"] == pytest.approx(np.linalg.norm(expected, 2), rel=1e-5)
    assert row["spectral_radius"] <= row["sigma_max"] + 1e-12
    assert row["krylov_iterations"] <= row["plain_iterations"] <= 30
    assert 1 <= row["measured_iterations"] <= 50


def test_block_jacobians_visits_every_block_of_a_model():
    from benchmarks.inverse_bound import analyse, block_jacobians
    model = models.build("digits_classifier", stages=(1, 2, 1), hidden=4, unroll=2,
                         inverse_tol=0.0, inverse_rtol=1e-6)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    variables = model.init(jax.random.key(1), x)
    z = model.apply(variables, x, method="features")
    rows = analyse(block_jacobians(model, variables, z), rtol=1e-6, k_max=20, eig=False)
    assert [r["dim"] for r in rows] == [4 * 4 * 16, 4 * 4 * 16, 4 * 4 * 16, 8 * 8 * 4]
    for r in rows:   # each conv normalized to <= 0.9, ELU 1-Lipschitz
        assert 0 < r["sigma_max"] <= 0.9 ** 3 + 1e-5
        assert r["krylov_iterations"] <= r["plain_iterations"] <= 20
