"""The precision of the model's products (matrix products and convolutions): one setting.

``"auto"`` (the default) trains at the backend's default precision (fast: TF32 on GPUs,
one bfloat16 pass on TPUs) and computes in float32 what must be exact: evaluation,
inversion, sampling, and the power iteration that sets each layer's Lipschitz constant.
Any of JAX's names (``"default"``, ``"bfloat16"``, ``"tensorfloat32"``, ``"float32"``,
...) applies to everything. CPUs compute in float32 whatever the setting; the setting is
visible there as the precision attribute of every dot and convolution of the program.

Inside the library, the exact parts (``inverse``, the power iteration) use
``exact_products()``: float32 unless the caller chose a precision with
``jax.default_matmul_precision``, which the binaries do through ``products``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax

AUTO = "auto"
# JAX's names (jax.default_matmul_precision), plus "auto".
SETTINGS = (AUTO, "default", "high", "highest", "fastest", "bfloat16", "tensorfloat32",
            "float32", "bfloat16_3x", "tensorfloat32_3x")


def check(setting: str, name: str = "precision") -> str:
    if setting not in SETTINGS:
        raise ValueError(f"{name} must be one of {SETTINGS}, got {setting!r}")
    return setting


def resolve(setting: str, *, exact: bool) -> str:
    """The JAX precision ``setting`` stands for in training (``exact=False``) or in
    evaluation, inversion and sampling (``exact=True``)."""
    if check(setting) != AUTO:
        return setting
    return "float32" if exact else "default"


def products(setting: str = AUTO, *, exact: bool):
    """The context in which to trace a training (``exact=False``) or an exact
    computation under ``setting``. ``"auto"`` in training leaves the precision unchosen,
    so that the library's exact parts stay in float32."""
    if setting == AUTO and not exact:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(resolve(setting, exact=exact))


def traced(fn: Callable, setting: str = AUTO, *, exact: bool) -> Callable:
    """``fn`` traced under ``products(setting, exact=exact)`` (wrap before ``jax.jit``)."""
    check(setting)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with products(setting, exact=exact):
            return fn(*args, **kwargs)
    return wrapped


def exact_products():
    """float32 products, unless the caller has chosen a precision."""
    if jax.config.jax_default_matmul_precision is not None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision("float32")
