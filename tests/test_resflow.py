"""The Residual Flows model and its official checkpoints (``interop.resflow``), against
outputs of the official PyTorch code (tests/fixtures/make_resflow.py; no PyTorch here).

The fixtures are checkpoints written as ``train_img.py`` writes them (state dict, EMA
object with the module inside, pickled arguments) with the official evaluation's outputs
on fixed inputs: latents and the exact log-likelihood (dense float64 Jacobian)."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import interop, layers, models
from iresnet_jax.interop import resflow, torch_pickle
from iresnet_jax.logdet import LogDetConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "resflow")
SMALL = ("mnist_small", "factor_small")


def fixture(name):
    return os.path.join(FIXTURES, f"{name}.pth"), dict(np.load(os.path.join(FIXTURES,
                                                                             f"{name}.npz")))


def converted_model(conv, **overrides):
    spec = {**conv.model, **overrides}
    return models.build(spec), {k: jax.tree.map(jnp.asarray, v)
                                for k, v in conv.variables.items()}


def ours(x_nchw):
    """The official inputs (NCHW in [0, 1]) as ours (NHWC in [-0.5, 0.5))."""
    return jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1)) - 0.5)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_small_models_match_the_official_outputs(name, weights):
    path, ref = fixture(name)
    conv = interop.read("resflow", path, None if weights == "ema" else {"weights": weights})
    assert conv.task == "density" and conv.source["weights"] == weights
    model, variables = converted_model(conv, logdet={"method": "exact"})
    x = ours(ref["x"])
    z, _ = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(z, ref[f"z_{weights}"], rtol=0, atol=1e-5)
    log_px = jax.jit(lambda v, x: model.apply(v, x, method="log_prob"))(variables, x)
    np.testing.assert_allclose(log_px, ref[f"log_px_{weights}"], rtol=1e-4)
    x_back = jax.jit(lambda v, z: model.apply(v, z, method="inverse"))(variables, z)
    np.testing.assert_allclose(x_back, x, atol=1e-4)


def test_ema_and_raw_weights_differ():
    """The fixture's EMA weights lag the trained ones: converting the wrong set would
    fail the comparisons above."""
    _, ref = fixture("mnist_small")
    gap = np.abs(ref["z_ema"] - ref["z_raw"]).max()
    assert gap > 1e-3, gap


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_cifar10_shaped_model_matches_the_official_outputs(weights):
    path, ref = fixture("cifar10_shapes")
    conv = interop.read("resflow", path, None if weights == "ema" else {"weights": weights})
    assert conv.model["input_shape"] == (32, 32, 3) and conv.dataset == "cifar10"
    assert conv.model["logit_alpha"] == 0.05 and conv.model["coeff"] == 0.98
    assert conv.model["logdet"] == dict(method="roulette", n_exact=2, distribution="poisson",
                                        poisson_lambda=2.0, geom_p=0.5, gradient="neumann")
    model, variables = converted_model(conv, logdet={"method": "none"})
    x = ours(ref["x"])
    z, log_det = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(z, ref[f"z_{weights}"], rtol=0, atol=1e-5)
    # The log-likelihood: our flow's Jacobian, dense, for the first example.
    @jax.jit
    def log_abs_det(v):
        """ln|det dz/dx| of one example, the Jacobian's columns 256 at a time."""
        f = lambda v: model.apply(variables, v.reshape((1,) + x.shape[1:]))[0][0]
        _, jvp = jax.linearize(f, v)
        cols = jax.lax.map(jax.vmap(jvp), jnp.eye(v.size).reshape(-1, 256, v.size))
        return jnp.linalg.slogdet(cols.reshape(v.size, v.size))[1]

    log_px = -0.5 * jnp.sum(z[0] ** 2 + jnp.log(2 * jnp.pi)) + log_abs_det(x[0].reshape(-1))
    np.testing.assert_allclose(log_px, ref[f"log_px_{weights}"][0], rtol=1e-4)


