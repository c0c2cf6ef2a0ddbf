"""The decoder-only LM shared by every causal family: embed -> L blocks -> final norm -> head.

A family (``gpt2.py``, ``llama.py``; Gemma or Qwen3 next) subclasses :class:`CausalLM` and, in
its ``__init__``, sets ``config``, ``dtype``, ``options``, its embedding modules, ``self.layers =
stack.make_layers(make_block, L, options=..., rngs=...)``, its final norm and ``lm_head`` (a
``Dense`` [D, V] or None when tied). It then defines four small hooks and two attributes:

- ``token_embedding`` (property): the ``Embed`` [V, D] the tied head reuses;
- ``embed(input_ids, positions)`` -> x [B, T, D] (token + learned positions, scaling, ...);
- ``final_norm(x)`` -> [B, T, D];
- ``kv_heads_and_dim`` (property): (K, H) of the KV cache;
- optionally ``sliding_window`` (int or None) and ``max_positions`` (length check).

Its block follows the stack convention ``block(x, ctx, cache, layer) -> (x, cache)`` with ``ctx``
a :class:`DecoderContext`; attention inside the block calls
:func:`sevjax.models.attention.attend` with ``ctx.mask`` and, with a cache, writes its keys and
values with :func:`update_cache` at ``ctx.cache_index``. Everything else here is shared: input
checks, masks and positions, the scanned/unrolled loop, KV cache layout, logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import attention, stack
from sevjax.models.attention import AttentionMask
from sevjax.models.layers import Dense, Embed
from sevjax.models.options import ModelOptions


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("positions", "mask", "cache_index"),
    meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class DecoderContext:
    """What every block of one decoder call sees.

    Attributes:
        positions: [B, T] int32 position ids.
        mask: the call's :class:`AttentionMask`.
        cache_index: scalar int32, first cache slot written by this call (None without cache).
    """

    positions: jax.Array
    mask: AttentionMask
    cache_index: jax.Array | None = None


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
        """``(w, transpose_head)``: tied embedding [V, D] (True) or ``lm_head`` [D, V] (False)."""
        if self.lm_head is None:
            return self.token_embedding.embedding[...], True
        return self.lm_head.kernel[...], False

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
        mask = attention.causal_mask(
            valid,
            segment_ids=segment_ids,
            window=self.sliding_window,
            implementation=self.options.attention,
        )
        ctx = DecoderContext(positions.astype(jnp.int32), mask)
        return self._trunk(input_ids, ctx)[0]

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] in float32 whatever the compute dtype (arguments as ``hidden``)."""
        h = self.hidden(input_ids, attention_mask, position_ids, segment_ids=segment_ids)
        return project_logits(h, *self.head())

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
        mask = attention.causal_mask(
            key_valid,
            q_index=index + jnp.arange(input_ids.shape[1]),
            window=self.sliding_window,
            implementation=self.options.attention,
        )
        ctx = DecoderContext(positions.astype(jnp.int32), mask, jnp.asarray(index, jnp.int32))
        return self._trunk(input_ids, ctx, cache)
