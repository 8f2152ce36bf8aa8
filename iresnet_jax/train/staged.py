"""Staged gradients of the multiscale density model: one compiled program per distinct block.

``steps.make_train_step`` traces the whole model into one XLA program. With the log-det
estimator each block's share of that program is large (power iteration, the series'
vector-Jacobian products and their derivatives), and XLA compiles every unrolled copy of
a block again: about 21-24 s for the ANCHORS.md model's 12 blocks on a 2-core CPU, 40 s
for 24. Rolling identical blocks into a loop (``unroll=1``) compiles each body once, but
XLA:CPU then runs the backward convolutions through its generic convolution path, 3-4x
slower.

The staged gradient keeps the arithmetic and compiles each *distinct* block once. A
block's forward pass runs as one jitted program that returns its outputs, its updated
``"spectral"`` state and its ``jax.vjp`` pullback (the residuals travel as arrays); the
backward pass walks the blocks in reverse, calling one jitted pullback per block, which
adds the block's parameter gradient to its stack's. Blocks with the same shapes and
settings share one compiled forward and one compiled pullback (the block's index into its
``nn.scan`` stack is an argument), so compile time grows with the number of distinct
blocks (4 in the ANCHORS.md model: the first block, which has no leading activation, the
rest of scale 1, and one per later scale), not with depth. Small jitted programs do the
squeezes, factor-outs, the prior and the loss.

Differences from the fused step:

* each block's residuals live until the backward pass (``save="all"``, the default and
  the fastest), as with ``remat=False``; ``save="nothing"`` recomputes each block's
  forward pass in its pullback (memory of per-block remat), ``save="dots"`` keeps only the
  convolution and matmul outputs. The model's own ``remat`` and ``unroll`` do not apply;
* block ``k`` (counting from 0 through the whole model) draws its Hutchinson probes with
  ``jax.random.fold_in(key, k)`` instead of Flax's rng-stream split: the same estimator
  with other random numbers;
* the step is a Python function calling compiled programs: do not wrap it in
  ``jax.jit``. Its first call compiles them; it runs on one device.

Measured on the ANCHORS.md model (README, "Staged gradients"): compile 15-21 s against
20-24 s, each step 7-24% slower (the residuals are written out between programs instead
of being fused into the backward pass); with 24 blocks, 17 s against 40 s at about the
unrolled step's speed; at the paper's 96-block MNIST architecture, 16 s and 4.1 s per
step against 21 s and 15.6 s rolled, 186 s and 2.2 s unrolled.

Example:
  >>> grad_fn = StagedDensityGrad(model, n_bins=256, dim=784)
  >>> loss, bpd, new_model_state, grads = grad_fn(params, model_state, x, key)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iresnet_jax import flow
from iresnet_jax import layers
from iresnet_jax.models import density as density_lib
from iresnet_jax.train.state import TrainState

Array = jax.Array


_SAVE_POLICIES = {"all": None, "dots": jax.checkpoint_policies.dots_saveable,
                  "nothing": jax.checkpoint_policies.nothing_saveable}


@dataclasses.dataclass(frozen=True)
class _Block:
    """Where one block's variables live: ``path`` into every collection, and ``index``
    along the stacked axis of an ``nn.scan`` stack (``None`` for an unstacked block)."""
    path: tuple[str, ...]
    index: int | None
    kind: int  # index into the list of distinct block templates


def _get(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _state_tree(group_state: dict, model_state: dict) -> dict:
    """Per-group states back in the model's layout."""
    new_state = {c: {} for c in model_state}
    for path, st in group_state.items():
        for c in model_state:
            _set(new_state[c], path, st[c])
    return new_state


def _pullback(vjp, cotangents):
    return vjp(cotangents)


def _accumulate(vjp, cotangents, acc):
    """A block's pullback, its parameter gradient added to its group's accumulator."""
    g_params, g_h = vjp(cotangents)
    return jax.tree_util.tree_map(jnp.add, acc, g_params), g_h


