"""The staged (block-by-block) gradient of the density model against the fused one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iresnet_jax import logdet as logdet_lib
from iresnet_jax.models import density as density_lib
from iresnet_jax.models import toy
from iresnet_jax.train import staged
from iresnet_jax.train import steps
from iresnet_jax.train.state import TrainState

SHAPE = (8, 8, 1)
DIM = 64


def _model(logdet, **kw):
    kw = {"input_shape": SHAPE, "blocks_per_scale": (1, 2), "squeeze": (False, True),
          "hidden": 8, "unroll": 2, "logdet": logdet, **kw}
    return density_lib.MultiscaleDensity(**kw)


def _setup(model, dtype=jnp.float64):
    x = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (5,) + SHAPE), dtype)
    variables = dict(jax.jit(model.init)({"params": jax.random.key(0)}, x))
    params = variables.pop("params")
    return params, variables, x


def _max_diff(a, b) -> float:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return max(float(jnp.max(jnp.abs(u - v)))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("kw", [{}, {"factor_out": False, "squeeze": (True, False),
                                     "learn_prior": False}],
                         ids=["factor_out", "no_factor_out_two_squeezes_first_fixed_prior"])
def test_staged_equals_fused_with_exact_logdet(kw):
    """With the exact log-det (no probes) the staged value, per-example bits/dim, new
    spectral state and gradient equal the fused model's in float64."""
    with jax.enable_x64(True):
        model = _model(logdet_lib.LogDetConfig("exact"), **kw)
        params, state, x = _setup(model)

        def fused(params):
            log_prob, new = model.apply({"params": params, **state}, x, train=True,
                                        mutable=["spectral"], method="log_prob")
            bpd = density_lib.bits_per_dim(log_prob, DIM, 256)
            return jnp.mean(bpd), (bpd, new)

        (loss0, (bpd0, new0)), g0 = jax.jit(jax.value_and_grad(fused, has_aux=True))(params)
        grad_fn = staged.StagedDensityGrad(model, n_bins=256)
        loss1, bpd1, new1, g1 = grad_fn(params, state, x, jax.random.key(1))
        assert abs(float(loss0) - float(loss1)) < 1e-12
        np.testing.assert_allclose(bpd1, bpd0, rtol=0, atol=1e-12)
        assert _max_diff(new0, new1) < 1e-12
        assert _max_diff(g0, g1) < 1e-10
        # the update really moved the power-iteration state
        assert _max_diff(state, new1) > 1e-6


@pytest.mark.parametrize("gradient", ["autodiff", "neumann"])
def test_staged_gradient_of_the_series_equals_its_one_trace_loss(gradient):
    """With the random series estimator: the staged gradient equals ``jax.grad`` of the
    same loss traced at once (same probes), for both gradient estimators."""
    with jax.enable_x64(True):
        model = _model(logdet_lib.LogDetConfig("series", n_terms=4, gradient=gradient))
        params, state, x = _setup(model)
        grad_fn = staged.StagedDensityGrad(model, n_bins=256)
        key = jax.random.key(3)
        (loss0, (bpd0, new0)), g0 = jax.jit(jax.value_and_grad(grad_fn.loss, has_aux=True))(
            params, state, x, key)
        loss1, bpd1, new1, g1 = grad_fn(params, state, x, key)
        assert abs(float(loss0) - float(loss1)) < 1e-12
        np.testing.assert_allclose(bpd1, bpd0, rtol=0, atol=1e-12)
        assert _max_diff(new0, new1) < 1e-12
        assert _max_diff(g0, g1) < 1e-10
        # another key draws other probes: another estimate
        loss2 = grad_fn(params, state, x, jax.random.key(4))[0]
        assert abs(float(loss2) - float(loss1)) > 1e-8


def test_staged_compiles_each_distinct_block_once():
    """5 blocks of 3 kinds (the first block, the rest of scale 1, scale 2): 3 compiled
    forwards, each used by every block of its kind, none compiled again on later calls."""
    model = _model(logdet_lib.LogDetConfig("series", n_terms=2), blocks_per_scale=(2, 3))
    params, state, x = _setup(model, jnp.float32)
    grad_fn = staged.staged_density_grad(model, n_bins=256, dim=DIM)
    for seed in (1, 2):
        grad_fn(params, state, x, jax.random.key(seed))
    forwards = [program for _, program in grad_fn._built["blocks"]]
    assert [f._cache_size() for f in forwards] == [1, 1, 1]
    assert [len(scale) for scale in grad_fn._built["scales"]] == [2, 3]
    # the train step of the same model reuses the same compiled programs
    step = staged.make_staged_train_step(model, n_bins=256, dim=DIM)
    assert step.grad_fn is grad_fn


def test_staged_train_step_matches_fused_step():
    """One Adamax step with the exact log-det: the staged step's parameters, state and
    metrics equal the jitted fused step's."""
    with jax.enable_x64(True):
        model = _model(logdet_lib.LogDetConfig("exact"))
        params, state, x = _setup(model)
        pixels = jnp.asarray(np.random.default_rng(1).integers(0, 256, (5,) + SHAPE),
                             jnp.float64)

        def fresh():
            return TrainState.create(params=params, model_state=state,
                                     tx=optax.adamax(1e-2),
                                     rng=jax.random.key_data(jax.random.key(5)))

        fused = jax.jit(steps.make_train_step(model, "density", n_bins=256, dim=DIM))
        s0, m0 = fused(fresh(), {"image": pixels})
        step = staged.make_staged_train_step(model, n_bins=256, dim=DIM)
        s1, m1 = step(fresh(), {"image": pixels})
        assert set(m0) == set(m1)
        for k in m0:
            assert abs(float(m0[k]) - float(m1[k])) < 1e-9, k
        assert _max_diff(s0.params, s1.params) < 1e-10
        assert _max_diff(s0.model_state, s1.model_state) < 1e-12
        assert int(s1.step) == 1


def test_staged_rejects_bad_input():
    model = _model(logdet_lib.LogDetConfig("series", n_terms=2))
    params, state, x = _setup(model, jnp.float32)
    with pytest.raises(TypeError, match="MultiscaleDensity"):
        staged.StagedDensityGrad(toy.ToyIResNet())
    with pytest.raises(ValueError, match="save must be one of"):
        staged.StagedDensityGrad(model, save="some")
    with pytest.raises(ValueError, match=r"built for inputs of shape \(8, 8, 1\)"):
        staged.StagedDensityGrad(model)(params, state, x[:, :4], jax.random.key(0))
