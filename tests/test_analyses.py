"""The paper's analyses (the ``experiments.analyses`` package) at tiny settings.

Each analysis runs end to end through ``analyses.run`` and writes its files. Tiny models
(one block per stage, 4 channels) are shared by module-scoped fixtures; the classifiers are
analyzed as initialized (compiling their train steps would dominate the test time), the
density model is trained for one step. The tests are ordered so that pytest-xdist's first
chunks (two tests per worker) give the classifier tests to one worker and the density tests
to the other, so that each fixture is built once.
"""

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import analyses
from iresnet_jax import conv, logdet

COEFF = 0.9


def _settings():
    s = analyses.get_settings(True)
    s.classifier_model = dict(stages=(1, 1, 1), hidden=4)
    s.density_model = dict(blocks_per_scale=(1, 1, 1), hidden=4, logdet=dict(n_terms=2))
    s.coeffs = (COEFF,)
    s.sv_power_iter = 300
    s.recon_images = 8
    s.convergence_images = 8
    s.convergence_iterations = (1, 2, 5, 20, 100)
    s.bias_examples = 12
    s.bias_probes = 8
    s.bias_max_terms = 12
    s.runtime = dict(shape=(4, 4, 4), batch=4, n_blocks=1, hidden=4, repeats=2)
    s.samples = 8
    return s


@pytest.fixture(scope="module")
def classifiers():
    s = _settings()
    return analyses.get_models(["vanilla", "batchnorm", f"c={COEFF:g}"], s, train_steps=0,
                               print_fn=lambda line: None)


@pytest.fixture(scope="module")
def density():
    s = _settings()
    lines = []
    m = analyses.get_models(["density"], s, train_steps=1, print_fn=lines.append)
    assert m["density"].step == 1 and any("1 steps" in line for line in lines)
    return m


def _files(workdir, *names):
    for name in names:
        path = os.path.join(workdir, name)
        assert os.path.getsize(path) > 0, name
        if name.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_singular_values(classifiers, tmp_path):
    s = _settings()
    out = analyses.run(str(tmp_path), s, only=["singular_values"], models=classifiers,
                       print_fn=lambda line: None)
    _files(tmp_path, "singular_values.png", "singular_values.csv", "summary.json")
    with open(tmp_path / "singular_values.csv") as f:
        all_rows = list(csv.DictReader(f))
    rows = [r for r in all_rows if r["model"] == f"c={COEFF:g}"]
    assert len(rows) == 9                              # 3 blocks x 3 convs
    assert int(rows[0]["power_iterations"]) == 300
    assert out["singular_values"]["c=0.9"]["layers"] == 9
    assert out["singular_values"]["batchnorm"]["layers"] == 9
    t = classifiers[f"c={COEFF:g}"]
    layers = analyses.conv_layers(t.model, t.variables, t.test_inputs(1))
    with jax.enable_x64(True):
        for row, layer in zip(rows, layers):
            k = jnp.asarray(layer.kernel, jnp.float64)
            zero = np.linalg.norm(np.asarray(conv.conv_dense_matrix(
                k, layer.spatial_shape, padding="SAME")), 2)
            circ = np.linalg.norm(np.asarray(conv.conv_dense_matrix(
                k, layer.spatial_shape, padding="CIRCULAR")), 2)
            # FFT = circular operator, power iteration = the zero-padded operator the
            # model applies, which spectral normalization keeps at (about) c or below.
            assert row["path"] == layer.path
            assert float(row["fft"]) == pytest.approx(circ, rel=1e-4)
            assert float(row["power"]) == pytest.approx(zero, rel=2e-2)
            assert float(row["fft_zero_padding_bound"]) >= zero * (1 - 1e-5)
            assert zero <= COEFF * 1.05   # sigma from 20 power iterations at init
    # The unconstrained baseline at initialization has conv norms above 1.
    assert max(float(r["fft"]) for r in all_rows if r["model"] == "vanilla") > 1.0
    assert out["singular_values"]["vanilla"]["max_fft"] == pytest.approx(
        max(float(r["fft"]) for r in all_rows if r["model"] == "vanilla"))


def test_reconstructions_and_convergence(classifiers, tmp_path):
    s = _settings()
    out = analyses.run(str(tmp_path), s, only=["reconstructions", "convergence"],
                       models=classifiers, print_fn=lambda line: None)
    _files(tmp_path, "reconstructions.png", "reconstructions.json",
           "fixed_point_convergence.png", "fixed_point_convergence.csv")
    with open(tmp_path / "reconstructions.json") as f:
        recon = {r["model"]: r for r in json.load(f)}
    assert set(recon) == {"c=0.9", "vanilla", "batchnorm"}
    assert recon["c=0.9"]["max_error"] < 1e-4
    assert out["reconstructions"]["c=0.9"]["mean_error"] <= recon["c=0.9"]["max_error"]
    inverse = recon["c=0.9"]["inverse"]    # the inverse's own report: every example counted
    assert inverse["examples"] == s.recon_images
    assert 1 <= inverse["max_iterations"] <= s.recon_iterations
    assert 0 <= inverse["not_converged"] <= s.recon_images and inverse["worst_residual"] < 1e-3
    with open(tmp_path / "fixed_point_convergence.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iterations"]) for r in rows] == [1, 2, 5, 20, 100]
    errs = [float(r["max_error"]) for r in rows]
    assert errs[0] > 1e-3 > errs[-1]
    assert all(b <= a * 1.01 + 1e-6 for a, b in zip(errs, errs[1:]))
    # 100 traced iterations per block reproduce the model's own 100-iteration inverse
    # (the same 8 images).
    assert errs[-1] == pytest.approx(recon["c=0.9"]["max_error"], abs=1e-6)
    assert out["convergence"]["c=0.9"]["iterations"] == 100
    assert all(float(r["seconds_per_batch"]) > 0 for r in rows)


