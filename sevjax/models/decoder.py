"""The decoder-only LM shared by every causal family: embed -> L blocks -> final norm -> head.

A family (``gpt2.py``, ``llama.py``, ``gemma.py``) subclasses :class:`CausalLM` and, in
its ``__init__``, sets ``config``, ``dtype``, ``options``, its embedding modules, ``self.layers =
stack.make_layers(make_block, L, options=..., rngs=...)``, its final norm and ``lm_head`` (a
``Dense`` [D, V] or None when tied). It then defines four small hooks and two attributes:

- ``token_embedding`` (property): the ``Embed`` [V, D] the tied head reuses;
- ``embed(input_ids, positions)`` -> x [B, T, D] (token + learned positions, scaling, ...);
- ``final_norm(x)`` -> [B, T, D];
- ``kv_heads_and_dim`` (property): (K, H) of the KV cache;
- optionally ``sliding_window`` (int or None), ``local_layers`` (a per-layer tuple of bools:
  which layers use the window, for models that alternate local and global layers; None = every
  layer when ``sliding_window`` is set), ``final_logit_softcap`` (Gemma's ``cap * tanh(z / cap)``
  on the logits) and ``max_positions`` (length check).

Its block follows the stack convention ``block(x, ctx, cache, layer) -> (x, cache)`` with ``ctx``
a :class:`DecoderContext`; attention inside the block calls :func:`attend_layer` (the layer's
mask, then :func:`sevjax.models.attention.attend`) and, with a cache, writes its keys and values
with :func:`update_cache` at ``ctx.cache_index``. Everything else here is shared: input checks,
masks and positions, the scanned/unrolled loop, KV cache layout, logits and their soft-cap.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sevjax.models import attention, stack
from sevjax.models.attention import AttentionMask
from sevjax.models.layers import Dense, Embed
from sevjax.models.options import ModelOptions


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("positions", "mask", "cache_index", "local_mask"),
    meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class DecoderContext:
    """What every block of one decoder call sees.

    Attributes:
        positions: [B, T] int32 position ids.
        mask: the call's :class:`AttentionMask` (of the global layers when they are mixed).
        cache_index: scalar int32, first cache slot written by this call (None without cache).
        local_mask: the sliding-window mask of the local layers when a model mixes local and
          global layers (Gemma 2/3, Qwen3 ``max_window_layers``), else None.
    """

    positions: jax.Array
    mask: AttentionMask
    cache_index: jax.Array | None = None
    local_mask: AttentionMask | None = None


def layer_flag(flags: tuple[bool, ...] | None, layer: int | jax.Array) -> bool | jax.Array:
    """``flags[layer]``: a Python bool for an unrolled layer, a traced bool when scanned."""
    if flags is None:
        return False
    if isinstance(layer, int):
        return flags[layer]
    return jnp.asarray(np.asarray(flags, bool))[layer]


def attend_layer(
    q: jax.Array, k: jax.Array, v: jax.Array, ctx: DecoderContext, local: bool | jax.Array, **kw
) -> jax.Array:
    """:func:`sevjax.models.attention.attend` with this layer's mask.

    ``ctx.local_mask`` for a local layer of a model that mixes both kinds, ``ctx.mask`` otherwise.
    A scanned layer's ``local`` is traced: a ``lax.cond`` then picks one of the two calls, so each
    kernel keeps its static mask structure (cuDNN's and splash's sliding windows).

    Args:
        q: [B, T, N, H]. k, v: [B, S, K, H].
        ctx: the call's context.
        local: this layer uses the sliding window (:func:`layer_flag`).
        **kw: ``attend``'s keyword arguments (dtype, scale, softcap).

    Returns:
        [B, T, N, H].
    """
    if ctx.local_mask is None:
        return attention.attend(q, k, v, ctx.mask, **kw)
    if isinstance(local, bool | np.bool_):
        return attention.attend(q, k, v, ctx.local_mask if local else ctx.mask, **kw)
    return jax.lax.cond(
        local,
        lambda q, k, v: attention.attend(q, k, v, ctx.local_mask, **kw),
        lambda q, k, v: attention.attend(q, k, v, ctx.mask, **kw),
        q,
        k,
        v,
    )


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``cumsum(mask) - 1`` clipped at 0 (right for left padding). [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


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


def project_logits(hidden: jax.Array, w: jax.Array, transpose_head: bool) -> jax.Array:
    """Logits [..., V] float32 = ``hidden [..., D] @ w`` (w [D, V]) or ``@ w.T`` (tied [V, D]).

    The matmul runs in the hidden states' dtype and accumulates in float32, so a bfloat16 model's
    logits are never rounded to bfloat16 before the loss.
    """
    w = w.astype(hidden.dtype)
    contract = (hidden.ndim - 1,), (1 if transpose_head else 0,)
    return jax.lax.dot_general(
        hidden, w, (contract, ((), ())), preferred_element_type=jnp.float32
    )  # (..., V)


def untied_head(tied: bool, d: int, v: int, **kw: Any) -> Dense | None:
    """The output projection ``lm_head`` [D, V], or None when the head is the tied embedding.

    ``kw``: ``dtype``, ``param_dtype``, ``rngs``.
    """
    return None if tied else Dense(d, v, axes=("embed", "vocab"), use_bias=False, **kw)


def _check_inputs(b: int, t: int, **arrays: jax.Array | None) -> None:
    for name, arr in arrays.items():
        if arr is not None and arr.shape != (b, t):
            raise ValueError(f"{name} has shape {arr.shape}, expected {(b, t)} like input_ids")


class CausalLM(nnx.Module):
    """Base class of the causal LMs; see the module docstring for what a family supplies.

    Called as ``model(input_ids, attention_mask, position_ids, *, segment_ids)`` -> logits
    [B, T, V] float32; :meth:`hidden` gives the final hidden states and :meth:`head` the output
    projection.
    """

    config: Any
    dtype: Any
    options: ModelOptions
    layers: nnx.Module
    lm_head: Dense | None
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] | None = None
    final_logit_softcap: float | None = None
    max_positions: int | None = None

    # ------------------------------------------------------------------ hooks (per family)
    @property
    def token_embedding(self) -> Embed:
        raise NotImplementedError

    @property
    def kv_heads_and_dim(self) -> tuple[int, int]:
        raise NotImplementedError

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        raise NotImplementedError

    def final_norm(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ shared
    def head(self) -> tuple[jax.Array, bool]:
        """``(w, transpose_head)``: tied embedding [V, D] (True) or ``lm_head`` [D, V] (False).

        The logits are ``hidden @ w`` soft-capped by ``final_logit_softcap``: :meth:`logits`.
        """
        if self.lm_head is None:
            return self.token_embedding.embedding[...], True
        return self.lm_head.kernel[...], False

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Logits [..., V] float32 of final hidden states [..., D], soft-capped when the model
        has a ``final_logit_softcap``."""
        return attention.soft_cap(project_logits(hidden, *self.head()), self.final_logit_softcap)

    def _context(self, key_valid, positions, *, q_index=None, segment_ids=None, cache_index=None):
        """The call's :class:`DecoderContext`: one mask, or a global and a local one."""
        local = self.local_layers
        window = self.sliding_window
        mixed = window is not None and local is not None and any(local) and not all(local)
        if local is not None and not any(local):
            window = None
        kw = dict(q_index=q_index, segment_ids=segment_ids, implementation=self.options.attention)
        mask = attention.causal_mask(key_valid, window=None if mixed else window, **kw)
        local_mask = attention.causal_mask(key_valid, window=window, **kw) if mixed else None
        return DecoderContext(positions.astype(jnp.int32), mask, cache_index, local_mask)

    def _trunk(self, input_ids, ctx: DecoderContext, cache=None):
        x = self.embed(input_ids, ctx.positions)  # (B, T, D)
        x, cache, _ = stack.run_layers(self.layers, x, ctx, options=self.options, cache=cache)
        return self.final_norm(x), cache

    def hidden(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states after the final norm: [B, T, D] in the compute dtype.

        Args:
            input_ids: [B, T] int token ids.
            attention_mask: [B, T] 1 = token, 0 = padding (left padding supported).
            position_ids: [B, T] int; default ``cumsum(attention_mask) - 1`` clipped at 0.
            segment_ids: [B, T] int packed-example ids (0 = padding); needs ``position_ids``.

        Raises:
            ValueError: for mismatched shapes, ``segment_ids`` without ``position_ids``, or a
              sequence longer than the model's positions.
        """
        b, t = input_ids.shape
        if self.max_positions is not None and t > self.max_positions:
            raise ValueError(f"sequence length {t} exceeds the model's {self.max_positions}")
        _check_inputs(b, t, attention_mask=attention_mask, position_ids=position_ids)
        _check_inputs(b, t, segment_ids=segment_ids)
        if segment_ids is not None and position_ids is None:
            raise ValueError("segment_ids needs position_ids (restarting at 0 per segment)")
        valid = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
        if segment_ids is not None:
            valid = valid * (segment_ids != 0)
        positions = default_positions(valid) if position_ids is None else position_ids
        ctx = self._context(valid, positions, segment_ids=segment_ids)
        return self._trunk(input_ids, ctx)[0]

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] in float32 whatever the compute dtype (arguments as ``hidden``),
        soft-capped when the model has a ``final_logit_softcap``."""
        return self.logits(
            self.hidden(input_ids, attention_mask, position_ids, segment_ids=segment_ids)
        )

    def init_cache(self, batch_size: int, max_len: int) -> Any:
        """Zeroed KV cache in the compute dtype.

        Unscanned: a list of L pairs (k, v) of [B, S, K, H]; scanned: one pair (k, v) of
        [L, B, S, K, H].
        """
        kh, h = self.kv_heads_and_dim
        shape = (batch_size, max_len, kh, h)
        if stack.is_scanned(self.layers):
            stacked = (stack.num_layers(self.layers), *shape)
            return jnp.zeros(stacked, self.dtype), jnp.zeros(stacked, self.dtype)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.layers]

    def cached_hidden(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        key_valid: jax.Array,
        cache: Any,
        index: jax.Array,
    ) -> tuple[jax.Array, Any]:
        """One cached step: like :meth:`hidden` for tokens written at ``cache[index:index+T]``.

        Args:
            input_ids: [B, T] int.
            positions: [B, T] int position ids.
            key_valid: [B, S] 1 for cache slots holding real tokens (this step's included).
            cache: from :meth:`init_cache`.
            index: scalar int32, first cache slot of this step.

        Returns:
            (hidden [B, T, D], updated cache).
        """
        index = jnp.asarray(index, jnp.int32)
        q_index = index + jnp.arange(input_ids.shape[1])
        ctx = self._context(key_valid, positions, q_index=q_index, cache_index=index)
        return self._trunk(input_ids, ctx, cache)
