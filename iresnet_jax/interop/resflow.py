"""The official Residual Flows checkpoints (github.com/rtqichen/residual-flows) as
``models.ResidualFlow`` variables.

``train_img.py`` saves ``{"state_dict", "optimizer_state_dict", "args", "ema", ...}``:
``args`` is its ``argparse.Namespace`` (the architecture is read from it) and ``ema`` the
``ExponentialMovingAverage`` whose ``shadow_params`` hold the averaged parameters; both are
read by ``torch_pickle`` as inert records. ``read`` converts the EMA weights (what the
official evaluation uses) or, with ``{"weights": "raw"}``, the trained ones, and
reproduces the official evaluation, ``update_lipschitz`` then ``model.eval()``:

* each ``InducedNormConv2d`` / ``InducedNormLinear`` (2-norm domains: spectral
  normalization) runs its power iteration from the stored ``u``, ``v`` on the chosen
  weights, with the checkpoint's ``--n-lipschitz-iters`` or to its ``--sn-tol`` (at most
  200 iterations), and evaluates ``W / max(1, sigma / coeff)`` with ``sigma = u^T W v``;
  that ``sigma`` becomes the stored ``sigma`` (``stored_sigma=True``) and ``v`` (NHWC)
  our ``u``, where further training's power iteration starts;
* OIHW kernels become HWIO, ``(out, in)`` matrices ``(in, out)``; the fully connected
  blocks act on the channel-major flattening, as the official ones do, so their weights
  and ActNorm vectors keep their order; LipSwish's one ``beta`` per activation becomes
  one per channel (all equal); ActNorm ``(x + bias) exp(weight)`` is ours as is;
* each block's ``lamb`` / ``geom_p`` give the roulette's distribution.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from iresnet_jax import models
from iresnet_jax.interop import torch_pickle
from iresnet_jax.interop.workdir import Converted, VariableBuilder, check_variables
from iresnet_jax.models.resflow import n_scales

DATASETS = {"mnist": ("mnist", 1, 1e-6), "cifar10": ("cifar10", 3, 0.05),
            "svhn": ("svhn", 3, 0.05), "imagenet32": (None, 3, 0.05),
            "imagenet64": (None, 3, 0.05), "celebahq": (None, 3, 0.05),
            "celeba_5bit": (None, 3, 0.05)}
ACTIVATIONS = {"swish": "lipswish", "elu": "elu", "softplus": "softplus"}
# Options this converter covers only at these values (the published models use them).
REQUIRED = {"block": "resblock", "vnorms": None, "learn_p": False, "fc_actnorm": False,
            "batchnorm": False, "dropout": 0.0, "fc": False, "quadratic": False,
            "padding": 0, "task": "density", "n_samples": 1}
WEIGHTS = ("ema", "raw")
# train_img.py's defaults of the options that shape the model (the published models'
# command lines change only --data, --imagesize and, for some, --nblocks and others).
TRAIN_IMG_DEFAULTS = dict(
    block="resblock", coeff=0.98, vnorms="2222", n_lipschitz_iters=None, sn_tol=1e-3,
    learn_p=False, n_power_series=None, factor_out=False, n_dist="poisson", n_samples=1,
    n_exact_terms=2, neumann_grad=True, act="swish", idim=512, nblocks="16-16-16",
    squeeze_first=False, actnorm=True, fc_actnorm=False, batchnorm=False, dropout=0.0,
    fc=False, kernels="3-1-3", logit_transform=True, quadratic=False, fc_end=True,
    fc_idim=128, preact=True, padding=0, first_resblock=True, task="density",
    data="cifar10", imagesize=32, nbits=8)


def check_args(args: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming the first option of ``train_img.py`` whose value this
    library does not reproduce."""
    for name, value in REQUIRED.items():
        got = args.get(name, value)
        if name == "vnorms":
            if set(str(got)) != {"2"}:
                raise ValueError(f"--vnorms={got} does not convert: only induced 2-norms "
                                 "(spectral normalization, '2222', the published models') are"
                                 " covered")
        elif got != value:
            raise ValueError(f"--{name.replace('_', '-')}={got} does not convert (covered: "
                             f"{value})")
    if args.get("act") not in ACTIVATIONS:
        raise ValueError(f"--act={args.get('act')} does not convert (covered: "
                         f"{sorted(ACTIVATIONS)})")
    if args.get("data") not in DATASETS:
        raise ValueError(f"--data={args.get('data')} is not a dataset of train_img.py")
    if args.get("data") == "celebahq" and args.get("nbits", 8) != 8:
        raise ValueError(f"--nbits={args['nbits']} does not convert: the bits/dim of "
                         "reduced-bit data need n_bins = 2**nbits in the evaluation")
    if len(str(args.get("vnorms"))) != len(str(args.get("kernels")).split("-")) + 1:
        raise ValueError(f"--vnorms={args.get('vnorms')} needs one entry more than --kernels"
                         f"={args.get('kernels')} has kernels")