def test_logdet_bias(density, tmp_path):
    s = _settings()
    out = analyses.run(str(tmp_path), s, only=["logdet_bias"], models=density,
                       print_fn=lambda line: None)
    _files(tmp_path, "logdet_bias.png", "logdet_bias.json")
    with open(tmp_path / "logdet_bias.json") as f:
        r = json.load(f)
    n = s.bias_max_terms
    assert r["examples"] == 12 and r["blocks"] == 3 and len(r["terms"]) == n
    # The n-term series never misses the exact value by more than Theorem 3 allows, and
    # its error shrinks with n.
    for err, bound in zip(r["series_max_abs_error"], r["theorem3_bound"]):
        assert err <= bound * (1 + 1e-4) + 1e-5
    assert abs(r["series_bias"][-1]) < abs(r["series_bias"][0])
    assert abs(r["series_bias"][-1]) < 1e-3
    # Hutchinson: the mean error is the series' bias up to the Monte Carlo error.
    se = np.asarray(r["estimate_std"]) / math.sqrt(12 * 8)
    assert np.all(np.abs(np.asarray(r["estimate_bias"]) - r["series_bias"]) < 5 * se + 1e-4)
    assert out["logdet_bias"]["examples"] == 12
    # The exact log-dets of the residual blocks, plus ActNorm's, equal slogdet of the dense
    # Jacobian of the whole flow x -> z.
    t = density["density"]
    plain = t.model.clone(logdet=logdet.LogDetConfig("none"))
    x = jnp.asarray(t.test_inputs(12))
    actnorm = jax.jit(lambda v, x: plain.apply(v, x)[1])(t.variables, x)

    def flat(v, xi):
        return plain.apply(v, xi[None])[0][0]

    jac = jax.jit(jax.vmap(jax.jacfwd(flat, argnums=1), in_axes=(None, 0)))(t.variables, x)
    full = np.linalg.slogdet(np.asarray(jac, np.float64).reshape(12, 64, 64))[1]
    np.testing.assert_allclose(np.asarray(r["exact"]) + np.asarray(actnorm), full,
                               rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(r["exact"]) > 1e-2)        # the residual blocks contribute


def test_samples(density, tmp_path):
    lines = []
    out = analyses.run(str(tmp_path), _settings(), only=["samples"], models=density,
                       print_fn=lines.append)
    _files(tmp_path, "samples.png", "samples.json", "samples.npy")
    x = np.load(tmp_path / "samples.npy")
    assert x.shape == (8, 8, 8, 1) and np.all(np.isfinite(x))
    inverse = out["samples"]["inverse"]
    assert inverse["examples"] == 8 and 0 <= inverse["not_converged"] <= 8
    said = (f"samples: inverse: worst residual {inverse['worst_residual']:.2e}, "
            f"{inverse['not_converged']} of 8 examples not converged")
    assert any(line.startswith(said) for line in lines)
    assert out["samples"]["train_steps"] == 1
    assert out["samples"]["max"] == pytest.approx(float(x.max()))


def test_runtime(tmp_path):
    out = analyses.run(str(tmp_path), _settings(), only=["runtime"],
                       print_fn=lambda line: None)
    _files(tmp_path, "runtime.png", "runtime.json", "runtime.md")
    with open(tmp_path / "runtime.json") as f:
        r = json.load(f)
    assert list(r["models"]) == list(analyses.RUNTIME_MODELS)
    assert r["models"]["glow"]["ratio_to_glow"] == 1.0
    for name, m in r["models"].items():
        assert m["seconds"] > 0 and m["compile_seconds"] > 0
        assert m["ratio_to_glow"] == pytest.approx(m["seconds"] / r["models"]["glow"]["seconds"])
        assert out["runtime"][name]["seconds"] == m["seconds"]


@pytest.mark.parametrize("hw,ks", [((5, 4), (3, 3)), ((2, 2), (3, 3)), ((4, 4), (1, 1))])
def test_conv_norms_match_dense_svd(x64, hw, ks):
    kernel = np.random.default_rng(0).normal(size=ks + (2, 3))
    norms = analyses.conv_norms(kernel, hw, "SAME", n_power_iter=3000)
    dense = lambda padding: np.linalg.norm(np.asarray(conv.conv_dense_matrix(
        jnp.asarray(kernel), hw, padding=padding)), 2)
    assert norms["fft"] == pytest.approx(dense("CIRCULAR"), rel=1e-10)
    assert norms["power"] == pytest.approx(dense("SAME"), rel=1e-5)
    assert norms["fft_zero_padding_bound"] >= dense("SAME") * (1 - 1e-12)


def test_roles_of_configs_and_analyses():
    """A checkpoint's role comes from its config; each analysis asks for its models."""
    s = _settings()
    assert analyses.default_name(analyses.model_config("vanilla", s)) == "vanilla"
    assert analyses.default_name(analyses.model_config("batchnorm", s)) == "batchnorm"
    assert analyses.default_name(analyses.model_config("c=0.7", s)) == "c=0.7"
    assert analyses.default_name(analyses.model_config("density", s)) == "density"
    assert analyses.model_config("c=0.7", s).model.coeff == 0.7
    assert analyses.roles(["convergence"], (0.5, 0.9)) == ["c=0.5", "c=0.9"]
    assert analyses.roles(["reconstructions", "samples"], (0.5, 0.9)) == [
        "vanilla", "batchnorm", "c=0.9", "density"]
    assert analyses.roles(["runtime"], (0.9,)) == []
    with pytest.raises(ValueError, match="unknown analyses"):
        analyses.run("/nonexistent", s, only=["fig10"])
