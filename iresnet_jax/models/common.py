"""Stacks of i-ResNet blocks, shared by the image models."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from iresnet_jax import flow


def block_stack(make_block: Callable[[bool], nn.Module], n: int, *,
                first_without_activation: bool, remat: bool = False, unroll: int = 1,
                hoist: bool = True) -> nn.Module:
    """``n`` blocks ``make_block(leading_activation)`` as one ``nn.scan``; a network's
    first block (no leading activation) runs on its own before the scanned rest."""
    if n < 1:
        raise ValueError(f"a stage needs at least one block, got {n}")

    def stack(count: int) -> nn.Module:
        return flow.BlockStack(make_block(True), n=count, remat=remat,
                               unroll=min(unroll, count), hoist=hoist)

    if not first_without_activation:
        return stack(n)
    first = make_block(False)
    return flow.Chain([first] if n == 1 else [first, stack(n - 1)])