def model_spec(args: Mapping[str, Any], lamb: float = 2.0, geom_p: float = 0.5
               ) -> dict[str, Any]:
    """``config.model`` of the model ``train_img.py`` builds from ``args`` (its options by
    name); ``lamb`` and ``geom_p`` are the roulette's parameters of its blocks."""
    check_args(args)
    _, channels, alpha = DATASETS[args["data"]]
    size = int(args["imagesize"])
    kernels = tuple(int(k) for k in str(args["kernels"]).split("-"))
    nblocks = tuple(int(n) for n in str(args["nblocks"]).split("-"))
    series = args.get("n_power_series")
    logdet = (dict(method="series", n_terms=int(series)) if series else dict(
        method="roulette", n_exact=int(args.get("n_exact_terms", 2)),
        distribution=args.get("n_dist", "poisson"), poisson_lambda=float(lamb),
        geom_p=float(geom_p)))
    if args.get("neumann_grad", True):
        logdet["gradient"] = "neumann"
    n_iter = args.get("n_lipschitz_iters")
    return dict(
        name="residual_flow", input_shape=(size, size, channels),
        blocks_per_scale=nblocks[:n_scales((size, size), nblocks, args["squeeze_first"])],
        hidden=int(args["idim"]), kernel_sizes=kernels,
        fc_blocks=4 if args.get("fc_end", True) else 0, fc_hidden=int(args["fc_idim"]),
        squeeze_first=bool(args["squeeze_first"]), factor_out=bool(args["factor_out"]),
        actnorm=bool(args["actnorm"]), first_resblock=bool(args["first_resblock"]),
        preact=bool(args["preact"]),
        logit_alpha=alpha if args.get("logit_transform", True) else None,
        coeff=float(args["coeff"]), n_power_iter=int(n_iter) if n_iter else 5,
        activation=ACTIVATIONS[args["act"]], logdet=logdet, stored_sigma=True)