def test_other_configuration_is_refused_naming_the_first_mismatching_key():
    path, _ = fixture("cifar10_shapes")
    with pytest.raises(ValueError, match=r"transforms\.0\.chain\.2\.nnet\.0\.weight has shape "
                                         r"\(32, 3, 3, 3\).*needs \(16, 3, 3, 3\)"):
        interop.read("resflow", path, {"idim": 16})
    with pytest.raises(ValueError, match=r"no transforms\.0\.chain\.4\.geom_p"):
        interop.read("resflow", path, {"nblocks": "2-1-1"})
    with pytest.raises(ValueError, match=r"unexpected key transforms\.2\.chain\.2\."):
        interop.read("resflow", path, {"fc_end": False})


@pytest.mark.parametrize("option, value", [("learn_p", True), ("vnorms", "2112"),
                                           ("batchnorm", True), ("act", "lcube"),
                                           ("block", "coupling"), ("fc_actnorm", True)])
def test_options_not_covered_are_refused_by_name(option, value):
    path, _ = fixture("mnist_small")
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')}={value}"):
        interop.read("resflow", path, {option: value})


def test_checkpoint_is_read_without_running_its_code():
    """The pickled arguments and EMA object (with the whole PyTorch module) are inert
    records: nothing of the official package is imported."""
    path, _ = fixture("factor_small")
    obj = torch_pickle.load(path)
    assert obj["args"].name == "argparse.Namespace"
    assert obj["ema"].name == "resflows.utils.ExponentialMovingAverage"
    assert obj["ema"].attributes["module"].name == "resflows.resflow.ResidualFlow"
    interop.read("resflow", path)
    assert not any(m.split(".")[0] in ("resflows", "torch") for m in sys.modules)


