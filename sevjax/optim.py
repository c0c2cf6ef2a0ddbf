"""Optimizer, learning-rate schedule and exact gradient accumulation.

AdamW (optax) after global-norm clipping, with weight decay only on 2-D ``kernel`` matrices (norms,
biases and embeddings are left alone). Parameters and optimizer state are float32 whatever the
compute dtype of the model, so bf16 compute keeps float32 master weights.

Gradient accumulation is exact: each micro-batch contributes the *numerator* of the loss (sums from
``sevjax.loss``'s ``aux``) and its gradient; the denominators (token count, weight sum or number of
sequences) are added up too, and only the totals are divided, so A micro-batches of B rows give the
same loss and gradient as one batch of A*B rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sevjax.config import OptimSection
from sevjax.loss import loss_from_sums

# aux keys summed into the loss numerator under each normalization (see sevjax.loss.loss_from_sums)
NUMERATOR_KEYS = {
    "tokens": ("weighted_nll_sum", "z_loss_sum"),
    "weighted": ("weighted_nll_sum", "z_loss_sum"),
    "sequence": ("sequence_loss_sum",),
}


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``cfg.lr``, then cosine / linear decay to ``lr * min_lr_ratio`` (or constant).

    Warmup step ``s`` (0-based) uses ``lr * (s + 1) / warmup_steps``, so no update is wasted at 0.

    Args:
        cfg: the optimizer section.
        total_steps: the number of optimizer steps of the run.

    Returns:
        ``step -> lr`` (float32 scalar).
    """
    lr, warmup = cfg.lr, cfg.warmup_steps
    end = lr * cfg.min_lr_ratio
    span = max(total_steps - warmup - 1, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warmup) / span, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decayed = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        elif cfg.schedule == "linear":
            decayed = lr + (end - lr) * t
        else:
            decayed = jnp.full_like(t, lr)
        if warmup == 0:
            return decayed
        return jnp.where(step < warmup, lr * (step + 1.0) / warmup, decayed)

    return schedule


def decay_mask(params: Any) -> Any:
    """``True`` for leaves that get weight decay: 2-D (or more) leaves named ``kernel``."""

    def one(path: tuple[Any, ...], x: Any) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name == "kernel" and len(x.shape) >= 2

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(
    cfg: OptimSection, total_steps: int, params: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with clipping, the schedule and the decay mask.

    Args:
        cfg: the optimizer section.
        total_steps: optimizer steps of the run (for the schedule).
        params: the parameter tree (arrays or ``ShapeDtypeStruct``), for the decay mask.

    Returns:
        ``(tx, schedule)``.
    """
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask(params),
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw), schedule
    return adamw, schedule


def opt_state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, replicated: Any
) -> Any:
    """Shardings of ``tx.init(params)``: moments follow their parameter, counters are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


def accumulate_gradients(
    aux_fn: Callable[[Any, Any], dict[str, jax.Array]],
    params: Any,
    micro_batches: Any,
    *,
    normalize: str,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Exact loss and gradient of a batch split into micro-batches (``lax.scan`` over axis 0).

    Args:
        aux_fn: ``(params, micro_batch) -> aux`` dict of float32 sums (``sevjax.loss`` aux keys,
            plus any extra summable metrics).
        params: parameter tree (float32).
        micro_batches: tree of arrays ``[A, ...]``; the scan runs over A.
        normalize: the loss normalization, a key of :data:`NUMERATOR_KEYS`.

    Returns:
        ``(loss, aux, grads)``: the whole batch's loss (``loss_from_sums`` of the summed aux), the
        summed aux, and the gradient of the loss (float32, like ``params``).
    """
    keys = NUMERATOR_KEYS[normalize]

    def loss_fn(p: Any, mb: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        aux = aux_fn(p, mb)
        return sum(aux[k] for k in keys), aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, mb):
        grad_sum, aux_sum = carry
        (_, aux), grads = grad_fn(params, mb)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
        return (grad_sum, aux_sum), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    aux_zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: aux_fn(params, first)))
    (grad_sum, aux), _ = jax.lax.scan(body, (zeros, aux_zero), micro_batches)
    loss = loss_from_sums(aux, normalize=normalize)
    # The loss is linear in its numerator with a data-only denominator: d loss / d numerator.
    scale = jax.grad(lambda n: loss_from_sums({**aux, keys[0]: n}, normalize=normalize))(
        aux[keys[0]]
    )
    grads = jax.tree.map(lambda g: g * scale, grad_sum)
    return loss, aux, grads
