"""Residual branches ``g`` and the invertible residual block ``y = x + g(x)``.

A branch builds ``g`` as a *pure function* of one batch: ``parts`` runs spectral
normalization once (power iteration, state update) and returns arrays; ``build`` turns
them into the closure ``g``. The block applies JAX transforms to that closure directly
(``jax.vjp`` for the log-det, ``lax.while_loop`` for the inverse), so no Flax module runs
inside a transform and the power iteration runs once per forward.

Branches (paper Section 5, appendix C):

* ``ConvBranch``: ``[phi] -> conv k1 -> phi -> conv k2 -> phi -> conv k3`` (3-1-3);
* ``MLPBranch``: ``[phi] -> dense -> phi -> ... -> dense`` (toy densities: 2-64-64-64-2).

With ``coeff`` in (0, 1) every linear map is spectrally normalized, so
``Lip(g) <= coeff^n_layers < 1``; ``coeff=None`` is the unconstrained ("vanilla") branch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iresnet_jax import conv as conv_lib
from iresnet_jax import inverse as inverse_lib
from iresnet_jax import layers
from iresnet_jax import lipschitz
from iresnet_jax.logdet import LogDetConfig

Array = jax.Array


class Branch(nn.Module):
    """Fields and activation handling shared by the residual branches.

    Subclasses implement ``parts(x, *, train)`` (spectral normalization for inputs like
    ``x``; arrays only) and ``build(parts)`` (the pure function ``g``).
    """
    coeff: float | None = 0.9
    n_power_iter: int = 1
    init_power_iter: int = 20
    activation: str = "elu"
    leading_activation: bool = True
    zero_init_last: bool = False
    stored_sigma: bool = False

    def _check(self):
        if self.coeff is not None:
            lipschitz.check_coeff(self.coeff)
        layers.activation_fn(self.activation)

    def _kernel_init(self, last: bool):
        return (nn.initializers.zeros if (last and self.zero_init_last)
                else nn.initializers.lecun_normal())

    def _activation_params(self, widths: Sequence[int], dtype) -> list[Array | None]:
        """Per linear layer: LipSwish's ``beta`` for the activation before it, or None."""
        params = []
        for i, width in enumerate(widths):
            if self.activation == "lipswish" and (i > 0 or self.leading_activation):
                raw = self.param(f"lipswish_beta_{i}", nn.initializers.constant(0.5),
                                 (width,), dtype)
                params.append(jax.nn.softplus(raw))
            else:
                params.append(None)
        return params

    def _activations(self, act_params: Sequence[Array | None]
                     ) -> list[Callable[[Array], Array]]:
        """One activation per linear layer input (identity where none is applied)."""
        act = layers.activation_fn(self.activation)
        fns = []
        for i, beta in enumerate(act_params):
            if i == 0 and not self.leading_activation:
                fns.append(lambda h: h)
            elif beta is not None:
                fns.append(lambda h, beta=beta: act(h, beta))
            else:
                fns.append(act)
        return fns

    def function(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False
                 ) -> Callable[[Array], Array]:
        """Runs spectral normalization and returns the pure ``g`` for inputs like ``x``."""
        return self.build(self.parts(x, train=train))

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        return self.function(x, train=train)(x)

    def effective_weights(self, x: Array | jax.ShapeDtypeStruct) -> list[tuple[Array, Array]]:
        """The normalized ``(kernel, bias)`` of every layer at evaluation (no update)."""
        return self.parts(x, train=False)[0]


