"""Interop: the official PyTorch i-ResNet's checkpoints converted without PyTorch (against
outputs of the official code, tests/fixtures/make_official.py), the restricted
unpickler, converted workdirs, and modules as distrax bijectors."""

from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import blocks, flow, interop, layers, models
from iresnet_jax.interop import iresnet, torch_pickle
from iresnet_jax.inverse import InverseConfig
from iresnet_jax.logdet import LogDetConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "official"
META = json.loads((FIXTURES / "official.json").read_text())
NAMES = ["density_tiny", "density_flat_tiny", "classifier_tiny", "density_mnist",
         "classifier_mnist"]


def _params(name: str) -> dict:
    entry = META["models"][name]
    return {"class": entry["class"], **entry["kwargs"]}


@functools.lru_cache(maxsize=None)
def _converted(name: str) -> interop.Converted:
    return interop.read("iresnet", str(FIXTURES / f"{name}.pth"), _params(name))


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    with np.load(FIXTURES / f"{name}.npz") as f:
        return dict(f)


def _nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _model(converted: interop.Converted, **overrides):
    return models.build(converted.model, **overrides)


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_less(np.abs(got - want), rtol * np.maximum(np.abs(want), 1.0))


# --------------------------------------------------------------- official outputs


@pytest.mark.parametrize("name", NAMES)
def test_converted_models_reproduce_the_official_outputs(name):
    """Latents (to 1e-5; so the NCHW/NHWC layout, the squeeze order and which half the
    factor-out keeps are the official ones), log p(z) and the log-det (the official
    100-term series with the exact trace; ours: the dense Jacobian), logits and
    features, in float32."""
    conv, ref = _converted(name), _reference(name)
    x = _nhwc(ref["x"])
    if conv.task == "density":
        spec = iresnet.spec_from_params(_params(name))
        model = _model(conv, logdet={"method": "exact"})
        z, log_det = jax.jit(model.apply)(conv.variables, x)
        z_official = ref["z"][:, iresnet.latent_order(spec)]
        np.testing.assert_allclose(z, z_official, rtol=0, atol=1e-5)
        log_pz = model.apply(conv.variables, z, method=lambda m, z: m.prior(z))
        _close(log_pz, ref["log_pz"], 1e-4)
        _close(log_det, ref["log_det"], 1e-4)
        log_prob = jax.jit(functools.partial(model.apply, method="log_prob"))(
            conv.variables, x)
        _close(log_prob, ref["log_pz"] + ref["log_det"], 1e-4)
    else:
        model = _model(conv)
        logits = jax.jit(model.apply)(conv.variables, x)
        _close(logits, ref["logits"], 1e-4)
        features = model.apply(conv.variables, x, method="features")
        np.testing.assert_allclose(features, _nhwc(ref["features"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_twenty_iteration_inverse_matches_the_official(name):
    """``inverse(., n_iter=20)`` from the official latents (features) gives the official
    20-iteration inverse."""
    conv, ref = _converted(name), _reference(name)
    model = _model(conv)
    if conv.task == "density":
        z = ref["z"][:, iresnet.latent_order(iresnet.spec_from_params(_params(name)))]
    else:
        z = _nhwc(ref["features"])
    x = model.apply(conv.variables, jnp.asarray(z), n_iter=20, method="inverse")
    np.testing.assert_allclose(x, _nhwc(ref["x_inverse20"]), rtol=0, atol=1e-5)


def test_latent_order_flattens_each_piece_nhwc():
    spec = iresnet.OfficialSpec("multiscale_conv_iResNet", (1, 4, 4), (1, 1), (1, 2),
                                (4, 4), init_squeeze=True, density_estimation=True)
    # 4x2x2 after the initial squeeze: 2 channels factored out, then 8x1x1.
    assert iresnet.plan(spec)[1] == [(2, 2, 2), (8, 1, 1)]
    perm = iresnet.latent_order(spec)
    np.testing.assert_array_equal(perm[:8], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(perm[8:], np.arange(8, 16))


def test_stored_sigma_serves_evaluation_and_training_refreshes_it():
    """``stored_sigma=True`` (converted convs): evaluation divides by the stored
    ``sigma``; a training call runs the power iteration and stores ``||W u||``."""
    layer = layers.SpectralDense(4, coeff=0.5, n_power_iter=50, stored_sigma=True)
    x = jax.random.normal(jax.random.key(0), (3, 5))
    variables = layer.init(jax.random.key(1), x)
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
    variables = {**variables, "spectral": {**variables["spectral"], "sigma": jnp.array(2.0)}}
    np.testing.assert_allclose(layer.apply(variables, x), x @ (kernel / 4.0) + bias,
                               rtol=1e-6)
    _, state = layer.apply(variables, x, train=True, mutable=["spectral"])
    np.testing.assert_allclose(state["spectral"]["sigma"],
                               np.linalg.norm(np.asarray(kernel), 2), rtol=1e-4)


# --------------------------------------------------------------- file formats


@pytest.mark.parametrize("name", ["density_tiny", "density_flat_tiny", "classifier_tiny"])
def test_whole_saved_model_converts_with_its_own_settings(name):
    """The training script's ``{"model": model}`` (the classifier in ``DataParallel``):
    the settings read from the pickled module equal the constructor's, and the
    variables equal those of the state dict."""
    whole = interop.read("iresnet", str(FIXTURES / f"{name}.t7"))
    conv = _converted(name)
    assert whole.model == conv.model and whole.task == conv.task
    assert whole.source == conv.source
    jax.tree.map(np.testing.assert_array_equal, whole.variables, conv.variables)


def test_legacy_format_reads_as_the_zip_format():
    legacy = torch_pickle.state_dict(torch_pickle.load(FIXTURES / "density_tiny_legacy.pth"))
    new = torch_pickle.state_dict(torch_pickle.load(FIXTURES / "density_tiny.pth"))
    assert sorted(legacy) == sorted(new)
    for key in new:
        assert legacy[key].dtype == new[key].dtype, key
        np.testing.assert_array_equal(legacy[key], new[key], err_msg=key)


class _Call:
    """Pickles as a call of ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _zip_file(obj) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2, fix_imports=False))
    return out.getvalue()


def _legacy_file(obj) -> bytes:
    parts = [torch_pickle.LEGACY_MAGIC, 1001, {"little_endian": True}, obj, []]
    return b"".join(pickle.dumps(p, protocol=2, fix_imports=False) for p in parts)


@pytest.mark.parametrize("fmt", [_zip_file, _legacy_file])
@pytest.mark.parametrize("fn", [os.system, eval, subprocess.call])
def test_hostile_pickle_is_read_as_data_without_calling_anything(tmp_path, fmt, fn):
    marker = tmp_path / "called"
    args = {os.system: (f"touch {marker}",), eval: (f"open({str(marker)!r}, 'w')",),
            subprocess.call: (["touch", str(marker)],)}[fn]
    path = tmp_path / "model.pth"
    path.write_bytes(fmt({"model": _Call(fn, *args), "epoch": 3}))
    loaded = torch_pickle.load(path)
    assert not marker.exists()
    record = loaded["model"]
    assert isinstance(record, torch_pickle.Record)
    module, _, name = record.name.rpartition(".")
    assert (module, name) == (fn.__module__, fn.__name__)
    assert record.args == args
    with pytest.raises(ValueError, match=r"found no model .*Record\("):
        interop.read("iresnet", str(path))
    assert not marker.exists()


def test_not_a_torch_file_is_refused_clearly(tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(torch_pickle.TorchFileError, match="not a torch.save file"):
        torch_pickle.load(path)


def test_truncated_storage_is_refused(tmp_path):
    data = (FIXTURES / "density_tiny.pth").read_bytes()
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            raw = src.read(info)
            if "/data/" in info.filename and info.filename.endswith("/0"):
                raw = raw[:-4]
            dst.writestr(info.filename, raw)
    path = tmp_path / "cut.pth"
    path.write_bytes(out.getvalue())
    with pytest.raises(torch_pickle.TorchFileError, match="storage|reaches"):
        torch_pickle.load(path)


# --------------------------------------------------------------- errors name the key


def _state(name):
    return torch_pickle.state_dict(torch_pickle.load(FIXTURES / f"{name}.pth"))


def test_missing_extra_and_misshapen_keys_are_named():
    spec = iresnet.spec_from_params(_params("density_tiny"))
    state = _state("density_tiny")
    key = "stack.1.stack.0.bottleneck_block.3.weight_orig"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=rf"missing {key}"):
        iresnet.convert(missing, spec)
    with pytest.raises(ValueError, match=r"unexpected stack\.9\.extra"):
        iresnet.convert({**state, "stack.9.extra": np.zeros(3)}, spec)
    bad = dict(state, **{key: np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=rf"{key} has shape \(8, 8, 3, 3\).*needs "
                                         r"\(8, 8, 1, 1\)"):
        iresnet.convert(bad, spec)
    wider = dict(_params("density_tiny"), nChannels=[8, 16, 8])
    with pytest.raises(ValueError, match=r"stack\.1\.stack\.0\.bottleneck_block\.1\."
                                         r"weight_orig has shape"):
        interop.read("iresnet", str(FIXTURES / "density_tiny.pth"), wider)


def test_fixed_prior_converts_to_the_standard_normal():
    state = dict(_state("density_tiny"))
    spec = iresnet.spec_from_params(dict(_params("density_tiny"), learn_prior=False))
    with pytest.raises(ValueError, match="learn_prior=False, but prior_mu"):
        iresnet.convert(state, spec)
    state["prior_mu"] = np.zeros_like(state["prior_mu"])
    state["prior_logstd"] = np.zeros_like(state["prior_logstd"])
    variables = iresnet.convert(state, spec)
    assert "prior" not in variables["params"]
    model = models.build(iresnet.model_spec(spec))
    assert not model.learn_prior
    x = _nhwc(_reference("density_tiny")["x"])
    z, _ = model.apply(variables, x, rngs={"logdet": jax.random.key(0)})
    log_pz = model.apply(variables, z, method=lambda m, z: m.prior(z))
    np.testing.assert_allclose(log_pz, -0.5 * jnp.sum(z ** 2, -1)
                               - 0.5 * z.shape[-1] * np.log(2 * np.pi), rtol=1e-6)


def test_state_dict_without_settings_is_an_error():
    with pytest.raises(ValueError, match="state dict.*params.txt"):
        interop.read("iresnet", str(FIXTURES / "density_tiny.pth"))


@pytest.mark.parametrize("change, message", [
    (dict(nonlin="sorting"), "MaxMin"),
    (dict(density_estimation=False, nClasses=10), "multiscale classifier"),
    (dict(inj_pad=2), "injective padding"),
])
def test_configurations_that_do_not_convert_say_why(change, message):
    spec = iresnet.spec_from_params({**_params("density_tiny"), **change})
    with pytest.raises(ValueError, match=message):
        iresnet.check_supported(spec)


# --------------------------------------------------------------- workdirs


def test_converted_workdir_loads_like_a_trained_run(tmp_path):
    """The converter's command writes a workdir that ``iresnet_jax.load`` restores (the
    digits dataset: the tiny model's 8x8x1 inputs) with the converted variables."""
    workdir = tmp_path / "official"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.convert", "--from=iresnet",
         f"--checkpoint={FIXTURES / 'classifier_tiny.t7'}", f"--workdir={workdir}",
         "--config=experiments/configs/digits_classifier.py",
         "--config.model.inverse.max_iter=7"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "digits" and config["model"]["inverse"]["max_iter"] == 7
    assert json.loads(config["converted_from"])["model"] == "conv_iResNet"
    import iresnet_jax
    model, variables = iresnet_jax.load(str(workdir))
    ref = _reference("classifier_tiny")
    _close(model.apply(variables, _nhwc(ref["x"])), ref["logits"], 1e-4)
    assert model.inverse_config.max_iter == 7


def test_convert_function_and_dataset_checks(tmp_path):
    from experiments import convert

    conv = _converted("density_tiny")
    config = convert.make_config(conv)          # the one dataset of 8x8x1 images
    assert config.task == "density" and config.dataset == "digits"
    with pytest.raises(ValueError, match=r"does not fit cifar10.*\(8, 8, 1\)"):
        convert.make_config(conv, dataset="cifar10")
    with pytest.raises(ValueError, match="config.model has no field 'widths'"):
        convert.make_config(conv, model_overrides={"widths": 3})
    convert.convert("iresnet", str(FIXTURES / "density_tiny.pth"), str(tmp_path / "w"),
                    params=_params("density_tiny"))
    import iresnet_jax
    model, variables = iresnet_jax.load(str(tmp_path / "w"))
    ref = _reference("density_tiny")
    z, _ = model.apply(variables, _nhwc(ref["x"]), rngs={"logdet": jax.random.key(0)})
    spec = iresnet.spec_from_params(_params("density_tiny"))
    np.testing.assert_allclose(z, ref["z"][:, iresnet.latent_order(spec)], atol=1e-5)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert.convert("iresnet", str(FIXTURES / "density_tiny.pth"),
                        str(tmp_path / "w"), params=_params("density_tiny"))


# --------------------------------------------------------------- distrax

@pytest.fixture(scope="module")
def distrax():
    import distrax
    return distrax


def _tiny_density_f64():
    conv = _converted("density_tiny")
    model = _model(conv, logdet={"method": "exact"})
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), conv.variables)
    return model, variables


def _prior(distrax, variables):
    prior = variables["params"]["prior"]
    return distrax.MultivariateNormalDiag(prior["mean"], jnp.exp(prior["log_std"]))


def test_distrax_transformed_log_prob_is_the_models(x64, distrax):
    model, variables = _tiny_density_f64()
    bijector = interop.as_distrax(model, variables)
    assert (bijector.event_ndims_in, bijector.event_ndims_out) == (1, 3)
    dist = distrax.Transformed(_prior(distrax, variables), bijector)
    x = _nhwc(_reference("density_tiny")["x"]).astype(jnp.float64)
    want = model.apply(variables, x, method="log_prob")
    np.testing.assert_allclose(dist.log_prob(x), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(dist.log_prob)(x), want, rtol=1e-10)
    ref = _reference("density_tiny")                    # and the official numbers
    _close(want, ref["log_pz"] + ref["log_det"], 1e-4)
    # batch dimensions: (2, 2) examples
    lp = dist.log_prob(x.reshape((2, 2) + x.shape[1:]))
    assert lp.shape == (2, 2)
    np.testing.assert_allclose(lp.reshape(-1), want, rtol=1e-12)


def test_distrax_sample_goes_through_the_fixed_point_inverse(x64, distrax):
    model, variables = _tiny_density_f64()
    bijector = interop.as_distrax(model, variables)
    dist = distrax.Transformed(_prior(distrax, variables), bijector)
    x, log_p = dist.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(3,))
    assert x.shape == (3, 8, 8, 1)
    z = _prior(distrax, variables).sample(seed=jax.random.key(0), sample_shape=(3,))
    np.testing.assert_allclose(bijector.inverse(x), z, atol=1e-8)   # round trip
    np.testing.assert_allclose(log_p, model.apply(variables, x, method="log_prob"),
                               rtol=1e-8)


def _mlp_stack(n=3, dim=3, logdet=LogDetConfig("exact")):
    branch = blocks.MLPBranch(hidden=(8,), coeff=0.7, leading_activation=False)
    block = blocks.InvertibleBlock(branch, logdet=logdet, actnorm="after",
                                   inverse_config=InverseConfig(tol=1e-13, max_iter=500))
    return flow.BlockStack(block, n=n)


def test_distrax_chain_with_an_affine_has_the_dense_jacobian_log_det(x64, distrax):
    stack = _mlp_stack()
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    variables = stack.init(jax.random.key(2), x)
    affine = distrax.Block(distrax.ScalarAffine(jnp.array([0.3, -1.0, 2.0]),
                                                jnp.array([1.5, 0.5, 2.0])), 1)
    chain = distrax.Chain([interop.as_distrax(stack, variables), affine])
    y = x * 3.0
    latent, ildj = chain.inverse_and_log_det(y)
    jac = jax.vmap(jax.jacfwd(chain.inverse))(y)
    np.testing.assert_allclose(ildj, jnp.linalg.slogdet(jac)[1], rtol=1e-10)
    back, fldj = chain.forward_and_log_det(latent)
    np.testing.assert_allclose(back, y, atol=1e-9)
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-8)
    # distrax.Inverse: the module's own direction and log-det
    own = distrax.Inverse(interop.as_distrax(stack, variables))
    out, ld = own.forward_and_log_det(x)
    want_out, want_ld = stack.apply(variables, x)
    np.testing.assert_allclose(out, want_out, rtol=1e-12)
    np.testing.assert_allclose(ld, want_ld, rtol=1e-12)


