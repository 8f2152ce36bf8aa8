"""The official i-ResNet's PyTorch models as models of this library.

The official code (github.com/jhjacobsen/invertible-resnet) builds a density model,
``multiscale_conv_iResNet(density_estimation=True)``, and a classifier,
``conv_iResNet(nClasses=...)``; its training script saves whole models
(``{"model": model, ...}``, wrapped in ``DataParallel`` on GPUs) and ``save_session``
saves state dicts. ``read`` converts either into ``models.MultiscaleDensity`` or
``models.IResNetClassifier`` variables. Where the layouts differ:

* NCHW / OIHW tensors become NHWC / HWIO; latents are flattened per factored piece in
  NHWC order (``latent_order``), so the learned prior is permuted to match;
* the official factor-out keeps the second half of the channels (``keep_half="second"``);
* ActNorm ``y = x * exp(s) + b`` becomes ``(x + loc) * exp(s)`` with ``loc = b exp(-s)``;
* spectral normalization: the official evaluation uses ``sigma = u^T W v`` from its
  stored vectors, on the grid it was built for (the first block of a strided
  ``conv_iResNet`` stage uses the grid before its squeeze), and divides 3x3 kernels by
  ``max(1, sigma / c) + 1e-5``. That ``sigma`` is not the norm of ``W`` at any one vector
  of the block's real input size, so the converted convs keep it as their stored
  ``sigma`` (``stored_sigma=True``) and ``u`` holds the official ``v`` on the real grid
  (cropped or broadcast), where further training's power iteration starts;
* BatchNorm's momentum 0.9 (PyTorch's convention) is Flax's 0.1.

``OfficialSpec`` holds the constructor's arguments: a whole model carries them
(``spec_from_module``), a state dict does not, so its settings come from the training
script's ``params.txt`` or the constructor's arguments (``spec_from_params``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from iresnet_jax import models
from iresnet_jax.interop import torch_pickle
from iresnet_jax.interop.workdir import Converted, VariableBuilder, check_variables

CLASSES = ("multiscale_conv_iResNet", "conv_iResNet")
NONLINEARITIES = {"ELU": "elu", "Softplus": "softplus", "ReLU": "relu",
                  "MaxMinGroup": "sorting"}
CONV_EPS = 1e-5           # spectral_norm_conv divides by max(1, sigma / c) + 1e-5
SCRIPT_SHAPE = (3, 32, 32)  # the official training script's inputs, MNIST included


@dataclasses.dataclass(frozen=True)
class OfficialSpec:
    """The official constructor's arguments, by their names there (``init_squeeze`` is
    ``init_ds == 2`` for ``conv_iResNet``; ``model`` is the class)."""
    model: str
    in_shape: tuple[int, int, int]
    nBlocks: tuple[int, ...]
    nStrides: tuple[int, ...]
    nChannels: tuple[int, ...]
    init_squeeze: bool = False
    inj_pad: int = 0
    coeff: float = 0.9
    density_estimation: bool = False
    nClasses: int | None = None
    numTraceSamples: int = 1
    numSeriesTerms: int = 1
    n_power_iter: int = 5
    actnorm: bool = True
    learn_prior: bool = True
    nonlin: str = "relu"

    def __post_init__(self):
        for name in ("in_shape", "nBlocks", "nStrides", "nChannels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))


def spec_from_params(params: Mapping[str, Any]) -> OfficialSpec:
    """The spec of the official training script's ``params.txt`` (its arguments; inputs
    3x32x32) or of ``{"class": ..., <constructor arguments>}``."""
    p = dict(params)
    if "multiScale" in p or "densityEstimation" in p:
        return OfficialSpec(
            "multiscale_conv_iResNet" if p.get("multiScale") else "conv_iResNet",
            SCRIPT_SHAPE, p["nBlocks"], p["nStrides"], p["nChannels"],
            init_squeeze=p.get("init_ds", 2) == 2, inj_pad=p.get("inj_pad", 0),
            coeff=p.get("coeff", 0.9), density_estimation=bool(p.get("densityEstimation")),
            nClasses=p.get("nClasses"), numTraceSamples=p.get("numTraceSamples", 1),
            numSeriesTerms=p.get("numSeriesTerms", 1),
            n_power_iter=p.get("powerIterSpectralNorm", 5),
            actnorm=not p.get("noActnorm"), learn_prior=not p.get("fixedPrior"),
            nonlin=p.get("nonlin", "elu"))
    model = p.pop("class", None) or p.pop("model", None)
    if "init_ds" in p:
        p["init_squeeze"] = p.pop("init_ds") == 2
    fields = {f.name for f in dataclasses.fields(OfficialSpec)}
    unknown = sorted(set(p) - fields)
    if unknown:
        raise ValueError(f"unknown settings of the official model: {unknown}")
    return OfficialSpec(model=model, **p)


def spec_from_module(module: torch_pickle.Record) -> OfficialSpec:
    """The spec of a pickled official model, read from its attributes and submodules."""
    model = module.name.rsplit(".", 1)[-1]
    if model not in CLASSES:
        raise ValueError(f"the checkpoint holds a {module.name}, not one of {CLASSES}")
    a = module.attributes
    mods = a["_modules"]
    if model == "multiscale_conv_iResNet":
        init_squeeze = mods.get("init_squeeze") is not None
        pad = mods["inj_pad"].attributes["pad_size"] if mods.get("inj_pad") else 0
        scales = list(mods["stack"].attributes["_modules"].values())
        strides = [2 if s.attributes["_modules"].get("squeeze") else 1 for s in scales]
        firsts = [next(iter(s.attributes["_modules"]["stack"].attributes["_modules"]
                            .values())) for s in scales]
    else:
        init_squeeze, pad = a["init_ds"] == 2, a["ipad"]
        blocks = list(mods["stack"].attributes["_modules"].values())
        starts = np.cumsum([0] + list(a["nBlocks"]))[:-1]
        firsts = [blocks[i] for i in starts]
        strides = [b.attributes["stride"] for b in firsts]
    c, h, w = a["in_shapes"][0]
    c -= pad
    in_shape = (c // 4, 2 * h, 2 * w) if init_squeeze else (c, h, w)
    block = firsts[0].attributes
    layers = block["_modules"]["bottleneck_block"].attributes["_modules"].values()
    nonlin = next(m.name.rsplit(".", 1)[-1] for m in layers if not m.name.endswith("Conv2d"))
    for b in firsts:
        norm = b.attributes["_modules"].get("actnorm")
        if norm is not None and not norm.attributes.get("_init", True):
            raise ValueError("the checkpoint's ActNorm layers were never initialized (no "
                             "forward pass before saving): their parameters are not data")
    return OfficialSpec(
        model, in_shape, a["nBlocks"], strides,
        [_first_conv(b).attributes["out_channels"] for b in firsts],
        init_squeeze=init_squeeze, inj_pad=pad, coeff=block["coeff"],
        density_estimation=a["density_estimation"], nClasses=a["nClasses"],
        numTraceSamples=block["numTraceSamples"], numSeriesTerms=block["numSeriesTerms"],
        n_power_iter=a["n_power_iter"], actnorm=block["_modules"].get("actnorm") is not None,
        nonlin=NONLINEARITIES.get(nonlin, nonlin))


def _first_conv(block: torch_pickle.Record) -> torch_pickle.Record:
    seq = block.attributes["_modules"]["bottleneck_block"].attributes["_modules"]
    return next(m for m in seq.values() if m.name.endswith("Conv2d"))


def check_supported(spec: OfficialSpec) -> None:
    """Raises ``ValueError`` saying why a configuration does not convert."""
    if spec.model not in CLASSES:
        raise ValueError(f"the official model class must be one of {CLASSES}, got "
                         f"{spec.model!r}")
    if spec.nonlin not in ("elu", "softplus", "relu"):
        raise ValueError(f"nonlin={spec.nonlin!r} does not convert: MaxMin ('sorting') has "
                         "no counterpart in this library (elu, softplus and relu do)")
    if not (len(spec.nBlocks) == len(spec.nStrides) == len(spec.nChannels)) or any(
            s not in (1, 2) for s in spec.nStrides):
        raise ValueError(f"nBlocks, nStrides (1 or 2) and nChannels must match: {spec}")
    if spec.model == "multiscale_conv_iResNet" and not spec.density_estimation:
        raise ValueError("the multiscale classifier (multiscale_conv_iResNet with "
                         "density_estimation=False) does not convert: this library's "
                         "classifier has no factor-out")
    if spec.density_estimation and spec.inj_pad:
        raise ValueError(f"a density model with injective padding (inj_pad={spec.inj_pad})"
                         " does not convert: its latents have more dimensions than the "
                         "data, so it defines no density of the data")
    if spec.density_estimation and spec.numSeriesTerms < 1:
        raise ValueError("a density model needs numSeriesTerms >= 1")
    if not spec.density_estimation and not spec.nClasses:
        raise ValueError("a classifier needs nClasses")


def _squeezed(shape):
    c, h, w = shape
    return 4 * c, h // 2, w // 2


def plan(spec: OfficialSpec) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """The official network's layout: per block in order its key ``prefix``, where it
    lives in our variables (``path``, ``index`` in a scanned stack or ``None``), channels
    ``c``, spatial size ``hw``, the spectral norm's grid ``grid``, ``hidden`` and whether
    it has a ``leading`` activation; and the latents' pieces ``(C, H, W)`` in the order
    they are concatenated."""
    multiscale = spec.model == "multiscale_conv_iResNet"
    top = "scales" if spec.density_estimation else "stacks"
    shape = _squeezed(spec.in_shape) if spec.init_squeeze else spec.in_shape
    shape = (shape[0] + spec.inj_pad,) + shape[1:]
    blocks, pieces = [], []
    for i, (n, stride, hidden) in enumerate(zip(spec.nBlocks, spec.nStrides, spec.nChannels)):
        grid = shape[1:]
        if stride == 2:
            shape = _squeezed(shape)
            grid = shape[1:] if multiscale else grid
        for j in range(n):
            if i == 0:
                path, index = ((f"{top}_0", "layers_0"), None) if j == 0 else (
                    (f"{top}_0", "layers_1", "block"), j - 1)
            else:
                path, index = (f"{top}_{i}", "block"), j
            prefix = f"stack.{i}.stack.{j}" if multiscale else f"stack.{len(blocks)}"
            blocks.append(dict(prefix=prefix, path=path, index=index, c=shape[0],
                               hw=shape[1:], grid=grid if j == 0 else shape[1:],
                               hidden=hidden, leading=i + j > 0))
        if multiscale and i < len(spec.nBlocks) - 1:
            pieces.append((shape[0] // 2,) + shape[1:])
            shape = (shape[0] - shape[0] // 2,) + shape[1:]
    return blocks, pieces + [shape]


def latent_order(spec: OfficialSpec) -> np.ndarray:
    """``perm`` with ``z_ours = z_official[..., perm]``: each latent piece flattened
    NHWC instead of NCHW."""
    perm, offset = [], 0
    for c, h, w in plan(spec)[1]:
        perm.append(offset + np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel())
        offset += c * h * w
    return np.concatenate(perm)


def expected_shapes(spec: OfficialSpec) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict with its shape."""
    blocks, pieces = plan(spec)
    out: dict[str, tuple[int, ...]] = {}
    out["prior_mu"] = out["prior_logstd"] = (sum(math.prod(p) for p in pieces),)
    for b in blocks:
        c, k, (gh, gw) = b["c"], b["hidden"], b["grid"]
        for idx, (c_out, c_in, ks) in zip(_conv_indices(b), ((k, c, 3), (k, k, 1), (c, k, 3))):
            p = f"{b['prefix']}.bottleneck_block.{idx}."
            grid = gh * gw if ks == 3 else 1
            out.update({p + "weight_orig": (c_out, c_in, ks, ks), p + "bias": (c_out,),
                        p + "weight_u": (c_out * grid,), p + "weight_v": (c_in * grid,),
                        p + "weight_sigma": (1,)})
        if spec.actnorm:
            out[b["prefix"] + ".actnorm._log_scale"] = (c,)
            out[b["prefix"] + ".actnorm._shift"] = (c,)
    if spec.nClasses is not None:
        final = pieces[-1][0]
        out.update({f"bn1.{n}": (final,) for n in ("weight", "bias", "running_mean",
                                                   "running_var")})
        out["bn1.num_batches_tracked"] = ()
        out["logits.weight"] = (spec.nClasses, final)
        out["logits.bias"] = (spec.nClasses,)
    return out