class ConvBranch(Branch):
    """``g`` for images: convs of ``kernel_sizes`` with ``hidden`` channels between them.

    Attributes:
      hidden: channels of the inner convolutions (paper: 32 MNIST, 512 CIFAR-10).
      kernel_sizes: kernel size of each conv; the last maps back to the input channels.
      padding: ``"SAME"`` (zeros) or ``"CIRCULAR"``.
      conv: how the convs are computed (``iresnet_jax.conv.IMPLS``; the same operator).
      (and the fields of ``Branch``: ``coeff``, ``n_power_iter`` (paper's code: 5 for
      density, 1 for classification), ``activation``, ``leading_activation`` (the first
      block of a network has none), ``zero_init_last``, ``stored_sigma`` (evaluate with
      the stored ``sigma``, ``layers.SpectralConv``).)

    Example:
      >>> branch = ConvBranch(hidden=32, coeff=0.9)
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> variables = branch.init(jax.random.key(0), x)
      >>> g = branch.apply(variables, x, method="function")  # pure x -> g(x)
    """
    hidden: int = 32
    kernel_sizes: Sequence[int] = (3, 1, 3)
    padding: str = "SAME"
    conv: str = "xla"

    def _layers(self, channels: int):
        n = len(self.kernel_sizes)
        widths = [channels] + [self.hidden] * (n - 1)
        outs = [self.hidden] * (n - 1) + [channels]
        convs = [layers.SpectralConv(
            c_out, (ks, ks) if isinstance(ks, int) else tuple(ks), coeff=self.coeff,
            n_power_iter=self.n_power_iter, init_power_iter=self.init_power_iter,
            kernel_init=self._kernel_init(i == n - 1), padding=self.padding, conv=self.conv,
            stored_sigma=self.stored_sigma, name=f"conv{i}")
            for i, (ks, c_out) in enumerate(zip(self.kernel_sizes, outs))]
        return widths, convs

    @nn.compact
    def parts(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        """``(weights, act_params)``: every conv's effective ``(kernel, bias)`` and the
        parameters of the activation before each (``None`` where it has none)."""
        self._check()
        conv_lib.check_impl(self.conv)
        if len(x.shape) != 4:
            raise ValueError(f"ConvBranch expects NHWC inputs, got shape {tuple(x.shape)}")
        widths, convs = self._layers(x.shape[-1])
        weights = [c.weights(jax.ShapeDtypeStruct(tuple(x.shape[:-1]) + (w,), x.dtype),
                             train=train) for c, w in zip(convs, widths)]
        return weights, self._activation_params(widths, x.dtype)

    def build(self, parts) -> Callable[[Array], Array]:
        params, act_params = parts
        acts = self._activations(act_params)
        padding, impl = self.padding, self.conv

        def g(x: Array) -> Array:
            h = x
            for act, (kernel, bias) in zip(acts, params):
                h = conv_lib.conv2d(act(h), kernel, padding=padding, impl=impl) + bias
            return h

        return g


class MLPBranch(Branch):
    """``g`` for vectors: dense layers ``d -> hidden... -> d`` (toy: 2-64-64-64-2)."""
    hidden: Sequence[int] = (64, 64, 64)
    leading_activation: bool = False

    @nn.compact
    def parts(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        """``(weights, act_params)`` arrays for inputs like ``x``."""
        self._check()
        if len(x.shape) != 2:
            raise ValueError(f"MLPBranch expects (batch, features) inputs, got shape "
                             f"{tuple(x.shape)}")
        d = x.shape[-1]
        widths = [d] + list(self.hidden)
        outs = list(self.hidden) + [d]
        weights = []
        for i, (w_in, w_out) in enumerate(zip(widths, outs)):
            layer = layers.SpectralDense(
                w_out, coeff=self.coeff, n_power_iter=self.n_power_iter,
                init_power_iter=self.init_power_iter,
                kernel_init=self._kernel_init(i == len(outs) - 1),
                stored_sigma=self.stored_sigma, name=f"dense{i}")
            weights.append(layer.weights(jax.ShapeDtypeStruct((x.shape[0], w_in), x.dtype),
                                         train=train))
        return weights, self._activation_params(widths, x.dtype)

    def build(self, parts) -> Callable[[Array], Array]:
        params, act_params = parts
        acts = self._activations(act_params)

        def g(x: Array) -> Array:
            h = x
            for act, (kernel, bias) in zip(acts, params):
                h = act(h) @ kernel + bias
            return h

        def value_and_jacobian(x: Array) -> tuple[Array, Array]:
            """``(g(x), J)`` with ``J[b, i, j] = d g_i / d x_j``, in one forward pass.

            Forward mode with the ``d`` tangent streams stacked: per layer one product for
            the primal and one ``(B d, w) @ (w, w')`` for all tangents (two dots beat one
            over a concatenation on XLA:CPU); the first layer's tangents are the kernel's
            rows times the activation's slope, and one ``jvp`` of the activation gives
            value and slope from the same transcendentals. The batch axis leads, so a
            batch-sharded input is reshaped without gathering.
            """
            batch, d = x.shape
            (act, (kernel, bias)), rest = (acts[0], params[0]), zip(acts[1:], params[1:])
            a, slope = jax.jvp(act, (x,), (jnp.ones_like(x),))
            h = a @ kernel + bias
            tangents = slope[:, :, None] * kernel[None, :, :]           # (B, d, w)
            for act, (kernel, bias) in rest:
                a, slope = jax.jvp(act, (h,), (jnp.ones_like(h),))
                h = a @ kernel + bias
                tangents = ((tangents * slope[:, None, :]).reshape(batch * d, -1) @ kernel
                            ).reshape(batch, d, -1)
            return h, jnp.transpose(tangents, (0, 2, 1))

        g.value_and_jacobian = value_and_jacobian
        return g


ACTNORM_POSITIONS = ("before", "after", None)


class InvertibleBlock(nn.Module):
    """An i-ResNet block: optional ActNorm, then ``y = x + g(x)``.

    Attributes:
      branch: the residual branch (``ConvBranch``, ``MLPBranch``...), adopted as a child.
      actnorm: ``"before"`` (image models), ``"after"`` (toy densities) or ``None``.
      logdet: how ``ln det(I + J_g)`` is computed; the estimators draw their probes from
        the rng stream ``"logdet"``. With ``"none"`` the branch's own forward runs (which
        may use batch statistics, as the BatchNorm baseline's does).
      inverse_config: the fixed-point inverse's settings.

    ``__call__(x, *, train=False) -> (y, log_det)``; ``inverse(y) -> x`` sows its
    per-example iteration counts, residuals and convergence flags into ``"intermediates"``
    (``flow.inverse_report`` reads them); ``inverse(y, n_iter=k)`` runs exactly ``k`` plain
    iterations instead (``k`` may be traced).

    Example:
      >>> block = InvertibleBlock(ConvBranch(hidden=16, coeff=0.9))
      >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
      >>> variables = block.init({"params": jax.random.key(1)}, x)
      >>> y, ld = block.apply(variables, x, rngs={"logdet": jax.random.key(2)})
      >>> x_rec = block.apply(variables, y, method="inverse")
    """
    branch: nn.Module
    actnorm: str | None = "before"
    logdet: LogDetConfig = LogDetConfig()
    inverse_config: inverse_lib.InverseConfig = inverse_lib.InverseConfig()

    def setup(self):
        if self.actnorm not in ACTNORM_POSITIONS:
            raise ValueError(f"actnorm must be one of {ACTNORM_POSITIONS}, got "
                             f"{self.actnorm!r}")
        if self.actnorm is not None:
            self.norm = layers.ActNorm()

    def _logdet_key(self):
        if not self.logdet.needs_rng:
            return None
        if not self.has_rng("logdet"):
            if self.is_initializing():
                return self.make_rng("params")   # model.init(key, x): the value is unused
            raise ValueError(
                f"the {self.logdet.method!r} log-det estimator draws probes from the rng "
                "stream 'logdet': pass rngs={'logdet': key} to apply (or use "
                "LogDetConfig(method='exact'/'none'))")
        return self.make_rng("logdet")

    def prepare(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        """The branch's normalized weights for inputs like ``x`` (arrays only); depends on
        ``x`` only through its shape, so a stack prepares all its blocks at once."""
        return self.branch.parts(x, train=train)

    def __call__(self, x: Array, *, train: bool = False, prepared=None
                 ) -> tuple[Array, Array]:
        log_det = jnp.zeros(x.shape[:1], x.dtype)
        if self.actnorm == "before":
            x, log_det = self.norm(x)
        if prepared is None and self.logdet.method == "none":
            gx, ld = self.branch(x, train=train), jnp.zeros_like(log_det)
        else:
            if prepared is None:
                prepared = self.prepare(x, train=train)
            gx, ld = self.logdet(self.branch.build(prepared), x, self._logdet_key())
        y = x + gx
        log_det = log_det + ld
        if self.actnorm == "after":
            y, ld_norm = self.norm(y)
            log_det = log_det + ld_norm
        return y, log_det

    def inverse(self, y: Array, *, prepared=None, n_iter: int | Array | None = None) -> Array:
        if self.actnorm == "after":
            y = self.norm.inverse(y)
        if prepared is None:
            prepared = self.prepare(y, train=False)
        g = self.branch.build(prepared)
        if n_iter is None:
            x, info = self.inverse_config(g, y)
            self.sow("intermediates", "inverse_iterations", info.iterations)
            self.sow("intermediates", "inverse_residual", info.residual)
            self.sow("intermediates", "inverse_converged", info.converged)
        else:
            x = inverse_lib.iterate(g, y, n_iter)
        if self.actnorm == "before":
            x = self.norm.inverse(x)
        return x