def test_logit_transform_and_channel_squeeze(x64):
    """LogitTransform's log-det is that of its dense Jacobian, and both it and the
    channel-first squeeze invert exactly; the squeeze is PyTorch's pixel_unshuffle."""
    x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), jnp.float64) - 0.5
    layer = layers.LogitTransform(0.05)
    y, ld = layer.apply({}, x)
    jac = jax.vmap(jax.jacfwd(lambda v: layer.apply({}, v[None])[0][0]))(x)
    dense = jnp.linalg.slogdet(jac.reshape(2, 48, 48))[1]
    np.testing.assert_allclose(ld, dense, rtol=1e-12)
    np.testing.assert_allclose(layer.apply({}, y, method="inverse"), x, atol=1e-12)
    s = layers.squeeze(x, order="channel")
    np.testing.assert_array_equal(layers.unsqueeze(s, order="channel"), x)
    nchw = np.transpose(np.asarray(x), (0, 3, 1, 2))
    unshuffled = nchw.reshape(2, 3, 2, 2, 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(2, 12, 2, 2)
    np.testing.assert_array_equal(np.transpose(np.asarray(s), (0, 3, 1, 2)), unshuffled)


@pytest.mark.parametrize("name", ["resflow_mnist", "resflow_cifar10"])
def test_published_configurations_build(name):
    """The published models' configurations build at full size (shapes only), with the
    layout the converter expects for their checkpoints: the same parameters, but for
    LipSwish's one beta per activation there and one per channel here."""
    import importlib
    module = importlib.import_module(f"experiments.configs.{name}")
    cfg = module.get_config()
    model = models.build(cfg.model)
    fields = lambda m: {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                        if f.name not in ("parent", "name")}
    assert fields(model) == fields(models.build(resflow.model_spec(module.TRAIN_IMG_ARGS),
                                                stored_sigma=False, conv=model.conv))
    assert model.logdet == LogDetConfig("roulette", n_exact=2, distribution="poisson",
                                        poisson_lambda=2.0, gradient="neumann")
    x = jax.ShapeDtypeStruct((1,) + tuple(cfg.model.input_shape), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    official, _ = resflow.layout(resflow.model_spec(module.TRAIN_IMG_ARGS))
    n_official = sum(int(np.prod(s)) for k, s in official.items()
                     if k.rsplit(".", 1)[-1] in ("weight", "bias") and "geom" not in k)
    leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
    n_ours = sum(int(np.prod(v.shape)) for p, v in leaves
                 if "lipswish" not in jax.tree_util.keystr(p))
    assert n_ours == n_official
    assert n_official > 10_000_000 if name == "resflow_cifar10" else n_official > 1_000_000


def test_bias_bound_covers_the_conv_and_fully_connected_blocks():
    """The evaluation protocol's Lipschitz bounds include the fully connected blocks and
    use the converted layers' stored sigma (the official power iteration stops at a
    tolerance, so a layer's norm may exceed c a little)."""
    from iresnet_jax.train import evaluation
    path, _ = fixture("mnist_small")
    conv = interop.read("resflow", path)
    params, spectral = conv.variables["params"], conv.variables["spectral"]
    bounds = evaluation.block_lipschitz_bounds(params, spectral, coeff=0.98,
                                               stored_sigma=True)
    dense = [b for b in bounds if b.how == ("exact-dense",) * 3]
    assert len(bounds) == 2 + 1 + 1 + 4 and len(dense) == 4
    assert all(b.dim == 256 for b in dense)
    for i in range(3):
        kernel = params["fc"]["block"]["branch"][f"dense{i}"]["kernel"][2].astype(np.float64)
        sigma = float(spectral["fc"]["block"]["branch"][f"dense{i}"]["sigma"][2])
        norm = np.linalg.norm(kernel / max(1.0, sigma / 0.98), 2)
        np.testing.assert_allclose(dense[2].norms[i], norm, rtol=1e-12)
    for b in bounds:
        assert all(0 < n <= 0.98 * 1.01 for n in b.norms) and b.lipschitz < 1, b
    assert max(n for b in bounds for n in b.norms) > 0.98 * (1 + 1e-4)


def test_convert_writes_a_workdir_that_loads(tmp_path):
    """``experiments.convert`` writes a workdir (a model on digits' 8x8 inputs, so that
    ``iresnet_jax.load`` finds its data here) whose model gives the official latents."""
    import iresnet_jax
    from experiments import convert
    from experiments.configs import digits_density
    path, ref = fixture("digits_tiny")
    workdir = str(tmp_path / "resflow")
    config = convert.convert("resflow", path, workdir, params={"weights": "raw"},
                             config=digits_density.get_config())
    assert config.model.name == "residual_flow" and config.model.stored_sigma
    assert config.dataset == "digits"
    assert json.loads(config.converted_from)["weights"] == "raw"
    model, variables = iresnet_jax.load(workdir)
    z, _ = jax.jit(model.clone(logdet=LogDetConfig("none")).apply)(variables, ours(ref["x"]))
    np.testing.assert_allclose(z, ref["z_raw"], rtol=0, atol=1e-5)


def test_options_missing_from_the_arguments_take_the_script_defaults(monkeypatch):
    """A checkpoint of an older ``train_img.py`` may lack options: they take the script's
    defaults, and the key check refuses the file when its tensors do not fit them."""
    path, _ = fixture("mnist_small")
    obj = torch_pickle.load(path)
    del obj["args"].attributes["preact"]             # the default, True, is the fixture's
    monkeypatch.setattr(resflow.torch_pickle, "load", lambda _: obj)
    assert interop.read("resflow", path).model["preact"] is True
    del obj["args"].attributes["fc_idim"]            # the default, 128, is not
    with pytest.raises(ValueError, match=r"transforms\.2\.chain\.2\.nnet\.nnet\.1\.weight has "
                                         r"shape \(16, 256\).*needs \(128, 256\)"):
        interop.read("resflow", path)