def _conv_indices(block: dict) -> tuple[int, int, int]:
    return (1, 3, 5) if block["leading"] else (0, 2, 4)


def model_spec(spec: OfficialSpec) -> dict[str, Any]:
    """The settings of the matching model of this library, as ``config.model`` holds
    them (``models.build``)."""
    check_supported(spec)
    c, h, w = spec.in_shape
    hidden = spec.nChannels[0] if len(set(spec.nChannels)) == 1 else spec.nChannels
    shared = dict(hidden=hidden, squeeze=tuple(s == 2 for s in spec.nStrides),
                  initial_squeeze=spec.init_squeeze, coeff=spec.coeff,
                  n_power_iter=spec.n_power_iter, activation=spec.nonlin, stored_sigma=True)
    if spec.density_estimation:
        return dict(name="multiscale_density", input_shape=(h, w, c),
                    blocks_per_scale=spec.nBlocks,
                    factor_out=spec.model == "multiscale_conv_iResNet", keep_half="second",
                    learn_prior=spec.learn_prior, actnorm=spec.actnorm,
                    logdet=dict(method="series", n_terms=spec.numSeriesTerms,
                                n_samples=max(spec.numTraceSamples, 1), probe="gaussian"),
                    **shared)
    return dict(name="classifier", stages=spec.nBlocks, pad_channels=spec.inj_pad,
                norm="actnorm" if spec.actnorm else "none", logdet=dict(method="none"),
                num_classes=spec.nClasses, head_activation="relu", feature_prior=True,
                bn_momentum=0.1, **shared)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def check_keys(state: Mapping[str, np.ndarray], spec: OfficialSpec) -> None:
    """Raises ``ValueError`` naming the keys that are missing, unexpected or of a shape
    the configuration does not give."""
    expected = expected_shapes(spec)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    what = (f"{spec.model}(nBlocks={list(spec.nBlocks)}, nStrides={list(spec.nStrides)}, "
            f"nChannels={list(spec.nChannels)}, in_shape={spec.in_shape})")
    if missing or extra:
        raise ValueError(f"the state dict does not fit {what}: " + "; ".join(
            ([f"missing {_few(missing)}"] if missing else [])
            + ([f"unexpected {_few(extra)}"] if extra else [])))
    for key, shape in expected.items():
        if tuple(np.shape(state[key])) != shape:
            raise ValueError(f"{key} has shape {tuple(np.shape(state[key]))}, but {what} "
                             f"needs {shape}")


