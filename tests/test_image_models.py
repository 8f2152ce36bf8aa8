"""Image models: parameter counts of the reference configurations, the configs' model
settings, shapes, errors, sampling.

Round trips, dense-Jacobian log-dets and jit-vs-eager agreement of the models are covered
by the registry (test_invariants.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import (anchors_classifier, anchors_density, cifar10_classifier,
                                 cifar10_density, digits_batchnorm, digits_classifier,
                                 digits_density, mnist_density)
from iresnet_jax import distributions, models

RNGS = {"params": jax.random.key(0), "logdet": jax.random.key(1)}
DIGITS = dict(input_shape=(8, 8, 1))


def _build(config_module, **overrides):
    """The model of a config file (data-decided fields as in its dataset)."""
    spec = config_module.get_config().model
    data = ({"input_shape": {"digits": (8, 8, 1), "mnist": (28, 28, 1),
                             "cifar10": (32, 32, 3)}[config_module.get_config().dataset]}
            if spec.name == "multiscale_density" else {"num_classes": 10})
    return models.build(spec, **{**data, **overrides})


def _param_count(model, shape):
    variables = jax.eval_shape(lambda x: model.init(RNGS, x), jnp.zeros(shape))
    return models.count_params(variables["params"]), variables


def test_anchors_density_has_51680_parameters():
    count, variables = _param_count(_build(anchors_density), (2, 28, 28, 1))
    assert count == 51_680
    # 12 blocks of three spectrally normalized convs, each with its power-iteration vector.
    us = [u for p, u in jax.tree_util.tree_leaves_with_path(variables["spectral"])
          if p[-1].key == "u"]
    assert sum(u.shape[0] if u.ndim == 5 else 1 for u in us) == 36
    assert variables["params"]["prior"]["mean"].shape == (784,)


def test_anchors_classifier_has_214650_parameters():
    count, variables = _param_count(_build(anchors_classifier), (2, 28, 28, 1))
    assert count == 214_650
    # Without the official code's (unused) feature prior: 6,272 = 2 * 7 * 7 * 64 fewer.
    count, _ = _param_count(_build(anchors_classifier, feature_prior=False), (2, 28, 28, 1))
    assert count == 214_650 - 2 * 7 * 7 * 64


def test_paper_configurations_build():
    count, _ = _param_count(_build(cifar10_density), (1, 32, 32, 3))
    assert count > 40_000_000     # 96 blocks with 512 filters
    model = _build(cifar10_classifier)
    assert sum(model.stages) == 39 and model.pad_channels == 13
    shapes = jax.eval_shape(lambda x: model.init(RNGS, x, method="features"),
                            jnp.zeros((1, 32, 32, 3)))
    z = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), shapes,
                       jnp.zeros((1, 32, 32, 3)))
    assert z.shape == (1, 8, 8, 256)   # appendix C.2: "a 8x8x256 tensor"
    assert _build(mnist_density).logdet.n_terms == 10
    assert _build(cifar10_density).logdet.n_terms == 5
    # The density configs' series takes its powers from both ends unless told otherwise;
    # the roulette (which cannot) keeps the single chain.
    assert _build(mnist_density).logdet.mode == "split"
    vjp = {**anchors_density.get_config().model.logdet, "mode": "vjp"}
    assert _build(anchors_density, logdet=vjp).logdet.mode == "vjp"
    spec = digits_density.get_config().model
    roulette = models.build(spec, logdet={**spec.logdet, "method": "roulette"},
                            **DIGITS).logdet
    assert (roulette.method, roulette.mode) == ("roulette", "vjp")
    neumann = models.build(spec, logdet={**spec.logdet, "gradient": "neumann"},
                           **DIGITS).logdet
    assert (neumann.method, neumann.gradient, neumann.mode) == ("series", "neumann", "vjp")
    assert models.build(spec, **DIGITS).logdet.mode == "split"
    assert _build(digits_classifier).logdet.method == "none"
    with pytest.raises(ValueError, match="split.*roulette"):
        models.build(spec, logdet={**spec.logdet, "method": "roulette", "mode": "split"},
                     **DIGITS)


def test_scale_plan_and_errors():
    plan = models.scale_plan((28, 28, 1), (False, True, False), True, True)
    assert [p["blocks_shape"] for p in plan] == [(14, 14, 4), (7, 7, 8), (7, 7, 4)]
    assert sum(np.prod(p["factored_shape"]) for p in plan[:-1]) + 7 * 7 * 4 == 784
    with pytest.raises(ValueError, match="squeeze a 7x7"):
        models.scale_plan((28, 28, 1), (False, True, True), True, True)
    with pytest.raises(ValueError, match="model name must be one of"):
        models.build({"name": "nope"})
    with pytest.raises(ValueError, match="unknown field of model 'classifier' 'stage'.*"
                                         "did you mean stages"):
        models.build({"name": "classifier", "stage": 3})
    with pytest.raises(ValueError, match="unknown logdet setting 'n_term'"):
        models.build({"name": "toy_iresnet", "logdet": {"n_term": 3}})
    model = _build(digits_density, blocks_per_scale=(1, 1, 1), hidden=4)
    with pytest.raises(ValueError, match="built for inputs of shape"):
        jax.eval_shape(lambda x: model.init(RNGS, x), jnp.zeros((1, 16, 16, 1)))


def test_density_log_prob_sample_and_bits_per_dim():
    spec = digits_density.get_config().model
    model = models.build(spec, blocks_per_scale=(1, 1, 1), hidden=4,
                         logdet={**spec.logdet, "n_terms": 3}, **DIGITS)
    pixels = jnp.asarray(np.random.default_rng(0).integers(0, 17, (8, 8, 8, 1)), jnp.float32)
    x = distributions.dequantize(jax.random.key(2), pixels, 17)
    assert float(x.min()) >= -0.5 and float(x.max()) < 0.5
    variables = jax.jit(model.init)(RNGS, x)

    @jax.jit
    def run(variables, x):
        lp = model.apply(variables, x, method="log_prob", rngs={"logdet": jax.random.key(3)})
        z, ld = model.apply(variables, x, rngs={"logdet": jax.random.key(3)})
        samples = model.apply(variables, 3, method="sample", rngs={"sample": jax.random.key(4)})
        return lp, z, ld, samples

    lp, z, ld, samples = run(variables, x)
    prior = distributions.standard_normal_log_prob(z)  # the learned prior at init
    np.testing.assert_allclose(lp, prior + ld, rtol=1e-5)
    assert samples.shape == (3, 8, 8, 1) and bool(jnp.all(jnp.isfinite(samples)))
    bpd = distributions.bits_per_dim(lp, 64, 17)
    np.testing.assert_allclose(bpd, -(lp - 64 * np.log(17)) / (64 * np.log(2)), rtol=1e-6)


def test_classifier_baselines_train_mode_and_inverse():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8, 8, 1)), jnp.float32)
    for config_module, collections in [(digits_classifier, {"batch_stats", "spectral"}),
                                       (digits_batchnorm, {"batch_stats"})]:
        model = _build(config_module, stages=(1, 1, 1), hidden=4)
        variables = jax.jit(model.init)(RNGS, x)
        assert set(variables) - {"params"} == collections

        @jax.jit
        def run(variables, x):
            logits, state = model.apply(variables, x, train=True,
                                        mutable=sorted(collections))
            z = model.apply(variables, x, method="features")
            return logits, state, z, model.apply(variables, z, method="inverse")

        logits, state, z, x_rec = run(variables, x)
        assert logits.shape == (6, 10)
        moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                             state["batch_stats"], variables["batch_stats"])
        assert max(jax.tree.leaves(moved)) > 0          # training updates BN statistics
        assert z.shape == (6, 2, 2, 64)
        if config_module is digits_classifier:          # invertible: c = 0.9
            np.testing.assert_allclose(x_rec, x, atol=1e-5)
