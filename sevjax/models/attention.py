"""Attention: one mask description, several kernels, and the rule that picks one per call.

A model builds one :class:`AttentionMask` per forward pass (outside the layer loop) and every
attention layer calls :func:`attend`. The mask carries both the dense boolean mask (always
valid) and the structure kernels need (causal or not, sliding window, per-key segment ids), so
each kernel expresses the same mask its own way:

- "reference": today's einsum path with a float32 softmax, the parity baseline;
- "xla": ``jax.nn.dot_product_attention(implementation="xla")`` with the dense mask;
- "cudnn": ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention,
  ``is_causal`` / ``local_window_size`` when the mask is aligned self-attention, and the dense
  mask (which cuDNN turns into an additive bias) for padding and packed segments;
- "splash": the Pallas TPU kernel with a causal / local / full static mask and segment ids
  (padding = segment 0), under ``shard_map`` when a mesh is active.

:func:`select_implementation` is a pure function of the request, the target backend, dtype and
shapes (tested without accelerators). Fallbacks go to "xla", or to "reference" when attention
probabilities need dropout (BERT training) or the scores are soft-capped (Gemma 2,
``cap * tanh(s / cap)``), which ``jax.nn.dot_product_attention`` (xla, cudnn) cannot apply; splash
applies the cap itself.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sevjax.models.options import ATTENTION_IMPLEMENTATIONS

log = logging.getLogger(__name__)
Dtype = Any
SPLASH_BLOCK = 128  # splash block sizes must be multiples of the 128 TPU lanes
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper+, but the conservative bound holds on every GPU


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("dense", "segments"),
    meta_fields=("causal", "window", "aligned", "implementation"),
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, plus the requested kernel.

    Attributes:
        dense: bool [B, 1, T, S] (or broadcastable), True = may attend. Always exact.
        segments: int [B, S] per-key segment id (0 = padding) for self-attention (T == S), or
          None. Query t has the segment of key t.
        causal: the mask includes "key index <= query index" (decoders).
        window: sliding window w (query sees keys ``q - w < k <= q``) or None.
        aligned: queries are the keys (self-attention over the whole sequence, no KV cache),
          so query t sits at key index t and kernels may build causal/local masks themselves.
        implementation: the requested kernel, one of ``ATTENTION_IMPLEMENTATIONS``.
    """

    dense: jax.Array
    segments: jax.Array | None
    causal: bool
    window: int | None
    aligned: bool
    implementation: str = "auto"