# One jitted pullback for every stage: its cache holds one program per distinct pullback
# (the jitted forward of a stage returns pullbacks of one tree structure).
_pullback_jit = jax.jit(_pullback)
_accumulate_jit = jax.jit(_accumulate, donate_argnums=(2,))


def _plan_blocks(model: density_lib.MultiscaleDensity, variables: dict):
    """The model's blocks in order, grouped per scale, and the distinct block templates."""
    bound = model.bind(variables)
    templates: list[nn.Module] = []
    scales: list[list[_Block]] = []
    for i in range(len(model.blocks_per_scale)):
        scale = bound.scales[i]
        groups = []   # (path, module, stacked length or None)
        name = f"scales_{i}"
        if isinstance(scale, flow.Chain):
            first = scale.layers[0]
            groups.append(((name, "layers_0"), first, None))
            if len(scale.layers) > 1:
                stack = scale.layers[1]
                groups.append(((name, "layers_1", "block"), stack.block, stack.n))
        elif isinstance(scale, flow.BlockStack):
            groups.append(((name, "block"), scale.block, scale.n))
        else:
            raise TypeError(f"staged gradients do not know scale {i} of type "
                            f"{type(scale).__name__}")
        blocks = []
        for path, module, n in groups:
            templates.append(module.clone(parent=None))
            kind = len(templates) - 1
            if n is None:
                blocks.append(_Block(path, None, kind))
            else:
                blocks.extend(_Block(path, j, kind) for j in range(n))
        scales.append(blocks)
    return scales, templates