def _conv_nchw(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """PyTorch's ``conv2d(x, kernel, padding=1)`` of one ``(C, H, W)`` input."""
    _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    return sum(np.einsum("oc,chw->ohw", kernel[:, :, dy, dx], xp[:, dy:dy + h, dx:dx + w])
               for dy in range(3) for dx in range(3))


def _spectral(kernel, u, v, block: dict, coeff: float) -> tuple[np.ndarray, np.ndarray]:
    """Our ``(u, sigma)`` of one official conv: ``sigma`` makes ``W / max(1, sigma / c)``
    the official evaluation kernel; ``u`` is the official ``v`` on our grid."""
    c_out, c_in, ks, _ = kernel.shape
    (h, w), (gh, gw) = block["hw"], block["grid"]
    if ks == 1:
        sigma = u @ (kernel.reshape(c_out, c_in) @ v)
        start = np.broadcast_to(v, (h, w, c_in))
    else:
        grid_v = v.reshape(c_in, gh, gw)
        sigma = coeff * (max(1.0, u @ _conv_nchw(grid_v, kernel).ravel() / coeff) + CONV_EPS)
        start = grid_v.transpose(1, 2, 0)[:h, :w]
    start = start / max(float(np.linalg.norm(start)), 1e-12)
    return start[None].astype(np.float32), np.float32(sigma)


def convert(state: Mapping[str, np.ndarray], spec: OfficialSpec) -> dict[str, Any]:
    """The variables of ``models.build(model_spec(spec))`` from an official state dict
    (``torch_pickle.state_dict``), as NumPy arrays."""
    check_supported(spec)
    check_keys(state, spec)
    sd = {k: np.asarray(v, np.float64) for k, v in state.items()}
    builder = VariableBuilder()
    put = builder.put

    blocks, _ = plan(spec)
    for b in blocks:
        for k, idx in enumerate(_conv_indices(b)):
            p = f"{b['prefix']}.bottleneck_block.{idx}."
            kernel = sd[p + "weight_orig"]
            layer = b["path"] + ("branch", f"conv{k}")
            put(("params",) + layer + ("kernel",), b["index"], kernel.transpose(2, 3, 1, 0))
            put(("params",) + layer + ("bias",), b["index"], sd[p + "bias"])
            u, sigma = _spectral(kernel, sd[p + "weight_u"], sd[p + "weight_v"], b, spec.coeff)
            put(("spectral",) + layer + ("u",), b["index"], u)
            put(("spectral",) + layer + ("sigma",), b["index"], sigma)
        if spec.actnorm:
            log_scale = sd[b["prefix"] + ".actnorm._log_scale"]
            put(("params",) + b["path"] + ("norm", "log_scale"), b["index"], log_scale)
            put(("params",) + b["path"] + ("norm", "loc"), b["index"],
                sd[b["prefix"] + ".actnorm._shift"] * np.exp(-log_scale))
    perm = latent_order(spec)
    if spec.learn_prior or not spec.density_estimation:
        put(("params", "prior", "mean"), None, sd["prior_mu"][perm])
        put(("params", "prior", "log_std"), None, sd["prior_logstd"][perm])
    elif np.any(sd["prior_mu"]) or np.any(sd["prior_logstd"]):
        raise ValueError("learn_prior=False, but prior_mu or prior_logstd is not zero")
    if not spec.density_estimation:
        put(("params", "head_norm", "scale"), None, sd["bn1.weight"])
        put(("params", "head_norm", "bias"), None, sd["bn1.bias"])
        put(("batch_stats", "head_norm", "mean"), None, sd["bn1.running_mean"])
        put(("batch_stats", "head_norm", "var"), None, sd["bn1.running_var"])
        put(("params", "head", "kernel"), None, sd["logits.weight"].T)
        put(("params", "head", "bias"), None, sd["logits.bias"])
    variables = builder.variables()
    c, h, w = spec.in_shape
    check_variables(models.build(model_spec(spec)), variables, (h, w, c))
    return variables


def read(path: str, params: Mapping[str, Any] | None = None) -> Converted:
    """Converts an official checkpoint: a whole saved model (its settings come with it)
    or a state dict with ``params`` (the training script's ``params.txt`` or the
    constructor's arguments, ``spec_from_params``)."""
    model = torch_pickle.find_model(torch_pickle.load(path))
    if params is not None:
        spec = spec_from_params(params)
    elif torch_pickle.is_module(model):
        spec = spec_from_module(model)
    else:
        raise ValueError("the file holds a state dict, which does not say how the model was "
                         "built: give its settings (the training script's params.txt or "
                         "the constructor's arguments)")
    c, h, w = spec.in_shape
    return Converted(model=model_spec(spec), variables=convert(torch_pickle.state_dict(model),
                                                                spec),
                     task="density" if spec.density_estimation else "classification",
                     source={"from": "iresnet", **dataclasses.asdict(spec)},
                     input_shape=(h, w, c), dataset=(params or {}).get("dataset"))
