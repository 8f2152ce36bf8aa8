"""The flow protocol and composition of invertible layers.

An invertible module implements

* ``__call__(x, *, train=False) -> (y, log_det)``, ``log_det`` of shape ``(batch,)``;
* ``inverse(y) -> x``.

``Chain`` composes such modules (log-dets add up; the inverse runs in reverse order).
``BlockStack`` stacks ``n`` identical blocks with ``nn.scan`` so that the compiled program,
and its compile time, do not grow with depth; the inverse scans in reverse.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iresnet_jax import utils

Array = jax.Array

# Collections whose variables are stacked along the scanned axis.
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

    def inverse(self, y: Array) -> Array:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class BlockStack(nn.Module):
    """``n`` copies (separate parameters) of ``block`` applied in sequence via ``nn.scan``.

    Parameters and the ``"spectral"`` state gain a leading axis of size ``n``. With
    ``remat=True`` each block is rematerialized in the backward pass (``jax.checkpoint``),
    trading compute for activation memory.

    Attributes:
      block: an invertible block (e.g. ``InvertibleBlock``), adopted as the scanned child.
      n: number of blocks (>= 1).
      remat: rematerialize each block in the backward pass.
      unroll: blocks per iteration of the compiled loop (``lax.scan``'s ``unroll``): larger
        values trade compile time for less loop overhead and fusion across blocks. When
        unrolled, every block's output goes through ``utils.materialize`` (an exact
        identity), so that XLA does not re-evaluate the residual stream of all earlier
        blocks inside each consumer.
      hoist: for blocks with a ``prepare`` method (``InvertibleBlock``), run every block's
        spectral normalization at once, vmapped over the stacked parameters, before the
        scan. The power iteration depends only on the input's shape, and its many tiny
        operations per block otherwise dominate the loop body on CPU.
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
        """Every block's ``prepare`` at once (vmapped over the stacked parameters), or
        ``None`` for blocks without one."""
        if not self.hoist or not hasattr(self.block, "prepare"):
            return None

        def prepare(block, x):
            return block.prepare(x, train=train)

        return nn.vmap(prepare, variable_axes=_SCANNED, split_rngs=_SPLIT, in_axes=None,
                       axis_size=self.n)(self.block, x)

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        self._check()
        prepared = self._prepare_all(x, train)
        finish = utils.materialize if self.unroll > 1 else (lambda y: y)
        if prepared is None:
            def body(block, carry, _):
                y, log_det = block(carry, train=train)
                return finish(y), log_det
        else:
            def body(block, carry, prep):
                y, log_det = block(carry, train=train, prepared=prep)
                return finish(y), log_det

        y, log_dets = self._scan(body, reverse=False)(self.block, x, prepared)
        return y, jnp.sum(log_dets, axis=0)

    def inverse(self, y: Array) -> Array:
        self._check()
        prepared = self._prepare_all(y, False)
        if prepared is None:
            def body(block, carry, _):
                return block.inverse(carry), None
        else:
            def body(block, carry, prep):
                return block.inverse(carry, prepared=prep), None

        x, _ = self._scan(body, reverse=True)(self.block, y, prepared)
        return x
