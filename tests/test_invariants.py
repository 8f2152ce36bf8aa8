"""Invariants of every registered invertible module (flowjax's pattern).

For each entry of ``registry.REGISTRY``: the inverse undoes the forward pass, the reported
log-det equals ``ln|det J|`` of the dense float64 Jacobian, and jit agrees with eager.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from registry import REGISTRY

IDS = [e.name for e in REGISTRY]
# Op-by-op execution costs seconds per model on CPU; these add nothing over their parts.
SLOW_EAGER = {"chain", "block_stack_remat"}


def _setup(entry):
    return _setup_cached(entry.name)


@functools.lru_cache(maxsize=None)
def _setup_cached(name):
    # Built once per entry (float64; the jit-vs-eager test casts to float32): initializing
    # a conv model compiles for seconds on CPU.
    entry = next(e for e in REGISTRY if e.name == name)
    with jax.enable_x64(True):
        return _build(entry)


def _build(entry):
    model = entry.build()
    x = jax.random.normal(jax.random.key(0), entry.shape, jnp.float64)
    x = 1.5 * x + 0.3
    variables = jax.jit(model.init)(jax.random.key(1), x)
    # Move every parameter away from its initial value (ActNorm would be the identity on x,
    # zero-initialized layers would be trivial).
    leaves, tree = jax.tree.flatten(variables.get("params", {}))
    rng = np.random.default_rng(2)  # numpy: eager jax.random would compile per shape
    leaves = [p + 0.3 * rng.normal(size=p.shape).astype(p.dtype) for p in leaves]
    if leaves:
        variables = {**variables, "params": jax.tree.unflatten(tree, leaves)}
    return model, variables, x


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_round_trip(x64, entry):
    model, variables, x = _setup(entry)
    y, _ = jax.jit(model.apply)(variables, x)
    x_rec = jax.jit(lambda v, y: model.apply(v, y, method="inverse"))(variables, y)
    np.testing.assert_allclose(x_rec, x, atol=1e-8)


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_logdet_matches_dense_jacobian(x64, entry):
    if not entry.exact_logdet:
        pytest.skip("injective, not bijective: no square Jacobian")
    model, variables, x = _setup(entry)
    _, ld = jax.jit(model.apply)(variables, x)
    single = lambda xi: model.apply(variables, xi[None])[0][0].ravel()
    jac = jax.jit(jax.vmap(jax.jacfwd(single)))(x).reshape(x.shape[0], -1, x[0].size)
    expected = [np.linalg.slogdet(np.asarray(j))[1] for j in jac]
    np.testing.assert_allclose(ld, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_jit_matches_eager(entry):
    model, variables, x = _setup(entry)
    x32 = x.astype(jnp.float32)
    variables = jax.tree.map(lambda a: a.astype(jnp.float32), variables)
    if entry.name in SLOW_EAGER:
        pytest.skip("eager execution of this model is covered by a smaller entry")
    y_eager, ld_eager = model.apply(variables, x32)
    y_jit, ld_jit = jax.jit(model.apply)(variables, x32)
    np.testing.assert_allclose(y_jit, y_eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ld_jit, ld_eager, rtol=1e-5, atol=1e-5)
    inv_eager = model.apply(variables, y_eager, method="inverse")
    inv_jit = jax.jit(lambda v, y: model.apply(v, y, method="inverse"))(variables, y_eager)
    np.testing.assert_allclose(inv_jit, inv_eager, rtol=1e-5, atol=1e-5)


def test_block_stack_training_updates_every_blocks_spectral_state():
    from iresnet_jax import blocks, flow, logdet
    block = blocks.InvertibleBlock(blocks.ConvBranch(hidden=4, coeff=0.9, n_power_iter=2,
                                                     init_power_iter=0),
                                   logdet=logdet.LogDetConfig("none"))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    for hoist in (True, False):
        model = flow.BlockStack(block, n=3, hoist=hoist)
        variables = jax.jit(model.init)(jax.random.key(1), x)
        _, state = model.apply(variables, x, train=True, mutable=["spectral"])
        u_old = variables["spectral"]["block"]["branch"]["conv1"]["u"]
        u_new = state["spectral"]["block"]["branch"]["conv1"]["u"]
        assert u_new.shape == u_old.shape == (3, 1, 4, 4, 4)
        changed = np.abs(np.asarray(u_new - u_old)).reshape(3, -1).max(axis=1)
        assert np.all(changed > 1e-4)                      # every block iterated
        _, state_eval = model.apply(variables, x, mutable=["spectral"])
        np.testing.assert_array_equal(state_eval["spectral"]["block"]["branch"]["conv1"]["u"],
                                      u_old)


def test_materialize_is_an_exact_identity_and_unrolled_stacks_agree_with_rolled():
    from iresnet_jax import blocks, conv, flow, logdet
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3)) * 1e3
    np.testing.assert_array_equal(jax.jit(conv.materialize)(x), x)
    with jax.enable_x64(True):
        x64 = jax.random.normal(jax.random.key(0), (7, 6), jnp.float64) * 1e-3
        np.testing.assert_array_equal(jax.jit(conv.materialize)(x64), x64)
    block = blocks.InvertibleBlock(blocks.ConvBranch(hidden=4, coeff=0.9),
                                   logdet=logdet.LogDetConfig("exact"))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
    rolled = flow.BlockStack(block, n=4)
    variables = jax.jit(rolled.init)(jax.random.key(2), x)
    y1, ld1 = jax.jit(rolled.apply)(variables, x)
    y4, ld4 = jax.jit(flow.BlockStack(block, n=4, unroll=4).apply)(variables, x)
    np.testing.assert_allclose(y4, y1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ld4, ld1, rtol=1e-5, atol=1e-5)
