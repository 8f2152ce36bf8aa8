"""The precision policy, read from the lowered programs (CPUs ignore the setting, so the
precision attribute of every dot and convolution is what there is to check)."""

import re

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import digits_density, toy_default
from iresnet_jax import precision
from iresnet_jax.train import pipeline

PRECISIONS = re.compile(r"precision = \[(\w+), (\w+)\]|#stablehlo<precision (\w+)>")


def _precisions(text: str) -> set[str]:
    """The precision names on the dots and convolutions of a lowered program."""
    found = set()
    for m in PRECISIONS.finditer(text):
        found.update(g for g in m.groups() if g)
    return found


@pytest.fixture(scope="module")
def toy():
    c = toy_default.get_config()
    c.model.n_blocks = 2
    c.batch_size = 8
    c.n_test = 16
    c.eval_batch_size = 16
    r = pipeline.setup(c)
    batch = jax.tree.map(jnp.asarray, r.task.train_batch(0))
    return r, batch


@pytest.fixture(scope="module")
def density():
    c = digits_density.get_config()
    c.model.update(blocks_per_scale=(1, 1, 1), hidden=4)
    c.model.logdet.n_terms = 2
    c.batch_size = 4
    c.eval_batch_size = 4
    c.init_batch_size = 8
    r = pipeline.setup(c)
    batch = jax.tree.map(jnp.asarray, r.task.train_batch(0))
    return r, batch


def _train(r, batch, setting):
    step = jax.jit(pipeline.make_train_step(r.model, r.task, setting))
    return _precisions(step.lower(r.state, batch).as_text())


def _eval(r, batch, setting):
    step = jax.jit(pipeline.make_eval_step(r.model, r.task, setting))
    eval_batch = jax.tree.map(jnp.asarray, next(iter(r.task.eval_batches())))
    return _precisions(step.lower(r.state.variables(), eval_batch,
                                  jax.random.key(0)).as_text())


@pytest.mark.parametrize("which", ["toy", "density"])
def test_auto_trains_fast_and_evaluates_exactly(which, request):
    r, batch = request.getfixturevalue(which)
    # training: the forward and log-det products at the backend's default, the power
    # iteration in float32
    assert _train(r, batch, "auto") == {"DEFAULT", "HIGHEST"}
    assert _eval(r, batch, "auto") == {"HIGHEST"}
    assert _train(r, batch, "float32") == {"HIGHEST"}


def test_an_explicit_setting_governs_everything(toy):
    r, batch = toy
    assert _train(r, batch, "bfloat16") == {"DEFAULT"}
    assert _eval(r, batch, "bfloat16") == {"DEFAULT"}
    assert _train(r, batch, "tensorfloat32") == {"HIGH"}


def test_the_library_inverse_is_exact_unless_chosen(toy):
    r, _ = toy
    model, variables = r.model, r.state.variables()
    y = jnp.zeros((4, 2))
    inverse = jax.jit(lambda v, y: model.apply(v, y, method="inverse"))
    assert _precisions(inverse.lower(variables, y).as_text()) == {"HIGHEST"}
    with jax.default_matmul_precision("bfloat16"):
        assert _precisions(inverse.lower(variables, y).as_text()) == {"DEFAULT"}
    # the implicit-function gradient keeps the inverse's precision
    grad = jax.jit(jax.grad(lambda v, y: jnp.sum(model.apply(v, y, method="inverse")),
                            argnums=(0, 1)))
    assert _precisions(grad.lower(variables, y).as_text()) == {"HIGHEST"}


def test_bad_setting_names_the_field():
    c = toy_default.get_config()
    c.precision = "float16"
    with pytest.raises(ValueError, match="config.precision must be one of"):
        pipeline.check_config(c)
    assert precision.resolve("auto", exact=True) == "float32"
