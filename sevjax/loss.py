"""Severity-weighted token cross-entropy: pure functions, float32 math, exact sums.

The method (arXiv 2604.06346) scales each example's token cross-entropy by a weight derived from
its severity probabilities ``p = (p_mild, p_moderate, p_critical)``: the expected class weight
``w_b = sum_k p[b, k] * class_weights[k]``. Prompt and padding tokens carry no loss (mask 0).

Every loss returns ``(loss, aux)``. ``aux`` holds the sums behind the loss (numerators and
denominators), so a caller that splits a batch over micro-batches or devices adds the ``aux``
dicts and calls :func:`loss_from_sums` to get exactly the whole batch's loss.

Labels are aligned with the logits: ``labels[b, t]`` is the target of ``logits[b, t]`` (the
caller shifts). Label ids outside ``[0, V)`` are allowed at masked positions only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

SEVERITIES = ("mild", "moderate", "critical")
NORMALIZATIONS = ("tokens", "weighted", "sequence")
PRESETS = ("uniform", "linear", "balanced")
_WEIGHT_EPS = 1e-8


def _check_same(name_a: str, a: tuple, name_b: str, b: tuple) -> None:
    if tuple(a) != tuple(b):
        raise ValueError(f"shape mismatch: {name_a} {tuple(a)} vs {name_b} {tuple(b)}")


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood, computed stably in float32.

    Args:
        logits: ``[B, T, V]`` any float dtype.
        labels: ``[B, T]`` integer ids.

    Returns:
        ``[B, T]`` float32 ``logsumexp(logits) - logits[label]``.
    """
    return _nll_and_lse(logits, labels)[0]