def target_backend() -> str:
    """Platform being compiled for: the active mesh's devices (AOT on a topology), else default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def select_implementation(
    requested: str,
    *,
    backend: str,
    dtype: Dtype,
    q_len: int,
    kv_len: int,
    head_dim: int,
    aligned: bool,
    dropout: bool = False,
    softcap: bool = False,
) -> tuple[str, str | None]:
    """The kernel that serves one attention call.

    Args:
        requested: one of ``ATTENTION_IMPLEMENTATIONS``.
        backend: target platform ("cpu", "gpu", "tpu").
        dtype: compute dtype of q/k/v.
        q_len: T. kv_len: S. head_dim: H.
        aligned: self-attention without a cache (see :class:`AttentionMask`).
        dropout: attention probabilities need dropout.
        softcap: the scores are soft-capped (only "reference" and "splash" apply a cap).

    Returns:
        (implementation, reason it differs from the request or None).

    Raises:
        ValueError: for an unknown request.
    """
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={requested!r}; allowed: {ATTENTION_IMPLEMENTATIONS}")
    if requested == "reference":
        return "reference", None
    if dropout:
        return "reference", "attention-probability dropout needs the reference path"
    impl, why = "xla", None
    if requested == "cudnn" or (requested == "auto" and backend == "gpu"):
        why = _cudnn_unsupported(backend, dtype, q_len, kv_len, head_dim)
        impl = "cudnn" if why is None else "xla"
    elif requested == "splash" or (requested == "auto" and backend == "tpu"):
        why = _splash_unsupported(backend, requested, q_len, kv_len, aligned)
        impl = "splash" if why is None else "xla"
    if softcap and impl != "splash":
        cap_why = f"logit soft-capping needs the reference path ({impl} has no soft-cap)"
        return "reference", cap_why if why is None else f"{why}; {cap_why}"
    return impl, why


def _cudnn_unsupported(backend, dtype, q_len, kv_len, head_dim) -> str | None:
    if backend != "gpu":
        return f"cuDNN needs a GPU target, not {backend}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention needs bfloat16/float16, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cuDNN needs a head dim that is a multiple of 8 and <= 128, not {head_dim}"
    if q_len % 2 or kv_len % 2:  # the mask becomes a bias, which needs even lengths
        return f"cuDNN with a mask needs even lengths, not T={q_len} S={kv_len}"
    return None


def _splash_unsupported(backend, requested, q_len, kv_len, aligned) -> str | None:
    if backend != "tpu" and not (backend == "cpu" and requested == "splash"):
        return f"splash is a TPU kernel (CPU: interpret mode, on request), target is {backend}"
    if not aligned or q_len != kv_len:
        return "splash serves self-attention without a KV cache only"
    if q_len % SPLASH_BLOCK:
        return f"splash needs a sequence length that is a multiple of {SPLASH_BLOCK}, not {q_len}"
    return None


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma's logit soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


@functools.cache
def _warn_once(requested: str, chosen: str, reason: str) -> None:
    log.warning("attention=%r falls back to %r: %s", requested, chosen, reason)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    dtype: Dtype = jnp.float32,
    scale: float | jax.Array | None = None,
    softcap: float | None = None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Multi-head / grouped-query attention through the kernel chosen for this call.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, K, H], N % K == 0.
        v: values [B, S, K, H].
        mask: the :class:`AttentionMask` of this forward pass.
        dtype: compute dtype; softmax statistics are float32 in every kernel.
        scale: score scale (a float, or a traced scalar), default ``1/sqrt(H)``.
        softcap: logit soft-cap: scaled scores become ``cap * tanh(s / cap)`` before the mask
          (Gemma 2); None for none.
        probs_dropout: an ``nnx.Dropout`` for the attention probabilities (BERT); when it is
          active the reference path is used.

    Returns:
        [B, T, N, H] in ``dtype``.
    """
    h = q.shape[-1]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    active = probs_dropout is not None and _dropout_active(probs_dropout)
    impl, why = select_implementation(
        mask.implementation,
        backend=target_backend(),
        dtype=dtype,
        q_len=q.shape[1],
        kv_len=k.shape[1],
        head_dim=h,
        aligned=mask.aligned,
        dropout=active,
        softcap=softcap is not None,
    )
    if why is not None and mask.implementation not in ("auto", impl):
        _warn_once(mask.implementation, impl, why)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if impl == "reference":
        return reference_attention(
            q, k, v, mask.dense, dtype=dtype, scale=scale, softcap=softcap,
            probs_dropout=probs_dropout,
        )  # fmt: skip
    if not isinstance(scale, float | int):  # fused kernels take a static scale
        q = (q * scale).astype(dtype)
        scale = 1.0
    if impl == "splash":
        from sevjax.models import splash

        return splash.splash_attention(
            q,
            k,
            v,
            mask.segments,
            causal=mask.causal,
            window=mask.window,
            scale=float(scale),
            softcap=softcap,
            interpret=target_backend() != "tpu",
        )
    local = (mask.window - 1, 0) if mask.window is not None and mask.aligned else None
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=jnp.broadcast_to(mask.dense, (q.shape[0], 1, q.shape[1], k.shape[1])),
        scale=float(scale),
        is_causal=impl == "cudnn" and mask.causal and mask.aligned,
        local_window_size=local if impl == "cudnn" else None,
        implementation=impl,
    )


