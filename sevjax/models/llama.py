"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/Qwen2.5) in Flax NNX, laid out like HF.

RMSNorm, RoPE (theta and HF ``rope_scaling`` types "default", "linear", "llama3"), grouped-query
attention, SwiGLU MLP, tied or untied LM head. Variants differ only in config: Qwen2 has q/k/v
biases (no o_proj bias), Llama's ``attention_bias`` puts a bias on q/k/v/o, Mistral may have a
uniform sliding window. Kernels are [in, out]; HF ``nn.Linear`` weights are transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import layers
from sevjax.models.layers import Dense, Dtype, Embed, RMSNorm
from sevjax.sharding import constrain

HF_BASE_PREFIX = "model."
HF_IGNORE = (r".*rotary_emb\.inv_freq", r"lm_head\.weight")
HF_NEW_IF_MISSING: tuple[str, ...] = ()
HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_NULLABLE = ("sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters with HF names. ``rope_scaling`` is a sorted tuple of (key, value) pairs
    (hashable) of the HF dict without ``rope_theta``, or None for plain RoPE."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in HF_ARCHITECTURE:
            raise ValueError(
                f"LlamaConfig model_type {self.model_type!r}; supported: {list(HF_ARCHITECTURE)}"
            )
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        layers.activation(self.hidden_act)
        layers.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """``rope_scaling`` as the HF dict (without ``rope_theta``)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections have a bias (always for Qwen2, with ``attention_bias`` for Llama)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """o_proj has a bias (Llama ``attention_bias`` only; never for Qwen2)."""
        return self.model_type != "qwen2" and self.attention_bias

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> LlamaConfig:
        """From an HF ``config.json`` dict, old (``rope_theta`` + ``rope_scaling``) or
        transformers-5 (``rope_parameters``) style.

        Raises:
            ValueError: for an unsupported ``model_type``, rope type, or Qwen2 sliding windows.
        """
        model_type = d.get("model_type", "llama")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling"}
        kw = {k: v for k, v in d.items() if k in names and (v is not None or k in _NULLABLE)}
        kw["model_type"] = model_type
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        kw["rope_theta"] = float(theta)
        if rope and rope.get("rope_type", "default") != "default":
            kw["rope_scaling"] = tuple(sorted(rope.items()))
        if model_type == "qwen2":
            kw.pop("attention_bias", None)
            kw.pop("sliding_window", None)
            if d.get("use_sliding_window"):
                raise ValueError("Qwen2 use_sliding_window=true is not supported")
        if model_type == "llama":
            kw.pop("sliding_window", None)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (transformers-5 ``rope_parameters`` plus ``rope_theta``)."""
        d = dataclasses.asdict(self)
        d.pop("rope_scaling")
        d["rope_parameters"] = {
            "rope_type": "default",
            **(self.rope_scaling_dict or {}),
            "rope_theta": self.rope_theta,
        }
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        if self.model_type == "qwen2":
            for k in ("attention_bias", "mlp_bias", "sliding_window"):
                d.pop(k)
            d["use_sliding_window"] = False
        if self.model_type == "llama":
            d.pop("sliding_window")
        d["architectures"] = [HF_ARCHITECTURE[self.model_type]]
        return d


def hf_param_table(config: LlamaConfig) -> list[tuple[str, str, bool]]:
    """(hf_key, our_path, transpose) for every parameter of :class:`LlamaForCausalLM`."""
    p = HF_BASE_PREFIX
    table = [(p + "embed_tokens.weight", "embed_tokens.embedding", False)]
    projections = [
        ("self_attn.q_proj", config.qkv_bias),
        ("self_attn.k_proj", config.qkv_bias),
        ("self_attn.v_proj", config.qkv_bias),
        ("self_attn.o_proj", config.o_bias),
        ("mlp.gate_proj", config.mlp_bias),
        ("mlp.up_proj", config.mlp_bias),
        ("mlp.down_proj", config.mlp_bias),
    ]
    for i in range(config.num_hidden_layers):
        pre = f"layers.{i}."
        table.append((f"{p}{pre}input_layernorm.weight", f"{pre}input_layernorm.scale", False))
        for name, bias in projections:
            table.append((f"{p}{pre}{name}.weight", f"{pre}{name}.kernel", True))
            if bias:
                table.append((f"{p}{pre}{name}.bias", f"{pre}{name}.bias", False))
        table.append(
            (
                f"{p}{pre}post_attention_layernorm.weight",
                f"{pre}post_attention_layernorm.scale",
                False,
            )
        )
    table.append((p + "norm.weight", "norm.scale", False))
    if not config.tie_word_embeddings:
        table.append(("lm_head.weight", "lm_head.kernel", True))
    return table


class LlamaAttention(nnx.Module):
    """Grouped-query attention with RoPE on q and k."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        kw = dict(std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, n * h, axes=("embed", "heads"), use_bias=config.qkv_bias, **kw)
        self.k_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **kw)
        self.v_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **kw)
        self.o_proj = Dense(n * h, d, axes=("heads", "embed"), use_bias=config.o_bias, **kw)
        self.shape = (n, k, h)
        inv_freq = layers.rope_inv_freq(h, config.rope_theta, config.rope_scaling_dict)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static, hashable
        self.dtype = dtype

    def __call__(self, x, positions, mask, cache=None, index=None):
        b, t, _ = x.shape
        n, kh, h = self.shape
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = layers.apply_rope(self.q_proj(x).reshape(b, t, n, h), positions, inv_freq)  # (B,T,N,H)
        k = layers.apply_rope(self.k_proj(x).reshape(b, t, kh, h), positions, inv_freq)  # (B,T,K,H)
        v = self.v_proj(x).reshape(b, t, kh, h)  # (B, T, K, H)
        if cache is not None:
            cache = layers.update_cache(cache, k, v, index)
            k, v = cache
        out = layers.dot_product_attention(q, k, v, mask, dtype=self.dtype)  # (B, T, N, H)
        return self.o_proj(out.reshape(b, t, n * h)), cache  # (B, T, D)


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(
            use_bias=config.mlp_bias,
            std=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)
        self.act = layers.activation(config.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, **kw)
        self.self_attn = LlamaAttention(config, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, **kw)
        self.mlp = LlamaMLP(config, **kw)

    def __call__(self, x, positions, mask, cache=None, index=None):
        a, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaForCausalLM(layers.CausalLM):
    """Llama/Mistral/Qwen2 causal LM.

    Called as ``model(input_ids, attention_mask, position_ids, *, segment_ids)`` -> logits
    [B, T, V]; ``hidden`` gives the final hidden states and ``head`` the output projection.

    Args:
        config: the hyper-parameters.
        dtype: compute dtype (float32 or bfloat16); softmax and RMSNorm statistics stay f32.
        param_dtype: storage dtype of the parameters.
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = Embed(v, d, std=config.initializer_range, **kw)
        self.layers = nnx.List(
            [LlamaDecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(d, eps=config.rms_norm_eps, **kw)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Dense(d, v, axes=("embed", "vocab"), use_bias=False, **kw)
        )

    def _window(self, mask, q_index):
        w = self.config.sliding_window
        if w is None:
            return mask
        k_index = jnp.arange(mask.shape[-1])
        return mask & (q_index[:, None] - k_index[None, :] < w)[None, None]  # (B, 1, T, S)

    @property
    def token_embedding(self) -> Embed:
        return self.embed_tokens

    def _trunk(self, input_ids, positions, mask, cache=None, index=None):
        x = self.embed_tokens(input_ids)  # (B, T, D)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, mask, None if cache is None else cache[i], index)
            x = layers.grad_barrier(constrain(x, ("batch", "seq", "embed")))
            new_cache.append(c)
        return self.norm(x), (new_cache if cache is not None else None)

    def hidden(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states after ``norm``: [B, T, D] in the compute dtype.

        Args:
            input_ids: [B, T] int token ids.
            attention_mask: [B, T] 1 = token, 0 = padding (left padding supported).
            position_ids: [B, T] int; default ``cumsum(attention_mask) - 1`` clipped at 0.
            segment_ids: [B, T] int packed-example ids (0 = padding); needs ``position_ids``.
        """
        positions, mask = layers.decoder_inputs(
            input_ids, attention_mask, position_ids, segment_ids
        )
        mask = self._window(mask, jnp.arange(input_ids.shape[1]))
        return self._trunk(input_ids, positions, mask)[0]

    def init_cache(self, batch_size: int, max_len: int) -> list[tuple[jax.Array, jax.Array]]:
        """Zeroed KV cache: one (k, v) pair of [B, S, K, H] per layer, in the compute dtype."""
        c = self.config
        shape = (batch_size, max_len, c.num_key_value_heads, c.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.layers]

    def cached_hidden(self, input_ids, positions, key_valid, cache, index):
        """One cached step; see :meth:`sevjax.models.gpt2.GPT2LMHeadModel.cached_hidden`."""
        q_index = index + jnp.arange(input_ids.shape[1])
        mask = self._window(layers.causal_mask(q_index, key_valid), q_index)
        return self._trunk(input_ids, positions, mask, cache, index)
