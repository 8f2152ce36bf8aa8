"""Table 5: seconds per forward+backward pass of Glow and three i-ResNets of the same size."""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax import blocks, flow
from iresnet_jax.logdet import LogDetConfig
from iresnet_jax.models import GlowStep

RUNTIME_MODELS = ("glow", "iresnet", "iresnet_sn", "iresnet_sn_logdet")


def runtime_flows(*, n_blocks: int, hidden: int, coeff: float = 0.9, n_power_iter: int = 5,
                  n_terms: int = 5) -> dict[str, nn.Module]:
    """The flows of ``RUNTIME_MODELS``, ``n_blocks`` blocks with ``hidden`` inner channels:
    Glow (ActNorm, invertible 1x1 conv, affine coupling with a 3x3-1x1-3x3 conv net) and
    the i-ResNet (ActNorm, ``x + g(x)`` with the 3-1-3 branch) without constraint, with
    spectral normalization, and with both and the power-series log-det."""
    def iresnet(c, ld):
        branch = blocks.ConvBranch(hidden=hidden, coeff=c, n_power_iter=n_power_iter,
                                   activation="elu", leading_activation=True)
        return flow.BlockStack(blocks.InvertibleBlock(branch, logdet=ld), n=n_blocks)

    none = LogDetConfig("none")
    return {
        "glow": flow.BlockStack(GlowStep(hidden=(hidden,), mixing="1x1"), n=n_blocks),
        "iresnet": iresnet(None, none),
        "iresnet_sn": iresnet(coeff, none),
        "iresnet_sn_logdet": iresnet(coeff, LogDetConfig("series", n_terms=n_terms)),
    }


def _timed(fn, *args, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"compile_seconds": compile_s, "seconds": statistics.median(times),
            "min_seconds": min(times)}


def runtime_comparison(*, shape: Sequence[int] = (16, 16, 12), batch: int = 32,
                       n_blocks: int = 8, hidden: int = 64, repeats: int = 5,
                       n_power_iter: int = 5, n_terms: int = 5, seed: int = 0
                       ) -> dict[str, Any]:
    """Seconds for one forward+backward pass (the gradient of ``mean(|z|^2 / 2 -
    log_det)`` in the parameters; spectral normalization runs its ``n_power_iter``
    training iterations) of each flow of ``runtime_flows``, and the ratios to Glow."""
    flows = runtime_flows(n_blocks=n_blocks, hidden=hidden, n_power_iter=n_power_iter,
                          n_terms=n_terms)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch,) + tuple(shape)),
                    jnp.float32)
    key = jax.random.key(seed)
    out: dict[str, Any] = {"shape": list(shape), "batch": batch, "blocks": n_blocks,
                           "hidden": hidden, "n_power_iter": n_power_iter,
                           "n_terms": n_terms, "repeats": repeats,
                           "device": jax.devices()[0].device_kind, "models": {}}
    for name, f in flows.items():
        variables = dict(jax.jit(f.init)({"params": key, "logdet": key}, x))
        params = variables.pop("params")

        def step(params, state, x, key, f=f):
            def loss(params):
                (z, ld), _ = f.apply({"params": params, **state}, x, train=True,
                                     rngs={"logdet": key}, mutable=["spectral"])
                return jnp.mean(0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, -1) - ld)
            return jax.value_and_grad(loss)(params)

        out["models"][name] = _timed(step, params, variables, x, key, repeats=repeats)
    glow_s = out["models"]["glow"]["seconds"]
    for r in out["models"].values():
        r["ratio_to_glow"] = r["seconds"] / glow_s
    return out


def runtime_markdown(result: dict) -> str:
    """The runtime table as Markdown (seconds and ratio to Glow)."""
    lines = ["| model | s per forward+backward | ratio to Glow | compile s |",
             "|---|---|---|---|"]
    for name, r in result["models"].items():
        lines.append(f"| {name} | {r['seconds']:.4f} | {r['ratio_to_glow']:.2f} | "
                     f"{r['compile_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