class StagedDensityGrad:
    """``(params, model_state, x, key) -> (loss, bits_per_dim, new_model_state, grads)``
    for ``MultiscaleDensity``: the mean bits/dim of ``x`` (already dequantized, in the
    model's input range), its per-example values, the updated ``"spectral"`` state and the
    gradient of the mean with respect to ``params``, computed block by block (module
    docstring).

    Args:
      model: the density model.
      n_bins: grey levels of the data (bits/dim).
      dim: the data's real number of dimensions ``D`` (default: the model's).
      save: what each block's forward program keeps for its pullback: ``"all"`` (its
        residuals; the fastest), ``"dots"`` (conv and matmul outputs) or ``"nothing"``
        (its inputs: the forward pass runs again in the pullback).
    """

    def __init__(self, model: density_lib.MultiscaleDensity, *, n_bins: int = 256,
                 dim: int = 0, save: str = "all"):
        if save not in _SAVE_POLICIES:
            raise ValueError(f"save must be one of {tuple(_SAVE_POLICIES)}, got {save!r}")
        self.save = save
        if not isinstance(model, density_lib.MultiscaleDensity):
            raise TypeError(f"staged gradients are built for MultiscaleDensity, got "
                            f"{type(model).__name__}")
        self.model = model
        self.n_bins = n_bins
        self.dim = dim or model.dim
        self._built = None
        plan = model._plan()
        self._squeeze_before = [bool(sq) for sq in model.squeeze]
        self._factored = [None if e["factored_shape"] is None else int(e["factored_shape"][-1])
                          for e in plan]

    # -- building ---------------------------------------------------------------------

    def _build(self, variables: dict):
        scales, templates = _plan_blocks(self.model, variables)
        collections = sorted(k for k in variables if k != "params")
        prior = self.model.bind(variables).prior.clone(parent=None)

        def block_apply(template, p_group, s_group, j, key, k, h):
            """Block ``j`` of its group (``None``: an unstacked group), block ``k`` of the
            model: ``((y, log_det), new state of the block)``."""
            def take(a):
                return a if j is None else a[j]

            p = jax.tree_util.tree_map(take, p_group)
            s = {c: jax.tree_util.tree_map(take, s_group[c]) for c in collections}
            return template.apply({"params": p, **s}, h, train=True, mutable=collections,
                                  rngs={"logdet": jax.random.fold_in(key, k)})

        def put(s_group, j, new):
            """The group's state with block ``j``'s new state in place."""
            if j is None:
                return {c: new[c] for c in collections}
            return {c: jax.tree_util.tree_map(lambda a, b: a.at[j].set(b), s_group[c], new[c])
                    for c in collections}

        def make_block(template):
            """The block's function ``(y, log_det, updated group state)`` and its jitted
            forward program, which also returns the pullback."""
            def apply(p_group, s_group, j, key, k, h):
                (y, ld), new = block_apply(template, p_group, s_group, j, key, k, h)
                return y, ld, put(s_group, j, new)

            def forward(p_group, s_group, j, key, k, h):
                """``(y, log_det, updated group state, pullback)``; the pullback maps
                ``(dy, dlog_det)`` to the gradient of the group's (stacked) parameters and
                ``dh``."""
                def f(p_group, h):
                    return block_apply(template, p_group, s_group, j, key, k, h)

                if self.save != "all":
                    f = jax.checkpoint(f, prevent_cse=False, policy=_SAVE_POLICIES[self.save])
                (y, ld), vjp, new = jax.vjp(f, p_group, h, has_aux=True)
                return y, ld, put(s_group, j, new), vjp
            return apply, jax.jit(forward)

        def enter(h, i):
            return layers.squeeze(h) if self._squeeze_before[i] else h

        def head(x):
            return enter(layers.squeeze(x) if self.model.initial_squeeze else x, 0)

        def make_transition(i):
            """Factor out after scale ``i``, then squeeze for scale ``i + 1``."""
            def f(h):
                if self._factored[i] is None:
                    return enter(h, i + 1), None
                keep = h.shape[-1] - self._factored[i]
                return enter(h[..., :keep], i + 1), h[..., keep:]

            def forward(h):
                (h_next, z), vjp = jax.vjp(f, h)
                return h_next, z, vjp
            return f, jax.jit(forward)

        def tail_loss(prior_params, zs, h, log_dets):
            batch = h.shape[0]
            z = jnp.concatenate([a.reshape(batch, -1) for a in zs] + [h.reshape(batch, -1)],
                                axis=-1)
            log_prob = prior.apply({"params": prior_params}, z) + sum(log_dets)
            bpd = density_lib.bits_per_dim(log_prob, self.dim, self.n_bins)
            return jnp.mean(bpd), bpd

        self._built = dict(
            treedef=jax.tree_util.tree_structure(variables),
            scales=scales,
            # (function, jitted program) pairs; the programs of blocks and transitions
            # also return their pullbacks.
            head=(head, jax.jit(head)),
            blocks=[make_block(t) for t in templates],
            transitions=[make_transition(i) for i in range(len(scales) - 1)],
            tail_loss=tail_loss,
            tail=jax.jit(jax.value_and_grad(tail_loss, argnums=(0, 1, 2, 3), has_aux=True)),
        )

    # -- running ----------------------------------------------------------------------

    def _prepared(self, params, model_state: dict, x: Array) -> dict:
        variables = {"params": params, **model_state}
        if tuple(x.shape[1:]) != tuple(int(s) for s in self.model.input_shape):
            raise ValueError(f"this model was built for inputs of shape "
                             f"{tuple(self.model.input_shape)}, got {tuple(x.shape[1:])}")
        if (self._built is None
                or self._built["treedef"] != jax.tree_util.tree_structure(variables)):
            self._build(variables)
        return self._built

    def _forward(self, b: dict, params, model_state: dict, x: Array, key: Array,
                 staged: bool):
        """The forward pass up to the prior: ``(h, zs, log_dets, group_state, tape)``.
        ``staged``: through the jitted programs, with every block's and transition's
        pullback on the tape (``(block or None, pullback)`` in order); otherwise through
        the same functions, to be traced at once (empty tape)."""
        which = 1 if staged else 0
        group_state = {}   # per group of blocks (one path): its state as blocks update it
        tape, zs, log_dets = [], [], []
        h = b["head"][which](x)
        k = 0
        for i, scale in enumerate(b["scales"]):
            for blk in scale:
                if blk.path not in group_state:
                    group_state[blk.path] = {c: _get(model_state[c], blk.path)
                                             for c in model_state}
                out = b["blocks"][blk.kind][which](
                    _get(params, blk.path), group_state[blk.path], blk.index, key, k, h)
                h, ld, group_state[blk.path] = out[:3]
                if staged:
                    tape.append((blk, out[3]))
                log_dets.append(ld)
                k += 1
            if i < len(b["transitions"]):
                out = b["transitions"][i][which](h)
                h, z = out[:2]
                if staged:
                    tape.append((None, out[2]))
                zs.append(z)
        return h, zs, log_dets, group_state, tape

    def loss(self, params, model_state: dict, x: Array, key: Array):
        """The function whose value and gradient ``__call__`` computes, in one trace
        (a reference; differentiate or jit it like any loss): ``(mean bits/dim,
        (bits_per_dim, new_model_state))``, same probes as ``__call__``."""
        b = self._prepared(params, model_state, x)
        h, zs, log_dets, group_state, _ = self._forward(b, params, model_state, x, key,
                                                        staged=False)
        mean, bpd = b["tail_loss"](params.get("prior", {}), [z for z in zs if z is not None], h,
                                   log_dets)
        return mean, (bpd, _state_tree(group_state, model_state))

    def __call__(self, params, model_state: dict, x: Array, key: Array):
        b = self._prepared(params, model_state, x)
        h, zs, log_dets, group_state, tape = self._forward(b, params, model_state, x, key,
                                                           staged=True)
        (loss, bpd), (g_prior, g_zs, g_h, g_lds) = b["tail"](
            params.get("prior", {}), [z for z in zs if z is not None], h, log_dets)
        grads = {"prior": g_prior} if "prior" in params else {}   # learn_prior=False: none
        # Gradient accumulators per group start as zeros from the host (no program).
        z_i = len(zs)
        k = len(log_dets)
        for blk, vjp in reversed(tape):
            if blk is None:
                z_i -= 1
                g_z = None
                if zs[z_i] is not None:
                    g_z = g_zs[sum(z is not None for z in zs[:z_i])]
                (g_h,) = _pullback_jit(vjp, (g_h, g_z))
                continue
            k -= 1
            try:
                acc = _get(grads, blk.path)
            except KeyError:
                acc = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                             _get(params, blk.path))
            acc, g_h = _accumulate_jit(vjp, (g_h, g_lds[k]), acc)
            _set(grads, blk.path, acc)
        return loss, bpd, _state_tree(group_state, model_state), grads


