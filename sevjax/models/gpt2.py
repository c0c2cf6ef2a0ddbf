"""GPT-2 language model (AraGPT2 and friends) in Flax NNX, laid out like HF ``GPT2LMHeadModel``.

Pre-LN blocks, learned positions, the fused ``c_attn`` kernel [D, 3D] exactly as HF's ``Conv1D``
stores it, ``gelu_new`` MLP and a tied LM head. HF ``Conv1D`` weights are already [in, out], so
the HF table never transposes (except an untied ``lm_head``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import layers
from sevjax.models.layers import Dense, Dtype, Embed, LayerNorm
from sevjax.sharding import constrain

HF_BASE_PREFIX = "transformer."
HF_IGNORE = (r".*attn\.(masked_)?bias", r"lm_head\.weight")
HF_NEW_IF_MISSING: tuple[str, ...] = ()
HF_ARCHITECTURE = "GPT2LMHeadModel"


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters with HF ``GPT2Config`` names; ``n_inner=None`` means 4 * n_embd."""

    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        layers.activation(self.activation_function)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPT2Config.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def inner_size(self) -> int:
        """F, the MLP width."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> GPT2Config:
        """Builds the config from a HF ``config.json`` dict (unused HF fields are ignored).

        Raises:
            ValueError: if ``model_type`` is not "gpt2".
        """
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"GPT2Config needs model_type 'gpt2', got {d.get('model_type')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (``n_ctx`` mirrors ``n_positions``)."""
        d = dataclasses.asdict(self)
        d.update(model_type="gpt2", architectures=[HF_ARCHITECTURE], n_ctx=self.n_positions)
        return d


def hf_param_table(config: GPT2Config) -> list[tuple[str, str, bool]]:
    """(hf_key, our_path, transpose) for every parameter of :class:`GPT2LMHeadModel`."""
    p = HF_BASE_PREFIX
    table = [(p + "wte.weight", "wte.embedding", False), (p + "wpe.weight", "wpe.embedding", False)]
    for i in range(config.n_layer):
        for hf, ours in (
            ("ln_1", "ln_1"),
            ("attn.c_attn", "attn.c_attn"),
            ("attn.c_proj", "attn.c_proj"),
            ("ln_2", "ln_2"),
            ("mlp.c_fc", "mlp.c_fc"),
            ("mlp.c_proj", "mlp.c_proj"),
        ):
            weight = "scale" if hf.startswith("ln") else "kernel"
            table.append((f"{p}h.{i}.{hf}.weight", f"layers.{i}.{ours}.{weight}", False))
            table.append((f"{p}h.{i}.{hf}.bias", f"layers.{i}.{ours}.bias", False))
    table += [(p + "ln_f.weight", "ln_f.scale", False), (p + "ln_f.bias", "ln_f.bias", False)]
    if not config.tie_word_embeddings:
        table.append(("lm_head.weight", "lm_head.kernel", True))
    return table


class GPT2Attention(nnx.Module):
    """Causal self-attention with the fused ``c_attn`` [D, 3D] projection."""

    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, param_dtype, rngs):
        d, std = config.n_embd, config.initializer_range
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_attn = Dense(d, 3 * d, axes=("embed", "heads"), std=std, **kw)
        proj_std = std / math.sqrt(2 * config.n_layer)
        self.c_proj = Dense(d, d, axes=("heads", "embed"), std=proj_std, **kw)
        self.num_heads = config.n_head
        scale = 1.0 / math.sqrt(d // config.n_head) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.dtype = dtype

    def __call__(self, x, mask, cache=None, index=None):
        b, t, d = x.shape
        qkv = self.c_attn(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)  # (B,T,3,N,H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, H) each
        if cache is not None:
            cache = layers.update_cache(cache, k, v, index)
            k, v = cache
        out = layers.dot_product_attention(q, k, v, mask, dtype=self.dtype, scale=self.scale)
        return self.c_proj(out.reshape(b, t, d)), cache  # (B, T, D)


class GPT2MLP(nnx.Module):
    """``c_proj(act(c_fc(x)))`` with F = ``inner_size``."""

    def __init__(self, config: GPT2Config, *, dtype, param_dtype, rngs):
        d, f, std = config.n_embd, config.inner_size, config.initializer_range
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Dense(d, f, axes=("embed", "mlp"), std=std, **kw)
        proj_std = std / math.sqrt(2 * config.n_layer)
        self.c_proj = Dense(f, d, axes=("mlp", "embed"), std=proj_std, **kw)
        self.act = layers.activation(config.activation_function)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps=eps, **kw)
        self.attn = GPT2Attention(config, layer_idx, **kw)
        self.ln_2 = LayerNorm(config.n_embd, eps=eps, **kw)
        self.mlp = GPT2MLP(config, **kw)

    def __call__(self, x, mask, cache=None, index=None):
        a, cache = self.attn(self.ln_1(x), mask, cache, index)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class GPT2LMHeadModel(layers.CausalLM):
    """GPT-2 with an LM head.

    Called as ``model(input_ids, attention_mask, position_ids, *, segment_ids)`` -> logits
    [B, T, V]; ``hidden`` gives the final hidden states and ``head`` the output projection.

    Args:
        config: the hyper-parameters.
        dtype: compute dtype (float32 or bfloat16); softmax and LayerNorm statistics stay f32.
        param_dtype: storage dtype of the parameters.
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        config: GPT2Config,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        std = config.initializer_range
        self.wte = Embed(config.vocab_size, config.n_embd, std=std, **kw)
        self.wpe = Embed(config.n_positions, config.n_embd, axes=(None, "embed"), std=0.01, **kw)
        self.layers = nnx.List([GPT2Block(config, i, **kw) for i in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, **kw)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Dense(
                config.n_embd, config.vocab_size, axes=("embed", "vocab"), use_bias=False, **kw
            )
        )

    @property
    def token_embedding(self) -> Embed:
        return self.wte

    def _trunk(self, input_ids, positions, mask, cache=None, index=None):
        x = self.wte(input_ids) + self.wpe(positions)  # (B, T, D)
        new_cache = []
        for i, block in enumerate(self.layers):
            x, c = block(x, mask, None if cache is None else cache[i], index)
            x = layers.grad_barrier(constrain(x, ("batch", "seq", "embed")))
            new_cache.append(c)
        return self.ln_f(x), (new_cache if cache is not None else None)

    def hidden(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states after ``ln_f``: [B, T, D] in the compute dtype.

        Args:
            input_ids: [B, T] int token ids.
            attention_mask: [B, T] 1 = token, 0 = padding (left padding supported).
            position_ids: [B, T] int; default ``cumsum(attention_mask) - 1`` clipped at 0.
            segment_ids: [B, T] int packed-example ids (0 = padding); needs ``position_ids``.
        """
        if input_ids.shape[1] > self.config.n_positions:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds n_positions={self.config.n_positions}"
            )
        positions, mask = layers.decoder_inputs(
            input_ids, attention_mask, position_ids, segment_ids
        )
        return self._trunk(input_ids, positions, mask)[0]

    def init_cache(self, batch_size: int, max_len: int) -> list[tuple[jax.Array, jax.Array]]:
        """Zeroed KV cache: one (k, v) pair of [B, S, N, H] per layer, in the compute dtype."""
        n = self.config.n_head
        shape = (batch_size, max_len, n, self.config.n_embd // n)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.layers]

    def cached_hidden(self, input_ids, positions, key_valid, cache, index):
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
        mask = layers.causal_mask(index + jnp.arange(input_ids.shape[1]), key_valid)
        return self._trunk(input_ids, positions, mask, cache, index)
