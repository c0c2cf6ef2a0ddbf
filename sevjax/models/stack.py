"""A stack of L identical blocks, unrolled or scanned, with per-block rematerialization.

:func:`make_layers` builds the stack once from a ``make_block(rngs)`` factory:

- unscanned: ``nnx.List`` of L blocks; parameter paths ``layers.{i}.<block path>``;
- scanned (``ModelOptions.scan_layers``): ONE block created under ``nnx.vmap`` (with the RNG
  streams split L ways), so every parameter gets a leading dimension L whose logical axis name
  ``layers`` is added to its ``axes`` metadata; paths ``layers.<block path>``, shape [L, ...].

:func:`run_layers` applies them with the same block call convention either way::

    block(x, ctx, cache, layer) -> (x, cache)

``x`` [B, T, D] is the carry; ``ctx`` a pytree every layer sees (positions, attention mask);
``cache`` this layer's KV cache or None; ``layer`` the layer index (a Python int when unrolled, a
traced int32 when scanned, so per-layer constants must be computed from it with ``jnp``).
Scanned, ``nnx.scan`` slices the parameters, RNG streams and a cache stacked [L, ...] along the
leading axis; compile time no longer grows with depth. ``remat`` wraps each block in
``nnx.remat`` with the policy of :func:`sevjax.models.options.remat_policy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models.options import ModelOptions, remat_policy
from sevjax.sharding import constrain

# vmap/scan add or remove the leading axis in the "axes" metadata of every parameter.
LAYER_AXIS = {nnx.PARTITION_NAME: "layers", "axes": "layers"}


def make_layers(
    make_block: Callable[[nnx.Rngs], nnx.Module],
    num_layers: int,
    *,
    options: ModelOptions,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """L blocks: an ``nnx.List`` (unscanned) or one vmapped block with a leading ``layers`` axis.

    Args:
        make_block: builds one block from an ``nnx.Rngs``.
        num_layers: L.
        options: ``scan_layers`` selects the layout.
        rngs: the model's RNG streams (split L ways when scanned).
    """
    if not options.scan_layers:
        return nnx.List([make_block(rngs) for _ in range(num_layers)])
    return stacked(make_block, num_layers, rngs)


def stacked(
    make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
) -> nnx.Module:
    """One module created under ``nnx.vmap``: every variable [L, ...] with a ``layers`` axis
    (RNG streams split L ways); also how LoRA adapters of a scanned stack are made."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_AXIS)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make_block(rngs)

    return create(rngs)


def is_scanned(layers: nnx.Module) -> bool:
    """True for a stack built with ``scan_layers``."""
    return not isinstance(layers, nnx.List)


def num_layers(layers: nnx.Module) -> int:
    """L, the number of blocks of a stack."""
    if not is_scanned(layers):
        return len(layers)
    return jax.tree.leaves(nnx.state(layers, nnx.Param))[0].shape[0]


def run_layers(
    layers: nnx.Module,
    x: jax.Array,
    ctx: Any,
    *,
    options: ModelOptions,
    cache: Any = None,
    collect: bool = False,
) -> tuple[jax.Array, Any, Any]:
    """Applies the blocks in order.

    Args:
        layers: from :func:`make_layers` with the same ``options``.
        x: [B, T, D] input of the first block.
        ctx: pytree passed unchanged to every block.
        options: ``remat`` and ``grad_barrier`` apply here.
        cache: None; unscanned a list of per-layer caches; scanned one pytree stacked [L, ...].
        collect: also return every block's output.

    Returns:
        (x [B, T, D], updated cache (same layout) or None, outputs or None). Outputs are a list of
        L arrays [B, T, D] unscanned and one [L, B, T, D] array scanned.
    """
    policy = remat_policy(options.remat)
    scanned = is_scanned(layers)

    def call(block, x, ctx, c, layer):
        x, c = block(x, ctx, c, layer)
        return constrain(x, ("batch", "seq", "embed")), c

    if options.remat != "none":
        call = nnx.remat(call, policy=policy, prevent_cse=not scanned, graph_updates=False)
    if scanned:
        # graph_updates=False: the simple (tree) scan, which also accepts a model merged at an
        # outer trace level (e.g. outside a lax.while_loop / lax.scan that calls it).
        @nnx.scan(
            in_axes=(nnx.Carry, 0, None, 0, 0), out_axes=(nnx.Carry, 0, 0), graph_updates=False
        )
        def step(x, block, ctx, c, layer):
            x, c = call(block, x, ctx, c, layer)
            return x, c, (x if collect else None)

        x, cache, outs = step(
            x, layers, ctx, cache, jnp.arange(num_layers(layers), dtype=jnp.int32)
        )
        return x, cache, outs
    outs, new_cache = [], []
    for i, block in enumerate(layers):
        x, c = call(block, x, ctx, None if cache is None else cache[i], i)
        if options.grad_barrier:
            x = grad_barrier(x)
        new_cache.append(c)
        outs.append(x)
    return x, (new_cache if cache is not None else None), (outs if collect else None)


def grad_barrier(x: jax.Array) -> jax.Array:
    """Identity whose backward pass materializes the incoming gradient once (XLA:CPU only).

    In an unrolled stack of residual blocks, XLA:CPU fuses the running sum of the residual
    gradients of all the layers above into every consumer of each layer's gradient, work
    quadratic in depth, and it drops ``lax.optimization_barrier`` before fusing. A ``lax.cond``
    on a predicate it cannot fold is a boundary fusion does not cross. Other backends get ``x``
    unchanged (a conditional would synchronize a GPU stream). Applied between unrolled blocks by
    :func:`run_layers` when ``ModelOptions.grad_barrier`` is set; a scanned stack needs none.

    Args:
        x: the residual stream [B, T, D] between blocks.

    Returns:
        ``x``.
    """
    if jax.default_backend() != "cpu":
        return x
    return _cond_barrier(x)


@jax.custom_vjp
def _cond_barrier(x):
    return x


def _cond_barrier_fwd(x):
    return x, None


def _cond_barrier_bwd(_, g):
    keep = jnp.isfinite(g.reshape(-1)[0])  # data-dependent: XLA cannot fold the branch away
    return (jax.lax.cond(keep, lambda v: v, lambda v: v * 1, g),)


_cond_barrier.defvjp(_cond_barrier_fwd, _cond_barrier_bwd)
