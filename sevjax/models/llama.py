"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/Qwen2.5, Qwen3) in Flax NNX, laid out like HF.

RMSNorm, RoPE (theta and HF ``rope_scaling`` types "default", "linear", "llama3"), grouped-query
attention, SwiGLU MLP, tied or untied LM head, on the shared decoder
(:class:`sevjax.models.decoder.CausalLM`). Variants differ only in config: Qwen2 has q/k/v
biases (no o_proj bias), Llama's and Qwen3's ``attention_bias`` puts a bias on q/k/v/o, Mistral
may have a uniform sliding window, Qwen3 normalizes q and k per head (RMSNorm over ``head_dim``,
before RoPE), has an explicit ``head_dim`` and may slide a window over the layers from
``max_window_layers`` on (``layer_types``). Kernels are [in, out] with heads as their own dimension
(q [D, N, H], k/v [D, K, H], o [N, H, D]); the HF table transposes and reshapes torch's
``nn.Linear`` weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import decoder, layers, stack
from sevjax.models.decoder import DecoderContext, update_cache
from sevjax.models.hf_table import HFParam
from sevjax.models.layers import Dense, Dtype, Embed, RMSNorm
from sevjax.models.options import ModelOptions, resolve
from sevjax.sharding import param

HF_BASE_PREFIX = "model."
HF_IGNORE = (r".*rotary_emb\.inv_freq", r"lm_head\.weight")
HF_NEW_IF_MISSING: tuple[str, ...] = ()
HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_NULLABLE = ("sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")
LAYER_TYPES = ("sliding_attention", "full_attention")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # per-head norms (Qwen3, Gemma 3)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters with HF names. ``rope_scaling`` is a sorted tuple of (key, value) pairs
    (hashable) of the HF dict without ``rope_theta``, or None for plain RoPE. ``layer_types``
    (Qwen3 only) says which layers use ``sliding_window``; None = every layer when it is set."""

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
    layer_types: tuple[str, ...] | None = None
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
        if self.layer_types is not None and self.model_type != "qwen3":
            raise ValueError(f"layer_types is a Qwen3 option, not {self.model_type}'s")
        check_decoder_config(self)

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
        """o_proj has a bias (Llama/Qwen3 ``attention_bias`` only; never for Qwen2)."""
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """q and k are RMS-normalized per head before RoPE (Qwen3)."""
        return self.model_type == "qwen3"

    @property
    def local_layers(self) -> tuple[bool, ...] | None:
        """Per layer: uses the sliding window (Qwen3 ``layer_types``); None = uniform."""
        if self.layer_types is None:
            return None
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> LlamaConfig:
        """From an HF ``config.json`` dict, old (``rope_theta`` + ``rope_scaling``) or
        transformers-5 (``rope_parameters``) style.

        Raises:
            ValueError: for an unsupported ``model_type``, rope type, or Qwen2 sliding windows.
        """
        model_type = d.get("model_type", "llama")
        if model_type == "qwen3":
            d = _qwen3_windows(d)
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
        if model_type != "qwen3":
            kw.pop("layer_types", None)
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
        if self.model_type in ("llama", "qwen3"):
            d.pop("sliding_window")
        if self.model_type == "qwen3":
            d.pop("mlp_bias")
            types = self.layer_types or ("full_attention",) * self.num_hidden_layers
            d.update(use_sliding_window=self.layer_types is not None, layer_types=list(types))
            d["sliding_window"] = self.sliding_window
        else:
            d.pop("layer_types")
        d["architectures"] = [HF_ARCHITECTURE[self.model_type]]
        return d


def check_decoder_config(config: Any) -> None:
    """The checks every Llama-layout config (also Gemma's) runs in ``__post_init__``: grouped
    heads, an even ``head_dim``, ``layer_types`` (made a tuple) with a window when some layer
    slides, a known activation and RoPE type; a list ``eos_token_id`` becomes a tuple."""
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if config.head_dim % 2:
        raise ValueError(f"head_dim={config.head_dim} must be even for RoPE")
    if config.layer_types is not None:
        types, n = tuple(config.layer_types), config.num_hidden_layers
        object.__setattr__(config, "layer_types", types)
        if len(types) != n or set(types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types must be {n} entries of {LAYER_TYPES}, got {list(types)}")
        if config.sliding_window is None and "sliding_attention" in types:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is null")
    layers.activation(config.hidden_act)
    layers.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_dict)
    if isinstance(config.eos_token_id, list):
        object.__setattr__(config, "eos_token_id", tuple(config.eos_token_id))


def _qwen3_windows(d: dict[str, Any]) -> dict[str, Any]:
    """A Qwen3 config dict with ``sliding_window`` / ``layer_types`` resolved as HF does: the
    window applies only with ``use_sliding_window``, to the layers from ``max_window_layers`` on
    unless ``layer_types`` says otherwise; both None when every layer is global."""
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    types = d.get("layer_types") if window is not None else None
    if window is not None and types is None:
        first = d.get("max_window_layers", 28)
        n = d.get("num_hidden_layers", LlamaConfig.num_hidden_layers)
        types = [LAYER_TYPES[i < first] for i in range(n)]
    if types is None or all(t == "full_attention" for t in types):
        window, types = None, None
    return {**d, "sliding_window": window, "layer_types": types}


def hf_param_table(config: LlamaConfig) -> list[HFParam]:
    """One :class:`HFParam` per parameter of :class:`LlamaForCausalLM` (per-layer paths)."""
    norms = ["input_layernorm", "post_attention_layernorm"]
    qk_norms = QK_NORMS if config.qk_norm else ()
    return decoder_table(config, (*norms, *qk_norms))


def decoder_table(config: Any, norms: tuple[str, ...]) -> list[HFParam]:
    """The HF table of a Llama-layout decoder (also Gemma's): embeddings; per layer the
    ``norms`` (``<name>.weight`` -> ``<name>.scale``) and the q/k/v/o and gate/up/down
    projections (biases per ``qkv_bias`` / ``o_bias`` / ``mlp_bias``); final norm; untied head."""
    p = HF_BASE_PREFIX
    d, n, k, h = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    table = [HFParam(p + "embed_tokens.weight", "embed_tokens.embedding")]
    projections = [  # (name, bias, HF weight shape [out, in])
        ("self_attn.q_proj", config.qkv_bias, (n * h, d)),
        ("self_attn.k_proj", config.qkv_bias, (k * h, d)),
        ("self_attn.v_proj", config.qkv_bias, (k * h, d)),
        ("self_attn.o_proj", config.o_bias, (d, n * h)),
        ("mlp.gate_proj", config.mlp_bias, None),
        ("mlp.up_proj", config.mlp_bias, None),
        ("mlp.down_proj", config.mlp_bias, None),
    ]
    for i in range(config.num_hidden_layers):
        pre, ours = f"{p}layers.{i}.", f"layers.{i}."
        for name in norms:
            table.append(HFParam(f"{pre}{name}.weight", f"{ours}{name}.scale"))
        for name, bias, shape in projections:
            table.append(HFParam(f"{pre}{name}.weight", f"{ours}{name}.kernel", True, shape))
            if bias:
                bias_shape = None if shape is None or name.endswith("o_proj") else shape[:1]
                table.append(HFParam(f"{pre}{name}.bias", f"{ours}{name}.bias", False, bias_shape))
    table.append(HFParam(p + "norm.weight", "norm.scale"))
    if not config.tie_word_embeddings:
        table.append(HFParam("lm_head.weight", "lm_head.kernel", transpose=True))
    return table


class HeadRMSNorm(RMSNorm):
    """Llama-style RMSNorm over the head dimension (Qwen3's q/k norms): ``scale`` [H] carries
    the ``head_dim`` logical axis."""

    def __init__(self, features: int, *, eps: float, dtype: Dtype, param_dtype: Dtype):
        super().__init__(features, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.scale = param(jnp.ones((features,), param_dtype), ("head_dim",))


class LlamaAttention(nnx.Module):
    """Grouped-query attention with RoPE on q and k (Qwen3: q/k RMS-normalized per head first).

    Also the base of Gemma's attention, which overrides :meth:`_head_norm` and
    :meth:`_inv_freq` and sets ``scale`` / ``softcap``. The config supplies ``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``qkv_bias``, ``o_bias``,
    ``qk_norm``, ``rms_norm_eps``, ``rope_theta``, ``rope_scaling_dict``, ``local_layers`` and
    ``initializer_range``.
    """

    scale: float | None = None  # score scale; None = 1 / sqrt(head_dim)
    softcap: float | None = None  # attention-logit soft-cap

    def __init__(self, config: Any, *, dtype, param_dtype, rngs):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        kw = dict(std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_bias = config.qkv_bias
        self.q_proj = Dense(d, (n, h), axes=("embed", "heads", "head_dim"), use_bias=qkv_bias, **kw)
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.k_proj = Dense(d, (k, h), axes=kv_axes, use_bias=qkv_bias, **kw)
        self.v_proj = Dense(d, (k, h), axes=kv_axes, use_bias=qkv_bias, **kw)
        o_axes = ("heads", "head_dim", "embed")
        self.o_proj = Dense((n, h), d, axes=o_axes, use_bias=config.o_bias, **kw)
        norm_kw = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = self._head_norm(h, **norm_kw) if config.qk_norm else None
        self.k_norm = self._head_norm(h, **norm_kw) if config.qk_norm else None
        inv_freq = layers.rope_inv_freq(h, config.rope_theta, config.rope_scaling_dict)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static, hashable
        self.local = config.local_layers
        self.dtype = dtype

    def _head_norm(self, h: int, **kw: Any) -> nnx.Module:
        """The per-head q/k norm over ``head_dim``."""
        return HeadRMSNorm(h, **kw)

    def _inv_freq(self, local: bool | jax.Array) -> jax.Array:
        """RoPE inverse frequencies [H/2] of a (local or global) layer: one base for all."""
        return jnp.asarray(self.inv_freq, jnp.float32)

    def __call__(self, x, ctx: DecoderContext, cache, layer):
        local = decoder.layer_flag(self.local, layer)
        inv_freq = self._inv_freq(local)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, N|K, H)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = layers.apply_rope(q, ctx.positions, inv_freq)  # (B, T, N, H)
        k = layers.apply_rope(k, ctx.positions, inv_freq)  # (B, T, K, H)
        if cache is not None:
            cache = update_cache(cache, k, v, ctx.cache_index)
            k, v = cache
        out = decoder.attend_layer(
            q, k, v, ctx, local, dtype=self.dtype, scale=self.scale, softcap=self.softcap
        )  # (B, T, N, H)
        return self.o_proj(out), cache  # (B, T, D)


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

    def __call__(self, x, ctx, cache, layer):
        a, cache = self.self_attn(self.input_layernorm(x), ctx, cache, layer)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaForCausalLM(decoder.CausalLM):
    """Llama/Mistral/Qwen2/Qwen3 causal LM (and the base of Gemma's, which swaps the block and
    norm classes and scales the embeddings).

    Called as ``model(input_ids, attention_mask, position_ids, *, segment_ids)`` -> logits
    [B, T, V] float32; ``hidden`` gives the final hidden states and ``head`` the output
    projection (see :class:`sevjax.models.decoder.CausalLM`).

    Args:
        config: the hyper-parameters.
        dtype: compute dtype (float32 or bfloat16); softmax and RMSNorm statistics stay f32.
        param_dtype: storage dtype of the parameters.
        options: scanned layers, remat, attention kernel (default: ``ModelOptions()``).
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    block_class: type = LlamaDecoderLayer
    norm_class: type = RMSNorm

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        options: ModelOptions | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.options = resolve(options)
        self.sliding_window = config.sliding_window
        self.local_layers = config.local_layers
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = Embed(v, d, std=config.initializer_range, **kw, rngs=rngs)
        self.layers = stack.make_layers(
            lambda r: self.block_class(config, **kw, rngs=r),
            config.num_hidden_layers,
            options=self.options,
            rngs=rngs,
        )
        self.norm = self.norm_class(d, eps=config.rms_norm_eps, **kw)
        self.lm_head = decoder.untied_head(config.tie_word_embeddings, d, v, **kw, rngs=rngs)

    @property
    def token_embedding(self) -> Embed:
        return self.embed_tokens

    @property
    def kv_heads_and_dim(self) -> tuple[int, int]:
        return self.config.num_key_value_heads, self.config.head_dim

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)  # (B, T, D)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x)