def test_distrax_estimated_log_det_uses_the_construction_key(x64, distrax):
    stack = _mlp_stack(logdet=LogDetConfig("series", n_terms=4, n_samples=2))
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    variables = stack.init({"params": jax.random.key(2), "logdet": jax.random.key(3)}, x)
    with pytest.raises(ValueError, match="pass key"):
        interop.as_distrax(stack, variables)
    key = jax.random.key(7)
    bijector = distrax.Inverse(interop.as_distrax(stack, variables, key=key))
    _, ld = bijector.forward_and_log_det(x)
    _, want = stack.apply(variables, x, rngs={"logdet": key})
    np.testing.assert_allclose(ld, want, rtol=1e-12)


def test_distrax_toy_iresnet_and_classifier(distrax):
    toy = models.ToyIResNet(n_blocks=2, hidden=(8,))
    x = jnp.ones((4, 2))
    variables = toy.init(jax.random.key(0), x)
    bijector = interop.as_distrax(toy, variables)
    assert (bijector.event_ndims_in, bijector.event_ndims_out) == (1, 1)
    dist = distrax.Transformed(distrax.MultivariateNormalDiag(jnp.zeros(2)), bijector)
    np.testing.assert_allclose(dist.log_prob(x), toy.apply(variables, x, method="log_prob"),
                               rtol=1e-6)
    conv = _converted("classifier_tiny")
    with pytest.raises(ValueError, match="not a bijection"):
        interop.as_distrax(_model(conv), conv.variables)
