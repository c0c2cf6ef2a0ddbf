"""Optimizer and learning-rate schedule.

AdamW (optax) after global-norm clipping, with weight decay only on 2-D ``kernel`` matrices (norms,
biases and embeddings are left alone). Parameters and optimizer state are float32 whatever the
compute dtype of the model, so bf16 compute keeps float32 master weights. (Exact gradient
accumulation is part of the train step, in :mod:`sevjax.trainer`.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sevjax.schema import OptimSection


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
