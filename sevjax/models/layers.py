"""Shared building blocks for the model families: dense/embedding layers, norms, attention, RoPE.

Every parameter is created through :func:`sevjax.sharding.param` with logical axis names. Matrices
are stored as ``kernel [in, out]`` (torch ``nn.Linear`` stores ``[out, in]``; the HF tables say
which keys need a transpose). ``dtype`` is the compute dtype; softmax and norm statistics are
always computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sevjax.sharding import param

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called ``name`` in HF configs.

    Raises:
        ValueError: if ``name`` is not one of :data:`ACTIVATIONS`.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: Dtype) -> jax.Array:
    """Normal(0, std) initial values from the ``params`` stream."""
    return std * jax.random.normal(rngs.params(), tuple(shape), dtype)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel [in, out]`` and logical ``axes`` for the kernel."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        std: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.kernel = param(normal(rngs, (in_features, out_features), std, param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [..., in]. Returns [..., out] in the compute dtype."""
        y = jnp.asarray(x, self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table ``embedding [V, D]``."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str | None, str | None] = ("vocab", "embed"),
        std: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = param(normal(rngs, (num_embeddings, features), std, param_dtype), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Args: ids [...] int. Returns [..., D] in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with ``scale`` and ``bias`` [D]; mean/variance in float32 (torch semantics)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((features,), param_dtype), ("embed",))
        self.bias = param(jnp.zeros((features,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [..., D]. Returns [..., D] in the compute dtype."""
        x32 = jnp.asarray(x, jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in HF Llama: normalize in float32, cast, then multiply by ``scale`` [D]."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((features,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [..., D]. Returns [..., D] in the compute dtype."""
        x32 = jnp.asarray(x, jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


# ----------------------------------------------------------------------------------- attention


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    dtype: Dtype = jnp.float32,
    scale: float | None = None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Multi-head attention with grouped KV heads and a float32 softmax.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, K, H] with N % K == 0 (K == N is plain multi-head attention).
        v: values [B, S, K, H].
        mask: bool [B, 1, T, S] (or broadcastable), True = may attend; None = attend everywhere.
          A row with no True entry gets uniform weights (never NaN).
        dtype: compute dtype of the two matmuls and the output.
        scale: score scale, default ``1/sqrt(H)``.
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
    scores = scores * jnp.float32(scale)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))[:, :, None]  # (B, 1, 1, T, S)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if probs_dropout is not None:
        probs = probs_dropout(probs)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(dtype))  # (B, T, K, G, H)
    return out.reshape(b, t, n, h)  # (B, T, N, H)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``cumsum(mask) - 1`` clipped at 0 (right for left padding). [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(
    q_index: jax.Array, key_valid: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Boolean attention mask for a causal decoder, with or without a KV cache.

    Args:
        q_index: [T] int, index of each query in the key sequence (``arange(T)`` without a cache,
          ``cache_index + arange(T)`` with one).
        key_valid: [B, S] 1 = real token, 0 = padding / unwritten cache slot.
        segment_ids: optional [B, T] packed-example ids (T == S, 0 = padding); keys and queries
          must then share a nonzero id.

    Returns:
        bool [B, 1, T, S].
    """
    s = key_valid.shape[-1]
    mask = jnp.arange(s)[None, :] <= q_index[:, None]  # (T, S)
    mask = mask[None, None] & (key_valid[:, None, None, :] != 0)  # (B, 1, T, S)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, S)
        mask = mask & (same & (segment_ids[:, :, None] != 0))[:, None]
    return mask


def decoder_inputs(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
    segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Position ids and the causal/padding/segment mask of a decoder call without a cache.

    Args:
        input_ids: [B, T] int.
        attention_mask: [B, T] 1 = token, 0 = padding, or None (all tokens).
        position_ids: [B, T] int or None (then ``cumsum(mask) - 1`` clipped at 0).
        segment_ids: [B, T] int packed-example ids (0 = padding) or None; needs ``position_ids``.

    Returns:
        (positions [B, T] int32, mask bool [B, 1, T, T]).

    Raises:
        ValueError: if ``segment_ids`` is given without ``position_ids`` or shapes disagree.
    """
    b, t = input_ids.shape
    for name, arr in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if arr is not None and arr.shape != (b, t):
            raise ValueError(f"{name} has shape {arr.shape}, expected {(b, t)} like input_ids")
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected {(b, t)}")
        if position_ids is None:
            raise ValueError("segment_ids needs position_ids (restarting at 0 per segment)")
    valid = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
    if segment_ids is not None:
        valid = valid * (segment_ids != 0)
    positions = default_positions(valid) if position_ids is None else position_ids
    mask = causal_mask(jnp.arange(t), valid, segment_ids)  # (B, 1, T, T)
    return positions.astype(jnp.int32), mask


def update_cache(
    cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Writes new keys/values [B, T, K, H] into a cache ([B, S, K, H] each) at ``index``."""
    ck, cv = cache
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, jnp.asarray(index, jnp.int32), zero, zero)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), idx)
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), idx)
    return ck, cv


# ------------------------------------------------------------------------------------------ RoPE

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Inverse frequencies [H/2] float32 for rotary embeddings, as ``transformers`` computes them.

    Args:
        head_dim: H (even).
        theta: the RoPE base (``rope_theta``).
        scaling: HF ``rope_scaling`` / ``rope_parameters`` dict or None. Supported ``rope_type``
          values: "default", "linear" (``factor``) and "llama3" (``factor``, ``low_freq_factor``,
          ``high_freq_factor``, ``original_max_position_embeddings``).

    Raises:
        ValueError: for other rope types.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {ROPE_TYPES}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x`` [B, T, N, H] by ``positions`` [B, T] (HF ``rotate_half`` layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, H/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # (B, T, 1, H)
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # (B, T, N, H)
    return x * cos + rotated * sin


def grad_barrier(x: jax.Array) -> jax.Array:
    """Identity whose backward pass materializes the incoming gradient once (XLA:CPU only).

    In an unrolled stack of residual blocks, XLA:CPU fuses the running sum of the residual
    gradients of all the layers above into every consumer of each layer's gradient, work
    quadratic in depth (27% of a 6-layer GPT-2 step, 31% at 12 layers), and it drops
    ``lax.optimization_barrier`` before fusing. A ``lax.cond`` on a predicate it cannot fold is
    a boundary fusion does not cross. Other backends get ``x`` unchanged (a conditional would
    synchronize a GPU stream).

    Args:
        x: any array (the residual stream [B, T, D] between blocks).

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


def project_logits(hidden: jax.Array, w: jax.Array, transpose_head: bool) -> jax.Array:
    """Logits [..., V] = ``hidden [..., D] @ w`` (w [D, V]) or ``@ w.T`` (tied w [V, D])."""
    w = w.astype(hidden.dtype)
    return hidden @ (w.T if transpose_head else w)


class CausalLM(nnx.Module):
    """The decoder call convention shared by the families (see ``GPT2LMHeadModel``).

    Subclasses define ``hidden(...)``, ``token_embedding`` (the ``Embed`` tied to the head) and
    ``lm_head`` (a ``Dense`` [D, V], or None when the embeddings are tied).
    """

    token_embedding: Embed
    lm_head: Dense | None

    def head(self) -> tuple[jax.Array, bool]:
        """``(w, transpose_head)``: tied embedding [V, D] (True) or ``lm_head`` [D, V] (False)."""
        if self.lm_head is None:
            return self.token_embedding.embedding[...], True
        return self.lm_head.kernel[...], False

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] in the compute dtype (arguments as ``hidden``)."""
        h = self.hidden(input_ids, attention_mask, position_ids, segment_ids=segment_ids)
        return project_logits(h, *self.head())
