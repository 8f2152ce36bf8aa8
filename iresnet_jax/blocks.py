"""Residual branches ``g`` and the invertible residual block ``y = x + g(x)``.

A branch module builds ``g`` as a *pure function* of one batch: its ``function`` method
runs spectral normalization once (power iteration, state update) and returns a closure
over the normalized weights. The block then applies JAX transforms to that closure
directly: ``jax.vjp`` / ``jax.linearize`` for the log-det, ``lax.while_loop`` for the
inverse, ``jax.closure_convert`` for implicit gradients. No Flax module is called inside a
JAX transform, and the power iteration runs once per forward, not once per series term.

Branches (Section 5 of the paper / appendix C):

* ``ConvBranch``: ``[phi] -> conv k1 -> phi -> conv k2 -> phi -> conv k3`` with
  ``kernel_sizes=(3, 1, 3)`` and hidden width ``hidden`` by default;
* ``MLPBranch``: ``[phi] -> dense -> phi -> ... -> dense`` (toy densities: 2-64-64-64-2).

With ``coeff`` in (0, 1) every linear map is spectrally normalized (``SpectralConv`` /
``SpectralDense``), so ``Lip(g) <= coeff^n_layers < 1``. ``coeff=None`` gives the
unconstrained ("vanilla") branch of the baselines, which need not be invertible.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iresnet_jax import inverse as inverse_lib
from iresnet_jax import layers
from iresnet_jax import lipschitz
from iresnet_jax import logdet as logdet_lib
from iresnet_jax import utils

Array = jax.Array


class _PlainDense(nn.Module):
    features: int
    kernel_init: Callable = utils.lecun_normal

    @nn.compact
    def weights(self, x, *, train: bool = False):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), x.dtype)
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)


class _PlainConv(nn.Module):
    features: int
    kernel_size: Sequence[int] = (3, 3)
    kernel_init: Callable = utils.lecun_normal
    padding: str = "SAME"

    @nn.compact
    def weights(self, x, *, train: bool = False):
        ks = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, ks + (x.shape[-1], self.features),
                            x.dtype)
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)


class _Branch(nn.Module):
    """Common fields and the activation handling of the residual branches."""
    coeff: float | None = 0.9
    n_power_iter: int = 1
    init_power_iter: int = 20
    activation: str = "elu"
    leading_activation: bool = True
    zero_init_last: bool = False

    def _check(self):
        if self.coeff is not None:
            lipschitz.check_coeff(self.coeff)
        layers.activation_fn(self.activation)

    def _activation_params(self, widths: Sequence[int], dtype) -> list[Array | None]:
        """Per linear layer: the LipSwish ``beta`` of the activation before it (``None`` for
        parameter-free activations)."""
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
        """Runs spectral normalization and returns the pure function ``g`` for inputs
        shaped like ``x`` (an array or ``jax.ShapeDtypeStruct``)."""
        return self.build(self.parts(x, train=train))

    def _kernel_init(self, last: bool):
        return nn.initializers.zeros if (last and self.zero_init_last) else utils.lecun_normal

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        return self.function(x, train=train)(x)

    def effective_weights(self, x: Array | jax.ShapeDtypeStruct) -> list[tuple[Array, Array]]:
        """The normalized ``(kernel, bias)`` of every layer at evaluation (no update)."""
        return self.parts(x, train=False)[0]

    def build(self, parts) -> Callable[[Array], Array]:
        """The pure function ``g`` from the arrays returned by ``parts``."""
        raise NotImplementedError


class ConvBranch(_Branch):
    """``g`` for images: convs ``kernel_sizes`` with ``hidden`` channels between them.

    Attributes:
      hidden: channels of the inner convolutions (paper: 32 for MNIST, 512 for CIFAR10).
      kernel_sizes: kernel size of each conv; the last maps back to the input channels.
      coeff: Lipschitz coefficient per conv, in (0, 1); ``None``: unconstrained.
      n_power_iter: power iterations per training call (paper's code: 5 density, 1
        classification).
      activation: ``"elu"`` (paper), ``"softplus"`` or ``"lipswish"``.
      leading_activation: apply the activation to the block input first (the first block
        of a network has none).
      zero_init_last: initialize the last conv at zero, so the block starts as identity.
      padding: ``"SAME"`` (zeros) or ``"CIRCULAR"``.
      narrowing: how convs that narrow the channels are computed, ``"conv"``,
        ``"col2im"``, ``"hybrid"``, ``"auto"`` or ``"auto_hybrid"``
        (``lipschitz.conv2d``; the same operator, a speed choice).
      widening: the derivatives of convs that widen the channels, ``"patches"``,
        ``"hybrid"`` or ``"auto_hybrid"`` (``lipschitz.conv2d``; a compile-time choice).

    Example:
      >>> branch = ConvBranch(hidden=32, coeff=0.9)
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> variables = branch.init(jax.random.key(0), x)
      >>> g = branch.apply(variables, x, method="function")  # pure x -> g(x)
    """
    hidden: int = 32
    kernel_sizes: Sequence[int] = (3, 1, 3)
    padding: str = "SAME"
    narrowing: str = "conv"
    widening: str = "patches"

    @nn.compact
    def parts(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        """Runs spectral normalization for inputs shaped like ``x`` (an array or
        ``jax.ShapeDtypeStruct``) and returns arrays only: ``(weights, act_params)``, the
        effective ``(kernel, bias)`` of every conv and the parameters of the activation
        applied before each (``None`` where it has none)."""
        self._check()
        input_shape = x.shape
        if len(input_shape) != 4:
            raise ValueError(f"ConvBranch expects NHWC inputs, got shape {tuple(input_shape)}")
        channels = input_shape[-1]
        n = len(self.kernel_sizes)
        widths = [channels] + [self.hidden] * (n - 1)
        outs = [self.hidden] * (n - 1) + [channels]
        params = []
        for i, (ks, c_out) in enumerate(zip(self.kernel_sizes, outs)):
            ks = (ks, ks) if isinstance(ks, int) else tuple(ks)
            like = jax.ShapeDtypeStruct(tuple(input_shape[:-1]) + (widths[i],), x.dtype)
            init = self._kernel_init(i == n - 1)
            if self.coeff is None:
                layer = _PlainConv(c_out, ks, kernel_init=init, name=f"conv{i}")
            else:
                layer = lipschitz.SpectralConv(
                    c_out, ks, coeff=self.coeff, n_power_iter=self.n_power_iter,
                    init_power_iter=self.init_power_iter, kernel_init=init,
                    padding=self.padding, name=f"conv{i}")
            params.append(layer.weights(like, train=train))
        return params, self._activation_params(widths, x.dtype)

    def build(self, parts) -> Callable[[Array], Array]:
        """The pure function ``g`` from the arrays returned by ``parts``."""
        params, act_params = parts
        acts = self._activations(act_params)
        padding, narrowing, widening = self.padding, self.narrowing, self.widening

        def g(x: Array) -> Array:
            h = x
            for act, (kernel, bias) in zip(acts, params):
                h = lipschitz.conv2d(act(h), kernel, padding=padding, narrowing=narrowing,
                                     widening=widening) + bias
            return h

        return g


class MLPBranch(_Branch):
    """``g`` for vectors: dense layers ``in -> hidden... -> in`` (toy: 2-64-64-64-2).

    Attributes are as in ``ConvBranch``; ``hidden`` lists the hidden layer sizes.
    """
    hidden: Sequence[int] = (64, 64, 64)
    leading_activation: bool = False

    @nn.compact
    def parts(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        """Spectral normalization for inputs like ``x``: ``(weights, act_params)`` arrays."""
        self._check()
        input_shape = x.shape
        if len(input_shape) != 2:
            raise ValueError(f"MLPBranch expects (batch, features) inputs, got shape "
                             f"{tuple(input_shape)}")
        d = input_shape[-1]
        widths = [d] + list(self.hidden)
        outs = list(self.hidden) + [d]
        params = []
        for i, (w_in, w_out) in enumerate(zip(widths, outs)):
            init = self._kernel_init(i == len(outs) - 1)
            if self.coeff is None:
                layer = _PlainDense(w_out, kernel_init=init, name=f"dense{i}")
            else:
                layer = lipschitz.SpectralDense(
                    w_out, coeff=self.coeff, n_power_iter=self.n_power_iter,
                    init_power_iter=self.init_power_iter, kernel_init=init, name=f"dense{i}")
            like = jax.ShapeDtypeStruct((input_shape[0], w_in), x.dtype)
            params.append(layer.weights(like, train=train))
        return params, self._activation_params(widths, x.dtype)

    def build(self, parts) -> Callable[[Array], Array]:
        """The pure function ``g`` from the arrays returned by ``parts``."""
        params, act_params = parts
        acts = self._activations(act_params)

        def g(x: Array) -> Array:
            h = x
            for act, (kernel, bias) in zip(acts, params):
                h = act(h) @ kernel + bias
            return h

        def value_and_jacobian(x: Array) -> tuple[Array, Array]:
            """``(g(x), J)`` with ``J[b, i, j] = d g_i / d x_j``, in one forward pass.

            Forward-mode with the ``d`` tangent streams stacked: each layer is one matmul
            for the primal and one ``(d B, w) @ (w, w')`` product for all tangents (two
            dots beat concatenating primal and tangents into one: on XLA:CPU the
            concatenation costs more than the second dot). The first layer's tangents are
            the kernel's rows scaled by the activation's slope (no product at all), and the
            elementwise derivatives come from one ``jvp`` of the activation, so value and
            derivative share their transcendentals.
            """
            batch, d = x.shape
            (act, (kernel, bias)), rest = (acts[0], params[0]), zip(acts[1:], params[1:])
            a, slope = jax.jvp(act, (x,), (jnp.ones_like(x),))
            h = a @ kernel + bias
            # tangents[i] = d h / d x_i = slope[:, i] * kernel[i], stream-major (d, B, w).
            tangents = jnp.transpose(slope)[:, :, None] * kernel[:, None, :]
            for act, (kernel, bias) in rest:
                a, slope = jax.jvp(act, (h,), (jnp.ones_like(h),))
                h = a @ kernel + bias
                tangents = ((tangents * slope[None]).reshape(d * batch, -1) @ kernel
                            ).reshape(d, batch, -1)
            return h, jnp.transpose(tangents, (1, 2, 0))

        g.value_and_jacobian = value_and_jacobian
        return g


ACTNORM_POSITIONS = ("before", "after", None)


class InvertibleBlock(nn.Module):
    """An i-ResNet block: optional ActNorm, then ``y = x + g(x)``.

    Attributes:
      branch: the residual branch (``ConvBranch`` or ``MLPBranch``), adopted as a child.
      actnorm: ``"before"`` (image models: ActNorm, then the residual), ``"after"``
        (toy densities) or ``None``.
      logdet: how ``ln det(I + J_g)`` is computed (``logdet.LogDetConfig``); the power
        series draws its probes from the rng stream ``"logdet"``.
      inverse_tol, inverse_max_iter, inverse_method, inverse_rtol: settings of the
        fixed-point inverse (``inverse.fixed_point``'s ``tol``, ``max_iter``, ``method``,
        ``rtol``).

    ``__call__(x, *, train=False) -> (y, log_det)``; ``inverse(y) -> x``. The inverse sows
    its per-example iteration counts and residuals into the ``"intermediates"``
    collection (``mutable=["intermediates"]`` to read them).

    Example:
      >>> block = InvertibleBlock(ConvBranch(hidden=16, coeff=0.9))
      >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
      >>> variables = block.init({"params": jax.random.key(1)}, x)
      >>> y, ld = block.apply(variables, x, rngs={"logdet": jax.random.key(2)})
      >>> x_rec = block.apply(variables, y, method="inverse")
    """
    branch: nn.Module
    actnorm: str | None = "before"
    logdet: logdet_lib.LogDetConfig = logdet_lib.LogDetConfig()
    inverse_tol: float = 1e-6
    inverse_max_iter: int = 100
    inverse_method: str = "plain"
    inverse_rtol: float = 0.0

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
                # model.init(key, x) with one key: the log-det value is not needed.
                return self.make_rng("params")
            raise ValueError(
                f"the {self.logdet.method!r} log-det estimator draws probes from the rng "
                "stream 'logdet': pass rngs={'logdet': key} to apply (or use "
                "LogDetConfig(method='exact'/'none'))")
        return self.make_rng("logdet")

    def prepare(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        """The branch's normalized weights for inputs like ``x`` (arrays only).

        Depends on ``x`` only through its shape, so a stack of blocks can prepare all its
        blocks at once (``flow.BlockStack``) and pass them back as ``prepared``.
        """
        return self.branch.parts(x, train=train)

    def __call__(self, x: Array, *, train: bool = False, prepared=None
                 ) -> tuple[Array, Array]:
        log_det = jnp.zeros(x.shape[:1], x.dtype)
        if self.actnorm == "before":
            x, log_det = self.norm(x)
        if prepared is None:
            prepared = self.prepare(x, train=train)
        g = self.branch.build(prepared)
        gx, ld_branch = self.logdet(g, x, self._logdet_key())
        y = x + gx
        log_det = log_det + ld_branch
        if self.actnorm == "after":
            y, ld_norm = self.norm(y)
            log_det = log_det + ld_norm
        return y, log_det

    def inverse(self, y: Array, *, prepared=None) -> Array:
        if self.actnorm == "after":
            y = self.norm.inverse(y)
        if prepared is None:
            prepared = self.prepare(y, train=False)
        g = self.branch.build(prepared)
        x, info = inverse_lib.fixed_point(g, y, tol=self.inverse_tol,
                                          max_iter=self.inverse_max_iter,
                                          method=self.inverse_method,
                                          rtol=self.inverse_rtol)
        self.sow("intermediates", "inverse_iterations", info.iterations)
        self.sow("intermediates", "inverse_residual", info.residual)
        if self.actnorm == "before":
            x = self.norm.inverse(x)
        return x
