"""Shared building blocks of the model families: dense/embedding layers, norms, RoPE.

Every parameter is created through :func:`sevjax.sharding.param` with logical axis names.
Projections keep heads as their own dimension (``q`` kernel [D, N, H], output kernel [N, H, D],
GPT-2's fused ``c_attn`` [D, 3, N, H]) so that tensor parallelism always splits whole heads; the
HF tables reshape to and from torch's flat ``[out, in]`` matrices. ``dtype`` is the compute
dtype; norm statistics are always computed in float32. Attention lives in
:mod:`sevjax.models.attention`, the layer stack in :mod:`sevjax.models.stack` and the shared
decoder in :mod:`sevjax.models.decoder`.
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
    """``y = x . kernel + bias`` contracting the trailing ``in`` dims of x with ``kernel [*in, *out]``.

    ``in_features`` / ``out_features`` are ints or tuples (e.g. ``(N, H)`` for per-head
    projections); ``axes`` names every kernel dimension, the bias [*out] takes the ``out`` names.

    Optional LoRA branch (attached by :func:`sevjax.lora.apply`, None by default): ``lora`` is an
    ``nnx.LoRA`` over the flattened dims (A [prod(in), r], B [r, prod(out)]) and the output gains
    ``lora_scale * dropout(x_flat) @ A @ B`` reshaped to [..., *out], as PEFT computes it
    (``lora_dropout`` an ``nnx.Dropout`` or None).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axes: Sequence[str | None],
        use_bias: bool = True,
        std: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        ins = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        outs = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.dtype = dtype
        self.n_in = len(ins)
        self.kernel = param(normal(rngs, ins + outs, std, param_dtype), tuple(axes))
        bias_axes = tuple(axes)[len(ins) :]
        self.bias = param(jnp.zeros(outs, param_dtype), bias_axes) if use_bias else None
        self.lora: nnx.LoRA | None = nnx.data(None)  # data: a module may be attached later
        self.lora_dropout: nnx.Dropout | None = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [..., *in]. Returns [..., *out] in the compute dtype."""
        x = jnp.asarray(x, self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        ins, outs = kernel.shape[: self.n_in], kernel.shape[self.n_in :]
        lead = x.shape[: x.ndim - self.n_in]
        # one 2-D matmul: XLA:CPU differentiates a dot contracting the leading (B, T) dims
        # several times slower; on other backends the reshapes are free
        y = x.reshape(-1, math.prod(ins)) @ kernel.reshape(math.prod(ins), math.prod(outs))
        y = y.reshape(*lead, *outs)  # (..., *out)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self._lora(x, kernel.shape)
        return y

    def _lora(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """``lora_scale * lora(dropout(x))`` [..., *out], with ``nnx.LoRA`` applied to x flattened
        to [B*T, prod(in)]: XLA:CPU computes the gradient of a dot that contracts two leading dims
        (B, T) several times slower than that of a 2-D matmul."""
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        out = self.lora(h.reshape(-1, self.lora.in_features)) * self.lora_scale  # (B*T, prod(out))
        return out.reshape(*x.shape[: x.ndim - self.n_in], *shape[self.n_in :])  # (..., *out)


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