def _dropout_active(dropout) -> bool:
    rate = getattr(dropout, "rate", 1.0)
    return not getattr(dropout, "deterministic", False) and rate > 0


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    dtype: Dtype = jnp.float32,
    scale: float | jax.Array | None = None,
    softcap: float | None = None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Multi-head attention with grouped KV heads and a float32 softmax (the parity baseline).

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, K, H] with N % K == 0 (K == N is plain multi-head attention).
        v: values [B, S, K, H].
        mask: bool [B, 1, T, S] (or broadcastable), True = may attend; None = attend everywhere.
          A row with no True entry gets uniform weights (never NaN).
        dtype: compute dtype of the two matmuls and the output.
        scale: score scale, default ``1/sqrt(H)``.
        softcap: scaled scores become ``softcap * tanh(s / softcap)`` before the mask, or None.
        probs_dropout: applied to the attention probabilities (BERT's attention dropout).

    Returns:
        [B, T, N, H] in ``dtype``.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"{n} query heads are not a multiple of {kh} kv heads")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q = q.astype(dtype).reshape(b, t, kh, n // kh, h)  # (B, T, K, G, H)
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", q, k.astype(dtype), preferred_element_type=jnp.float32
    )  # (B, K, G, T, S)
    scores = scores * jnp.asarray(scale, jnp.float32)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))[:, :, None]  # (B, 1, 1, T, S)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if probs_dropout is not None:
        probs = probs_dropout(probs)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(dtype))  # (B, T, K, G, H)
    return out.reshape(b, t, n, h)  # (B, T, N, H)


def causal_mask(
    key_valid: jax.Array,
    *,
    q_index: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    implementation: str = "auto",
) -> AttentionMask:
    """The mask of a causal decoder, with or without a KV cache.

    Args:
        key_valid: [B, S] 1 = real token, 0 = padding / unwritten cache slot.
        q_index: [T] int, index of each query in the key sequence (``cache_index + arange(T)``
          with a KV cache); None = self-attention over the whole sequence (T == S, aligned).
        segment_ids: optional [B, S] packed-example ids (self-attention only, 0 = padding);
          keys and queries must then share a nonzero id.
        window: sliding window (query sees keys ``q - window < k <= q``) or None.
        implementation: the requested kernel.

    Returns:
        An :class:`AttentionMask` with ``dense`` bool [B, 1, T, S].
    """
    s = key_valid.shape[-1]
    aligned = q_index is None
    if segment_ids is not None and not aligned:
        raise ValueError("segment_ids apply to self-attention without a KV cache only")
    k_index = jnp.arange(s)
    q_index = k_index if aligned else q_index
    dense = k_index[None, :] <= q_index[:, None]  # (T, S)
    if window is not None:
        dense = dense & (q_index[:, None] - k_index[None, :] < window)  # (T, S)
    dense = dense[None, None] & (key_valid[:, None, None, :] != 0)  # (B, 1, T, S)
    segments = (key_valid != 0).astype(jnp.int32)  # (B, S)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, S)
        dense = dense & (same & (segment_ids[:, :, None] != 0))[:, None]
        segments = segments * segment_ids.astype(jnp.int32)
    return AttentionMask(
        dense=dense,
        segments=segments if aligned else None,
        causal=True,
        window=window,
        aligned=aligned,
        implementation=implementation,
    )


def padding_mask(valid: jax.Array, *, implementation: str = "auto") -> AttentionMask:
    """The mask of a bidirectional encoder (BERT): every query sees every non-pad key.

    Args:
        valid: [B, S] bool or int, True / nonzero = real token.
        implementation: the requested kernel.
    """
    return AttentionMask(
        dense=(valid != 0)[:, None, None, :],  # (B, 1, 1, S)
        segments=(valid != 0).astype(jnp.int32),
        causal=False,
        window=None,
        aligned=True,
        implementation=implementation,
    )