def _nll_and_lse(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    _check_same("logits[..., :-1]", logits.shape[:-1], "labels", labels.shape)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    label_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return lse - label_logit, lse


def severity_weights(probs: jax.Array, class_weights: jax.Array) -> jax.Array:
    """Expected class weight per example: ``sum_k probs[b, k] * class_weights[k]``.

    Args:
        probs: ``[B, K]`` severity probabilities (rows on the simplex).
        class_weights: ``[K]`` positive weights, in the order of :data:`SEVERITIES`.

    Returns:
        ``[B]`` float32 weights.
    """
    probs = jnp.asarray(probs, jnp.float32)
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if probs.ndim != 2 or class_weights.ndim != 1:
        raise ValueError(
            f"expected probs [B, K] and class_weights [K], got {probs.shape} and "
            f"{class_weights.shape}"
        )
    _check_same("probs[:, K]", probs.shape[1:], "class_weights", class_weights.shape)
    return probs @ class_weights


def class_weights(
    preset: str | Sequence[float],
    *,
    class_frequencies: Sequence[float] | None = None,
    num_classes: int = 3,
) -> np.ndarray:
    """Per-class loss weights in the order mild, moderate, critical.

    Presets:
        ``"uniform"``: ``(1, 1, 1)``; the severity-weighted loss then equals plain CE.
        ``"linear"``: ``(1, 1.5, 2)``: each step up in severity adds half the mild weight.
        ``"balanced"``: inverse class frequency normalized to mean 1, the scikit-learn
            ``class_weight="balanced"`` rule ``n / (K * n_k)`` rescaled. ``class_frequencies`` is
            the training set's soft label mass per class (the column sums of the probabilities).
            This is our reading of the paper's unpublished "balanced weighting configuration".
        A sequence of ``K`` positive numbers is used as given (explicit weights from config).

    Returns:
        ``[K]`` float32 NumPy array.

    Raises:
        ValueError: unknown preset, missing or non-positive frequencies, non-positive weights.
    """
    if not isinstance(preset, str):
        weights = np.asarray(preset, np.float32)
        if weights.shape != (num_classes,) or not np.all(weights > 0):
            raise ValueError(
                f"explicit class weights must be {num_classes} positive numbers, got {preset}"
            )
        return weights
    if preset == "uniform":
        return np.ones(num_classes, np.float32)
    if preset == "linear":
        return (1.0 + 0.5 * np.arange(num_classes)).astype(np.float32)
    if preset == "balanced":
        if class_frequencies is None:
            raise ValueError(
                'class_weights("balanced") needs class_frequencies (soft label mass per class)'
            )
        freq = np.asarray(class_frequencies, np.float64)
        if freq.shape != (num_classes,) or not np.all(freq > 0):
            raise ValueError(
                f"class_frequencies must be {num_classes} positive numbers, got {class_frequencies}"
            )
        inverse = freq.sum() / (num_classes * freq)
        return (inverse / inverse.mean()).astype(np.float32)
    raise ValueError(f"unknown class-weight preset {preset!r}; choose one of {PRESETS} or a list")


def _token_weights(weights: jax.Array, shape: tuple[int, int]) -> jax.Array:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim == 1:
        _check_same("weights", weights.shape, "labels[:, 0]", shape[:1])
        return jnp.broadcast_to(weights[:, None], shape)
    _check_same("weights", weights.shape, "labels", shape)
    return weights


def _reduce(
    nll: jax.Array,
    lse: jax.Array,
    loss_mask: jax.Array,
    weights: jax.Array,
    normalize: str,
    z_loss: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Turns per-token ``nll``/``lse`` ``[B, T]`` into the loss and its sums."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize={normalize!r}; choose one of {NORMALIZATIONS}")
    _check_same("loss_mask", loss_mask.shape, "labels", nll.shape)
    mask = loss_mask.astype(jnp.float32)
    w = _token_weights(weights, nll.shape) * mask
    per_token = nll + z_loss * jnp.square(lse) if z_loss else nll
    seq_tokens = mask.sum(axis=1)
    aux = {
        "nll_sum": jnp.sum(mask * nll),
        "weighted_nll_sum": jnp.sum(w * nll),
        "z_loss_sum": jnp.sum(w * (per_token - nll)),
        "token_count": jnp.sum(mask),
        "weight_sum": jnp.sum(w),
        "sequence_loss_sum": jnp.sum(jnp.sum(w * per_token, axis=1) / jnp.maximum(seq_tokens, 1.0)),
        "sequence_count": jnp.sum((seq_tokens > 0).astype(jnp.float32)),
    }
    return loss_from_sums(aux, normalize=normalize), aux


def loss_terms(
    aux: dict[str, jax.Array], *, normalize: str = "tokens"
) -> tuple[jax.Array, jax.Array]:
    """``(numerator, denominator)`` of the loss from (possibly summed) ``aux`` dicts.

    The numerator is a sum over tokens (or sequences), so it adds up across micro-batches and
    shards; the denominator depends on the data only (counts, weights). Their ratio is
    :func:`loss_from_sums`, and the gradient of the whole batch's loss is the summed gradient of
    the numerators divided by the denominator (how a trainer accumulates exactly).

    ``"tokens"``: ``sum(w*m*l) / max(sum(m), 1)``; ``"weighted"``: ``sum(w*m*l) / max(sum(w*m),
    eps)``; ``"sequence"``: mean over sequences with at least one loss token of
    ``sum_t(w*m*l) / sum_t(m)``. ``l`` is the token NLL plus the z-loss term.
    """
    weighted = aux["weighted_nll_sum"] + aux["z_loss_sum"]
    if normalize == "tokens":
        return weighted, jnp.maximum(aux["token_count"], 1.0)
    if normalize == "weighted":
        return weighted, jnp.maximum(aux["weight_sum"], _WEIGHT_EPS)
    if normalize == "sequence":
        return aux["sequence_loss_sum"], jnp.maximum(aux["sequence_count"], 1.0)
    raise ValueError(f"unknown normalize={normalize!r}; choose one of {NORMALIZATIONS}")


def loss_from_sums(aux: dict[str, jax.Array], *, normalize: str = "tokens") -> jax.Array:
    """The loss from (possibly summed) ``aux`` dicts: the ratio of :func:`loss_terms`."""
    numerator, denominator = loss_terms(aux, normalize=normalize)
    return numerator / denominator


def severity_weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    weights: jax.Array,
    *,
    normalize: str = "tokens",
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token cross-entropy scaled by a per-example (or per-token) severity weight.

    With ``weights`` all ones and ``normalize="tokens"`` this is exactly the masked token-mean
    cross-entropy. Under ``"tokens"`` an all-mild batch pushes less than an all-critical one, which
    is the point of the method; ``"weighted"`` divides that away (T5X / flax lm1b convention).

    Args:
        logits: ``[B, T, V]`` any float dtype; math is float32.
        labels: ``[B, T]`` integer targets aligned with ``logits``.
        loss_mask: ``[B, T]`` 1 where a token carries loss, 0 for prompt and padding.
        weights: ``[B]`` per-example or ``[B, T]`` per-token weights (packed rows).
        normalize: ``"tokens"``, ``"weighted"`` or ``"sequence"``; see :func:`loss_from_sums`.
        z_loss: coefficient of ``logsumexp(logits)**2`` added to each token's loss.

    Returns:
        ``(loss, aux)``: scalar float32 loss and a dict of float32 sums (``nll_sum``,
        ``weighted_nll_sum``, ``z_loss_sum``, ``token_count``, ``weight_sum``,
        ``sequence_loss_sum``, ``sequence_count``).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {logits.shape}")
    nll, lse = _nll_and_lse(logits, labels)
    return _reduce(nll, lse, loss_mask, weights, normalize, z_loss)


def chunked_severity_weighted_cross_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int,
    normalize: str = "tokens",
    z_loss: float = 0.0,
    transpose_head: bool = False,
    logit_softcap: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`severity_weighted_cross_entropy` from hidden states, never building ``[B, T, V]``.

    The forward pass walks over chunks of ``chunk_size`` tokens and keeps only the per-token
    log-partition ``[B*T]``. The backward pass walks over slices of the vocabulary, recomputing
    each slice's logits for all tokens, and writes each slice of the head's gradient once, in the
    head's dtype, so no float32 ``[D, V]`` accumulator exists; the only float32 accumulator is
    the hidden-state gradient ``[B*T, D]``.

    Args:
        hidden: ``[B, T, D]`` final hidden states.
        lm_head: ``[D, V]`` output projection, or the tied embedding ``[V, D]`` with
            ``transpose_head=True``.
        labels, loss_mask, weights, normalize, z_loss: as in
            :func:`severity_weighted_cross_entropy`.
        chunk_size: tokens per forward chunk; need not divide ``B*T``. The backward vocabulary
            slice holds about as many logits as one forward chunk.
        transpose_head: whether ``lm_head`` is ``[V, D]``.
        logit_softcap: the logits are ``cap * tanh(z / cap)`` of ``z = hidden @ lm_head``
            (Gemma's final-logit soft-capping), or None for ``z``.

    Returns:
        ``(loss, aux)`` as :func:`severity_weighted_cross_entropy`.
    """
    if hidden.ndim != 3 or lm_head.ndim != 2:
        raise ValueError(
            f"expected hidden [B, T, D] and lm_head 2-D, got {hidden.shape}, {lm_head.shape}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be positive or None, got {logit_softcap}")
    B, T, D = hidden.shape
    head_d = lm_head.shape[1] if transpose_head else lm_head.shape[0]
    if head_d != D:
        layout = "[V, D]" if transpose_head else "[D, V]"
        raise ValueError(
            f"lm_head {lm_head.shape} (layout {layout}) does not match hidden {hidden.shape}"
        )
    _check_same("hidden[:, :, 0]", (B, T), "labels", labels.shape)
    cap = None if logit_softcap is None else float(logit_softcap)
    nll, lse = _chunked_nll_lse(
        hidden.reshape(B * T, D), lm_head, labels.reshape(B * T), chunk_size, transpose_head, cap
    )  # (B*T,), (B*T,)
    return _reduce(nll.reshape(B, T), lse.reshape(B, T), loss_mask, weights, normalize, z_loss)


def _head_logits(h: jax.Array, w: jax.Array, transpose_head: bool) -> jax.Array:
    """``h [n, D]`` times a head slice (``[D, v]`` or ``[v, D]``) -> ``[n, v]`` float32."""
    spec = "nd,vd->nv" if transpose_head else "nd,dv->nv"
    return jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)  # (n, v)


def _capped(z: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """``(cap * tanh(z / cap), tanh(z / cap))``, or ``(z, None)`` without a cap."""
    if cap is None:
        return z, None
    t = jnp.tanh(z / cap)
    return cap * t, t


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_nll_lse(h, w, labels, chunk_size, transpose_head, cap):
    return _chunked_forward(h, w, labels, chunk_size, transpose_head, cap)[0]


def _chunked_forward(h, w, labels, chunk_size, transpose_head, cap):
    n, d = h.shape
    n_chunks = math.ceil(n / chunk_size)
    pad = n_chunks * chunk_size - n
    h_chunks = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, d)  # (C, c, D)
    label_chunks = jnp.pad(labels, (0, pad)).reshape(n_chunks, chunk_size)  # (C, c)

    def body(_, xs):
        h_c, y_c = xs
        logits = _capped(_head_logits(h_c, w, transpose_head), cap)[0]  # (c, V)
        lse = jax.nn.logsumexp(logits, axis=-1)
        safe = jnp.clip(y_c, 0, logits.shape[-1] - 1)
        label_logit = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
        return None, (lse - label_logit, lse)

    _, (nll, lse) = jax.lax.scan(body, None, (h_chunks, label_chunks))
    nll, lse = nll.reshape(-1)[:n], lse.reshape(-1)[:n]  # (N,), (N,)
    return (nll, lse), (h, w, labels, lse)


def _chunked_backward(chunk_size, transpose_head, cap, residuals, cotangents):
    h, w, labels, lse = residuals
    g_nll, g_lse = cotangents
    n, _ = h.shape
    vocab = w.shape[0] if transpose_head else w.shape[1]
    v_chunk = max(1, min(vocab, (chunk_size * vocab) // max(n, 1)))
    n_full, tail = divmod(vocab, v_chunk)
    scale = (g_nll + g_lse).astype(jnp.float32)  # d/dlogits = scale * softmax - g_nll * onehot
    vocab_axis = 0 if transpose_head else 1

    def slice_grads(start, size):
        w_j = jax.lax.dynamic_slice_in_dim(w, start, size, axis=vocab_axis)  # (D, v) or (v, D)
        logits, t = _capped(_head_logits(h, w_j, transpose_head), cap)  # (N, v)
        probs = jnp.exp(logits - lse[:, None])
        onehot = labels[:, None] == start + jnp.arange(size)[None, :]
        d_logits = scale[:, None] * probs - jnp.where(onehot, g_nll[:, None], 0.0)  # (N, v)
        if t is not None:  # d(cap * tanh(z / cap)) / dz
            d_logits = d_logits * (1.0 - jnp.square(t))
        if transpose_head:
            d_w = jnp.einsum("nv,nd->vd", d_logits, h, preferred_element_type=jnp.float32)
            d_h = jnp.einsum("nv,vd->nd", d_logits, w_j, preferred_element_type=jnp.float32)
        else:
            d_w = jnp.einsum("nd,nv->dv", h, d_logits, preferred_element_type=jnp.float32)
            d_h = jnp.einsum("nv,dv->nd", d_logits, w_j, preferred_element_type=jnp.float32)
        return d_w.astype(w.dtype), d_h  # (v, D) or (D, v); (N, D)

    def body(j, carry):
        d_w, d_h = carry
        start = j * v_chunk
        d_w_j, d_h_j = slice_grads(start, v_chunk)
        d_w = jax.lax.dynamic_update_slice_in_dim(d_w, d_w_j, start, axis=vocab_axis)
        return d_w, d_h + d_h_j

    init = (jnp.zeros_like(w), jnp.zeros(h.shape, jnp.float32))
    d_w, d_h = jax.lax.fori_loop(0, n_full, body, init)
    if tail:
        start = n_full * v_chunk
        d_w_j, d_h_j = slice_grads(start, tail)
        d_w = jax.lax.dynamic_update_slice_in_dim(d_w, d_w_j, start, axis=vocab_axis)
        d_h = d_h + d_h_j
    return d_h.astype(h.dtype), d_w, None


_chunked_nll_lse.defvjp(_chunked_forward, _chunked_backward)


def validate_severity_probs(probs: np.ndarray, num_classes: int = 3) -> np.ndarray:
    """Checks severity probabilities at data-preparation time (NumPy; never inside ``jit``).

    Args:
        probs: ``[N, K]`` array-like of per-example class probabilities.
        num_classes: expected ``K``.

    Returns:
        The probabilities as a float32 ``[N, K]`` array.

    Raises:
        ValueError: naming the offending rows (0-based) and the reason: wrong shape or number of
            classes, NaN/inf, negative values, or rows not summing to 1 within 1e-3.
    """
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != num_classes:
        raise ValueError(
            f"severity probabilities must have shape [N, {num_classes}], got {arr.shape}"
        )
    problems = []
    for reason, bad in (
        ("NaN or inf", ~np.isfinite(arr).all(axis=1)),
        ("negative value", (arr < 0).any(axis=1)),
        ("row sum not 1 within 1e-3", np.abs(arr.sum(axis=1) - 1.0) > 1e-3),
    ):
        rows = np.flatnonzero(bad)
        if rows.size:
            shown = ", ".join(map(str, rows[:10])) + (" ..." if rows.size > 10 else "")
            problems.append(f"{reason} in {rows.size} row(s): {shown}")
    if problems:
        raise ValueError("invalid severity probabilities: " + "; ".join(problems))
    return arr.astype(np.float32)