def _flow_shapes(spec: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """Per scale the official ``(C, H, W)`` its blocks act on."""
    model = models.build(spec)
    return [(e["shape"][2], e["shape"][0], e["shape"][1]) for e in model.plan()]


def layout(spec: Mapping[str, Any]) -> tuple[dict[str, tuple], list[dict]]:
    """Every key of the official state dict with its shape, in the official order, and
    per linear layer and ActNorm where it goes in our variables."""
    shapes: dict[str, tuple] = {}
    places: list[dict] = []
    kernels = spec["kernel_sizes"]
    n_lin = len(kernels)

    def actnorm(prefix, path, index, size, fc):
        p = prefix + ("fc_module." if fc else "")
        shapes.update({p + "weight": (size,), p + "bias": (size,), p + "initialized": ()})
        places.append(dict(kind="actnorm", key=p, path=path + ("norm",), index=index))

    def block(prefix, path, index, c, h, w, leading, fc):
        shapes.update({prefix + "geom_p": (), prefix + "lamb": (),
                       prefix + "last_n_samples": (1,), prefix + "last_firmom": (1,),
                       prefix + "last_secmom": (1,)})
        net = prefix + ("nnet.nnet." if fc else "nnet.")
        k = 0
        d = c * h * w
        widths = ([d] + [spec["fc_hidden"]] * (n_lin - 1) if fc
                  else [c] + [spec["hidden"]] * (n_lin - 1))
        outs = widths[1:] + [widths[0]]
        for i in range(n_lin):
            if i > 0 or leading:
                if spec["activation"] == "lipswish":
                    shapes[f"{net}{k}.beta"] = (1,)
                    places.append(dict(kind="beta", key=f"{net}{k}.", index=index, width=
                                       widths[i], path=path + ("branch", f"lipswish_beta_{i}")))
                k += 1
            p = f"{net}{k}."
            layer = path + ("branch", f"dense{i}" if fc else f"conv{i}")
            if fc:
                shapes.update({p + "weight": (outs[i], widths[i]), p + "bias": (outs[i],),
                               p + "scale": (), p + "u": (outs[i],), p + "v": (widths[i],)})
                places.append(dict(kind="dense", key=p, path=layer, index=index))
            else:
                ks, grid = kernels[i], h * w if kernels[i] > 1 else 1
                shapes.update({p + "weight": (outs[i], widths[i], ks, ks),
                               p + "bias": (outs[i],), p + "initialized": (),
                               p + "spatial_dims": (2,), p + "scale": (),
                               p + "u": (outs[i] * grid,), p + "v": (widths[i] * grid,)})
                places.append(dict(kind="conv", key=p, path=layer, index=index, hw=(h, w)))
            k += 1
        places.append(dict(kind="block", key=prefix))

    flow_shapes = _flow_shapes(spec)
    first = spec["first_resblock"] and len(flow_shapes) > 1
    for i, (c, h, w) in enumerate(flow_shapes):
        j, top = 0, f"scales_{i}"
        if i == 0 and spec["logit_alpha"] is not None:
            j += 1
        if i == 0 and first and spec["actnorm"]:
            actnorm(f"transforms.0.chain.{j}.", ("first_norm",), None, c, False)
            places[-1]["path"] = ("first_norm",)
            j += 1
        for b in range(spec["blocks_per_scale"][i]):
            if i == 0 and first:
                path, index = ((top, "layers_0"), None) if b == 0 else (
                    (top, "layers_1", "block"), b - 1)
            else:
                path, index = (top, "block"), b
            block(f"transforms.{i}.chain.{j}.", path, index, c, h, w,
                  spec["preact"] and not (first and i == 0 and b == 0), False)
            j += 1
            if spec["actnorm"]:
                actnorm(f"transforms.{i}.chain.{j}.", path, index, c, False)
                j += 1
        if i == len(flow_shapes) - 1:
            for b in range(spec["fc_blocks"]):
                block(f"transforms.{i}.chain.{j}.", ("fc", "block"), b, c, h, w,
                      spec["preact"], True)
                j += 1
                if spec["actnorm"]:
                    actnorm(f"transforms.{i}.chain.{j}.", ("fc", "block"), b, c * h * w,
                            True)
                    j += 1
    return shapes, places


def check_keys(state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple],
               what: str) -> None:
    """Raises ``ValueError`` naming the first key (in the official order) that is missing,
    of another shape, or not part of the configuration ``what``."""
    for key, shape in shapes.items():
        if key not in state:
            if key.endswith("last_n_samples"):
                continue              # train_img.py --resume drops these
            raise ValueError(f"the checkpoint does not fit {what}: it has no {key}")
        if tuple(np.shape(state[key])) != shape and not key.endswith("last_n_samples"):
            raise ValueError(f"the checkpoint does not fit {what}: {key} has shape "
                             f"{tuple(np.shape(state[key]))}, the configuration needs {shape}")
    extra = [k for k in state if k not in shapes]
    if extra:
        raise ValueError(f"the checkpoint does not fit {what}: unexpected key {extra[0]}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), 1e-12)      # F.normalize, eps 1e-12


def _conv(v: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """PyTorch's ``conv2d`` of one ``(C, H, W)`` input, stride 1, padding ``k // 2``."""
    k = kernel.shape[-1]
    _, h, w = v.shape
    p = np.pad(v, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    return sum(np.einsum("oc,chw->ohw", kernel[:, :, dy, dx], p[:, dy:dy + h, dx:dx + w])
               for dy in range(k) for dx in range(k))


def _conv_t(u: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The adjoint of ``_conv``: PyTorch's ``conv_transpose2d``, same padding."""
    k = kernel.shape[-1]
    _, h, w = u.shape
    out = np.zeros((kernel.shape[1], h + 2 * (k // 2), w + 2 * (k // 2)))
    for dy in range(k):
        for dx in range(k):
            out[:, dy:dy + h, dx:dx + w] += np.einsum("oc,ohw->chw", kernel[:, :, dy, dx], u)
    return out[:, k // 2:k // 2 + h, k // 2:k // 2 + w]


def power_iteration(fwd, adj, u: np.ndarray, v: np.ndarray, n_iter: int | None,
                    tol: float) -> float:
    """``InducedNorm*.compute_weight(update=True)`` for 2-norms, then ``sigma = u^T W v``:
    ``n_iter`` iterations, or (``None``) until both vectors move less than
    ``tol + tol * max`` in RMS, at most 200. Returns ``(sigma, u, v)``."""
    for _ in range(200 if n_iter is None else n_iter):
        old_u, old_v = u, v
        u = _normalize(fwd(v).ravel()).reshape(u.shape)
        v = _normalize(adj(u).ravel()).reshape(v.shape)
        if n_iter is None:
            err_u = np.linalg.norm(u - old_u) / math.sqrt(u.size)
            err_v = np.linalg.norm(v - old_v) / math.sqrt(v.size)
            if err_u < tol + tol * u.max() and err_v < tol + tol * v.max():
                break
    return float(np.dot(u.ravel(), fwd(v).ravel())), u, v


def convert(state: Mapping[str, np.ndarray], args: Mapping[str, Any],
            spec: Mapping[str, Any]) -> dict[str, Any]:
    """The variables of ``models.build(spec)`` from a full official state dict (the
    parameters already the chosen ones), as NumPy arrays."""
    shapes, places = layout(spec)
    check_keys(state, shapes, f"train_img.py --nblocks {args['nblocks']} --idim "
               f"{args['idim']} (input {spec['input_shape']})")
    sd = {k: np.asarray(v, np.float64) for k, v in state.items()}
    n_iter, tol = args.get("n_lipschitz_iters"), float(args.get("sn_tol", 1e-3))
    builder = VariableBuilder()
    put = builder.put

    for p in places:
        key, index = p["key"], p.get("index")
        if p["kind"] == "actnorm":
            if not state[key + "initialized"]:
                raise ValueError(f"{key}: ActNorm was never initialized (no forward pass "
                                 "before saving): its parameters are not data")
            put(("params",) + p["path"] + ("loc",), index, sd[key + "bias"])
            put(("params",) + p["path"] + ("log_scale",), index, sd[key + "weight"])
        elif p["kind"] == "beta":
            put(("params",) + p["path"], index, np.full((p["width"],), sd[key + "beta"][0]))
        elif p["kind"] in ("conv", "dense"):
            kernel = sd[key + "weight"]
            u, v = sd[key + "u"], sd[key + "v"]
            if p["kind"] == "conv" and kernel.shape[-1] > 1:
                if not state[key + "initialized"]:
                    raise ValueError(f"{key}: the power-iteration vectors were never "
                                     "initialized (no forward pass before saving)")
                h, w = p["hw"]
                u, v = u.reshape(-1, h, w), v.reshape(-1, h, w)
                sigma, u, v = power_iteration(lambda a: _conv(a, kernel),
                                              lambda b: _conv_t(b, kernel), u, v, n_iter, tol)
                start = v.transpose(1, 2, 0)[None]
                put(("params",) + p["path"] + ("kernel",), index, kernel.transpose(2, 3, 1, 0))
            else:
                m = kernel.reshape(kernel.shape[0], kernel.shape[1])
                sigma, u, v = power_iteration(lambda a: m @ a, lambda b: m.T @ b, u, v,
                                              n_iter, tol)
                if p["kind"] == "conv":
                    h, w = p["hw"]
                    start = np.broadcast_to(v, (1, h, w, v.size))
                    put(("params",) + p["path"] + ("kernel",), index, m.T[None, None])
                else:
                    start = v
                    put(("params",) + p["path"] + ("kernel",), index, m.T)
            put(("params",) + p["path"] + ("bias",), index, sd[key + "bias"])
            put(("spectral",) + p["path"] + ("u",), index, _normalize(start))
            put(("spectral",) + p["path"] + ("sigma",), index, sigma)
    variables = builder.variables()
    h, w, c = spec["input_shape"]
    check_variables(models.build(spec), variables, (h, w, c))
    return variables


def _roulette_params(state: Mapping[str, np.ndarray], places: list[dict]
                     ) -> tuple[float, float]:
    """The blocks' Poisson ``lamb`` and geometric ``p`` (one value for all blocks)."""
    lambs = {float(state[p["key"] + "lamb"]) for p in places if p["kind"] == "block"}
    ps = {float(1 / (1 + np.exp(-float(state[p["key"] + "geom_p"]))))
          for p in places if p["kind"] == "block"}
    if len(lambs) > 1 or len(ps) > 1:
        raise ValueError(f"the blocks' roulette parameters differ (lamb {sorted(lambs)}, "
                         f"geom_p {sorted(ps)}): one LogDetConfig serves all blocks")
    return lambs.pop(), ps.pop()


def read(path: str, params: Mapping[str, Any] | None = None) -> Converted:
    """Converts a checkpoint of ``train_img.py``. ``params``: ``{"weights": "ema"}``
    (default: the EMA weights the official evaluation uses) or ``"raw"``; other entries
    override the checkpoint's arguments, and options it lacks take the script's
    defaults (``TRAIN_IMG_DEFAULTS``)."""
    params = dict(params or {})
    weights = params.pop("weights", "ema")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    obj = torch_pickle.load(path)
    if not isinstance(obj, Mapping) or "args" not in obj or "state_dict" not in obj:
        raise ValueError(f"{path} is not a checkpoint of train_img.py (a dictionary with "
                         "'args' and 'state_dict')")
    # An option the pickled arguments lack takes the script's default (the key check
    # below refuses a checkpoint whose tensors then do not fit).
    args = {**TRAIN_IMG_DEFAULTS, **obj["args"].attributes, **params}
    state = dict(torch_pickle.state_dict(obj["state_dict"]))
    if weights == "ema":
        ema = obj.get("ema")
        shadow = ema.attributes.get("shadow_params") if ema is not None else None
        if not shadow:
            raise ValueError("the checkpoint has no EMA weights ('ema' with shadow_params): "
                             "convert the raw weights (weights='raw')")
        unknown = sorted(set(shadow) - set(state))
        if unknown:
            raise ValueError(f"the EMA weights name parameters the state dict lacks: "
                             f"{unknown[:3]}")
        state.update({k: np.asarray(v) for k, v in shadow.items()})
    spec = model_spec(args)
    _, places = layout(spec)
    check_keys(state, layout(spec)[0], f"train_img.py {args.get('data')} "
               f"--nblocks {args['nblocks']} --idim {args['idim']}")
    spec = model_spec(args, *_roulette_params(state, places))
    dataset = DATASETS[args["data"]][0]
    source = {"repository": "rtqichen/residual-flows", "weights": weights,
              "train_img_args": {k: v for k, v in args.items()
                                 if isinstance(v, (int, float, str, bool, type(None)))}}
    return Converted(model=spec, variables=convert(state, args, spec), task="density",
                     source=source, input_shape=tuple(spec["input_shape"]), dataset=dataset)