@functools.lru_cache(maxsize=16)
def staged_density_grad(model: density_lib.MultiscaleDensity, *, n_bins: int = 256,
                        dim: int = 0, save: str = "all") -> StagedDensityGrad:
    """A ``StagedDensityGrad``, cached on the (hashable) model and settings, so that train
    steps built twice for one model share its compiled programs."""
    return StagedDensityGrad(model, n_bins=n_bins, dim=dim, save=save)


def make_staged_train_step(model: density_lib.MultiscaleDensity, *, n_bins: int = 256,
                           dim: int = 0) -> Callable[[TrainState, dict], tuple[TrainState,
                                                                               dict]]:
    """A density training step like ``steps.make_train_step(model, "density", ...)``
    (same dequantization, loss, metrics and optimizer update) with the gradient of
    ``StagedDensityGrad``. Call it directly, not under ``jax.jit``; the state is donated
    to the update."""
    grad_fn = staged_density_grad(model, n_bins=n_bins, dim=dim)

    @jax.jit
    def prepare(state: TrainState, batch: dict):
        k_deq, k_ld = jax.random.split(state.step_key())
        return density_lib.dequantize(k_deq, batch["image"], n_bins), k_ld

    @functools.partial(jax.jit, donate_argnums=(0,))
    def update(state: TrainState, grads, new_state, loss, bpd):
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "bits_per_dim": jnp.mean(bpd)}
        return state.apply_gradients(grads, model_state={**state.model_state,
                                                         **new_state}), metrics

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        x, key = prepare(state, batch)
        loss, bpd, new_state, grads = grad_fn(state.params, state.model_state, x, key)
        return update(state, grads, new_state, loss, bpd)

    step.grad_fn = grad_fn
    return step
