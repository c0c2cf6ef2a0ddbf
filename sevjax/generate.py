"""Cached autoregressive generation for the decoder LMs (GPT-2, Llama, Gemma families).

The prompt (left-padded, [B, P]) is run once through the model, filling a preallocated KV cache
of [B, P + max_new_tokens, K, H] per layer (one stacked [L, B, P + max_new_tokens, K, H] pair for
a scanned model, see :meth:`sevjax.models.decoder.CausalLM.init_cache`); then a jitted
``lax.while_loop`` decodes one token per step with static shapes. Logits are float32. Cache slot
``s`` holds the token at column ``s`` of ``concat(prompt, new_tokens)``, and ``key_valid`` marks
the non-pad slots, so every cached step sees exactly the mask and positions of the full forward
on that concatenation. Compiles once per (batch, prompt length, max_new_tokens, sampling
settings).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import decoder


def sample_logits(
    logits: jax.Array,
    rng: jax.Array | None,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Picks one token per row.

    Args:
        logits: [B, V] (any float dtype; computed in float32).
        rng: PRNG key (unused when ``temperature == 0``).
        temperature: 0 = greedy argmax; otherwise logits are divided by it.
        top_k: keep only the k largest logits.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (nucleus).

    Returns:
        [B] int32 token ids.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = kept.min(axis=-1, keepdims=True)  # (B, 1) smallest kept logit
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos", "pad"),
)
def _generate(
    graphdef, state, input_ids, attention_mask, rng, *, max_new_tokens, temperature, top_k, top_p,
    eos, pad,
):  # fmt: skip
    model = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    total = p + max_new_tokens
    key_valid = jnp.zeros((b, total), jnp.int32).at[:, :p].set(attention_mask)
    positions = decoder.default_positions(attention_mask)
    h, cache = model.cached_hidden(
        input_ids, positions, key_valid, model.init_cache(b, total), jnp.int32(0)
    )
    logits = model.logits(h[:, -1])  # (B, V), soft-capped where the model caps its logits
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    out = jnp.full((b, max_new_tokens), pad, jnp.int32)
    carry = (jnp.int32(0), out, logits, cache, key_valid, positions[:, -1], jnp.zeros(b, bool), rng)

    def cond(c):
        i, *_, done, _ = c
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, out, logits, cache, key_valid, pos, done, rng = c
        rng, sub = jax.random.split(rng)
        tok = sample_logits(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, pad, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        done = done | jnp.isin(tok, eos_ids)
        pos = pos + 1
        key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((b, 1), jnp.int32), (0, p + i))
        h, cache = model.cached_hidden(tok[:, None], pos[:, None], key_valid, cache, p + i)
        logits = model.logits(h[:, 0])  # (B, V)
        return i + 1, out, logits, cache, key_valid, pos, done, rng

    return jax.lax.while_loop(cond, body, carry)[1]


def generate(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` tokens after left-padded prompts with a KV cache.

    Args:
        model: a decoder LM (``GPT2LMHeadModel`` / ``LlamaForCausalLM``).
        input_ids: [B, P] int prompts, left-padded.
        attention_mask: [B, P] 1 = token, 0 = padding; default all ones.
        max_new_tokens: number of tokens to generate (static).
        temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_k: optional top-k filter when sampling.
        top_p: optional nucleus filter when sampling.
        eos_token_id: id(s) that end a row; later positions of that row get ``pad_token_id``.
        pad_token_id: filler after EOS.
        rng: PRNG key, required when ``temperature > 0``.

    Returns:
        [B, max_new_tokens] int32 new tokens (the prompt is not included).

    Raises:
        ValueError: for bad lengths, temperature, top_k/top_p, a missing rng or mismatched shapes.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {attention_mask.shape} != input_ids {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    if rng is None:
        rng = jax.random.key(0)
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        input_ids,
        attention_mask,
        rng,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p),
        eos=eos,
        pad=int(pad_token_id),
    )
