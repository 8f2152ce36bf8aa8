"""The flow protocol, composition of invertible layers, and the density-flow contract.

An invertible module implements

* ``__call__(x, *, train=False) -> (y, log_det)``, ``log_det`` of shape ``(batch,)``;
* ``inverse(y) -> x`` (``inverse(y, n_iter=k)``: exactly ``k`` fixed-point iterations per
  residual block).

``Chain`` composes such modules; ``BlockStack`` stacks ``n`` identical blocks with
``nn.scan`` so that the compiled program does not grow with depth. ``DensityFlow`` is the
base of every density model (the toy i-ResNet, Glow, the multiscale i-ResNet): a flow to
flat latents with a ``DiagonalGaussianPrior``, ``log_prob(x)`` and ``sample(n, *,
temperature=1.0)`` (rng stream ``"sample"``).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax import conv, distributions

Array = jax.Array

# Collections whose variables are stacked along the scanned axis, and the rng streams
# split per block.
_SCANNED = {"params": 0, "spectral": 0, "intermediates": 0, "batch_stats": 0,
            "constants": 0}
_SPLIT = {"params": True, "logdet": True, "dropout": True}


class Chain(nn.Module):
    """Composition ``layers[-1] o ... o layers[0]`` of invertible modules.

    Example:
      >>> flow = Chain([layers.ActNorm(), layers.Squeeze()])
    """
    layers: Sequence[nn.Module]

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        log_det = jnp.zeros(x.shape[:1], x.dtype)
        for layer in self.layers:
            x, ld = layer(x, train=train)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, y: Array, *, n_iter: int | Array | None = None) -> Array:
        for layer in reversed(self.layers):
            y = _invert(layer, y, n_iter)
        return y


def _invert(layer: nn.Module, y, n_iter):
    """``layer.inverse(y)``, passing ``n_iter`` to the layers that iterate (analytic
    layers such as ActNorm take no ``n_iter``)."""
    if n_iter is not None and "n_iter" in inspect.signature(layer.inverse).parameters:
        return layer.inverse(y, n_iter=n_iter)
    return layer.inverse(y)


class BlockStack(nn.Module):
    """``n`` copies (separate parameters) of ``block`` applied in sequence via ``nn.scan``.

    Parameters and the ``"spectral"`` state gain a leading axis of size ``n``.

    Attributes:
      block: an invertible block, adopted as the scanned child.
      n: number of blocks (>= 1).
      remat: rematerialize each block in the backward pass (``jax.checkpoint``).
      unroll: blocks per iteration of the compiled loop (``lax.scan``'s ``unroll``). When
        unrolled, each block's output is materialized (``conv.materialize``), so XLA does
        not fuse the residual stream of all earlier blocks into every consumer.
      hoist: run every block's ``prepare`` (spectral normalization, which depends only on
        the input's shape) at once, vmapped over the stacked parameters, before the scan.
    """
    block: nn.Module
    n: int
    remat: bool = False
    unroll: int = 1
    hoist: bool = True

    def _check(self):
        if self.n < 1:
            raise ValueError(f"BlockStack needs n >= 1 blocks, got {self.n}")

    def _scan(self, fn, reverse: bool):
        if self.remat:
            fn = nn.remat(fn, prevent_cse=False)
        return nn.scan(fn, variable_axes=_SCANNED, split_rngs=_SPLIT, length=self.n,
                       reverse=reverse, unroll=self.unroll)

    def _prepare_all(self, x: Array, train: bool):
        if not self.hoist or not hasattr(self.block, "prepare"):
            return None

        def prepare(block, x):
            return block.prepare(x, train=train)

        return nn.vmap(prepare, variable_axes=_SCANNED, split_rngs=_SPLIT, in_axes=None,
                       axis_size=self.n)(self.block, x)

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        self._check()
        prepared = self._prepare_all(x, train)
        finish = conv.materialize if self.unroll > 1 else (lambda y: y)

        def body(block, carry, prep):
            kw = {} if prep is None else {"prepared": prep}
            y, log_det = block(carry, train=train, **kw)
            return finish(y), log_det

        y, log_dets = self._scan(body, reverse=False)(self.block, x, prepared)
        return y, jnp.sum(log_dets, axis=0)

    def inverse(self, y: Array, *, n_iter: int | Array | None = None) -> Array:
        self._check()
        prepared = self._prepare_all(y, False)

        def body(block, carry, prep):
            kw = {} if prep is None else {"prepared": prep}
            if n_iter is not None:
                kw["n_iter"] = n_iter
            return block.inverse(carry, **kw), None

        x, _ = self._scan(body, reverse=True)(self.block, y, prepared)
        return x


class DiagonalGaussianPrior(nn.Module):
    """A diagonal Gaussian over flat latents ``(batch, D)``: learned (``mean`` and
    ``log_std`` of shape ``(D,)``, zeros at init, created at ``model.init``) or the
    standard normal (``learn=False``, no parameters)."""
    learn: bool = True

    @nn.compact
    def __call__(self, z: Array) -> Array:
        """Per-example ``ln N(z; mean, diag(exp(log_std))^2)``."""
        if z.ndim != 2:
            raise ValueError(f"the prior expects flat latents (batch, D), got {z.shape}")
        if not self.learn:
            return distributions.standard_normal_log_prob(z)
        mean = self.param("mean", nn.initializers.zeros, (z.shape[-1],), z.dtype)
        log_std = self.param("log_std", nn.initializers.zeros, (z.shape[-1],), z.dtype)
        return distributions.diag_normal_log_prob(z, mean, log_std)

    def sample(self, key: Array, n: int, dim: int, dtype=jnp.float32,
               temperature: float = 1.0) -> Array:
        """``n`` draws of dimension ``dim``, the standard deviation scaled by
        ``temperature``."""
        eps = jax.random.normal(key, (n, dim), dtype) * temperature
        if not self.learn:
            return eps
        mean = self.get_variable("params", "mean")
        log_std = self.get_variable("params", "log_std")
        if mean is None:
            raise ValueError("the learned prior has no parameters yet: initialize the model "
                             "(model.init) with data first")
        return mean + jnp.exp(log_std) * eps


class DensityFlow(nn.Module):
    """The density-model contract: ``__call__(x) -> (z, log_det)`` with flat ``z`` of
    ``latent_dim`` entries, ``inverse(z) -> x``, and a submodule ``prior``
    (``DiagonalGaussianPrior``) set up by the subclass."""

    @property
    def latent_dim(self) -> int:
        raise NotImplementedError

    def log_prob(self, x: Array, *, train: bool = False) -> Array:
        """Per-example ``ln p(x) = ln p_z(F(x)) + ln|det J_F(x)|``."""
        z, log_det = self(x, train=train)
        return self.prior(z.reshape(z.shape[0], -1)) + log_det

    def sample(self, n: int, *, temperature: float = 1.0) -> Array:
        """``n`` samples: prior draws (rng stream ``"sample"``, standard deviation times
        ``temperature``) through the inverse."""
        z = self.prior.sample(self.make_rng("sample"), n, self.latent_dim,
                              temperature=temperature)
        return self.inverse(z)


def inverse_report(intermediates) -> dict:
    """What the fixed-point inverses of one ``apply(..., mutable=["intermediates"])`` sowed
    (its returned state, or that state's ``"intermediates"``; an analytic flow returns no
    such collection), read at no extra cost: ``worst_residual`` (the largest last step of
    any example in any block, a bound on its residual), ``not_converged`` (examples that
    some block left unconverged), ``examples`` and ``max_iterations``; ``{}`` when nothing
    was inverted by fixed point (analytic flows, or exactly ``n_iter`` iterations).

    Example:
      >>> x, state = model.apply(v, 16, method="sample", rngs={"sample": key},
      ...                        mutable=["intermediates"])
      >>> inverse_report(state)   # {"worst_residual": 3e-07, ...}
    """
    found: dict[str, list] = {"inverse_residual": [], "inverse_converged": [],
                              "inverse_iterations": []}
    for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates):
        names = {getattr(k, "key", None) for k in path}
        for name, values in found.items():
            if name in names:
                leaf = np.asarray(leaf)
                values.append(leaf.reshape(-1, leaf.shape[-1]))   # (blocks, batch)
    if not found["inverse_residual"]:
        return {}
    residual = np.concatenate(found["inverse_residual"])
    converged = np.concatenate(found["inverse_converged"]).all(axis=0)
    return {"worst_residual": float(np.max(residual)),
            "not_converged": int(np.sum(~converged)), "examples": int(converged.size),
            "max_iterations": int(np.max(np.concatenate(found["inverse_iterations"])))}


def describe_inverse(report: dict) -> str:
    """One log line for an ``inverse_report``."""
    if "worst_residual" not in report:
        return "inverse: no fixed-point iteration"
    return (f"inverse: worst residual {report['worst_residual']:.2e}, "
            f"{report['not_converged']} of {report['examples']} examples not converged "
            f"(at most {report['max_iterations']} iterations)")
