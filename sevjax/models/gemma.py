"""Gemma 2 and Gemma 3 (text) decoders in Flax NNX, laid out like HF ``Gemma2ForCausalLM`` /
``Gemma3ForCausalLM``.

Shared by both: embeddings scaled by ``sqrt(D)`` (the normalizer cast to the compute dtype, as HF
does), zero-centred RMSNorm ``x * (1 + w)`` computed in float32, pre- and post-norms around both
attention and the GeGLU MLP (``gelu_pytorch_tanh`` gate), grouped-query attention with an explicit
``head_dim`` and score scale ``query_pre_attn_scalar ** -0.5``, local (sliding-window) and global
layers (``layer_types``), tied embeddings by default. Gemma 2 soft-caps the attention scores
(``attn_logit_softcapping``) and the final logits (``final_logit_softcapping``). Gemma 3 adds a
per-head q/k RMSNorm before RoPE and gives local layers their own RoPE base
(``rope_local_base_freq``) while global layers use ``rope_theta`` and ``rope_scaling``; its
configs carry no soft-caps, and a non-null ``attn_logit_softcapping`` is ignored like
transformers' Gemma 3 ignores it. The MLP is :class:`sevjax.models.llama.LlamaMLP`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import decoder, layers, stack
from sevjax.models.decoder import DecoderContext, update_cache
from sevjax.models.hf_table import HFParam
from sevjax.models.layers import Dense, Dtype, Embed
from sevjax.models.llama import LlamaMLP
from sevjax.models.options import ModelOptions, resolve
from sevjax.sharding import param

HF_BASE_PREFIX = "model."
HF_IGNORE = (r".*rotary_emb\..*", r"lm_head\.weight")
HF_NEW_IF_MISSING: tuple[str, ...] = ()
HF_ARCHITECTURE = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LAYER_TYPES = ("sliding_attention", "full_attention")
_NULLABLE = (
    "sliding_window",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is global (HF defaults)


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyper-parameters with HF names. ``rope_scaling`` (global layers) is a sorted tuple of
    (key, value) pairs of the HF dict without ``rope_theta``, or None; ``rope_local_base_freq``
    is the local layers' RoPE base (Gemma 3; None = ``rope_theta``, as in Gemma 2);
    ``layer_types`` is one of :data:`LAYER_TYPES` per layer (default: HF's pattern)."""

    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rope_local_base_freq: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.model_type not in HF_ARCHITECTURE:
            raise ValueError(
                f"GemmaConfig model_type {self.model_type!r}; supported: {list(HF_ARCHITECTURE)}"
            )
        n = self.num_hidden_layers
        if self.layer_types is None:
            every = _DEFAULT_PATTERN[self.model_type]
            types = tuple(LAYER_TYPES[(i + 1) % every == 0] for i in range(n))
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if len(self.layer_types) != n or bad:
            raise ValueError(
                f"layer_types must be {n} entries of {LAYER_TYPES}, got {list(self.layer_types)}"
            )
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is null")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        layers.activation(self.hidden_activation)
        layers.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """``rope_scaling`` as the HF dict (without ``rope_theta``)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: True for a sliding-window (local) layer."""
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def hidden_act(self) -> str:
        """The MLP activation (the name :class:`~sevjax.models.llama.LlamaMLP` reads)."""
        return self.hidden_activation

    @property
    def mlp_bias(self) -> bool:
        """Gemma's MLP projections have no bias."""
        return False

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> GemmaConfig:
        """From an HF ``config.json`` dict: transformers-5 (``rope_parameters``, ``layer_types``)
        or older (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``,
        ``sliding_window_pattern``) style.

        Raises:
            ValueError: for an unsupported ``model_type`` or rope type, or bidirectional attention.
        """
        model_type = d.get("model_type", "gemma2")
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true (an encoder) is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling"}
        kw = {k: v for k, v in d.items() if k in names and (v is not None or k in _NULLABLE)}
        kw["model_type"] = model_type
        if "hidden_activation" not in d and d.get("hidden_act"):
            kw["hidden_activation"] = d["hidden_act"]
        rope = dict(d.get("rope_parameters") or {})
        local = rope.pop("sliding_attention", None)
        rope = dict(rope.pop("full_attention", rope) or d.get("rope_scaling") or {})
        if local is not None:
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"local-layer rope_type {local['rope_type']!r} is not supported")
            kw["rope_local_base_freq"] = float(local.get("rope_theta", 10000.0))
        elif model_type == "gemma3_text":
            kw["rope_local_base_freq"] = float(d.get("rope_local_base_freq", 10000.0))
        else:  # Gemma 2: every layer uses rope_theta
            kw.pop("rope_local_base_freq", None)
        default_theta = 1e6 if model_type == "gemma3_text" else 10000.0
        kw["rope_theta"] = float(rope.pop("rope_theta", d.get("rope_theta", default_theta)))
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        if rope.get("rope_type", "default") != "default":
            kw["rope_scaling"] = tuple(sorted(rope.items()))
        if d.get("layer_types") is None and d.get("sliding_window_pattern"):
            every = int(d["sliding_window_pattern"])
            n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
            kw["layer_types"] = tuple(LAYER_TYPES[(i + 1) % every == 0] for i in range(n))
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict in transformers-5 style (``rope_parameters``)."""
        d = dataclasses.asdict(self)
        for k in ("rope_scaling", "rope_theta", "rope_local_base_freq"):
            d.pop(k)
        scaling, theta = self.rope_scaling_dict or {}, self.rope_theta
        full = {"rope_type": "default", **scaling, "rope_theta": theta}
        if self.model_type == "gemma3_text":
            local = {"rope_type": "default", "rope_theta": self.local_rope_theta}
            d["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        else:
            d["rope_parameters"] = full
        d["layer_types"] = list(self.layer_types)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["architectures"] = [HF_ARCHITECTURE[self.model_type]]
        return d

    @property
    def local_rope_theta(self) -> float:
        """The RoPE base of local layers."""
        return self.rope_theta if self.rope_local_base_freq is None else self.rope_local_base_freq


def hf_param_table(config: GemmaConfig) -> list[HFParam]:
    """One :class:`HFParam` per parameter of :class:`GemmaForCausalLM` (per-layer paths)."""
    p = HF_BASE_PREFIX
    d, n, k, h = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    table = [HFParam(p + "embed_tokens.weight", "embed_tokens.embedding")]
    projections = [  # (name, bias, HF weight shape [out, in])
        ("self_attn.q_proj", config.attention_bias, (n * h, d)),
        ("self_attn.k_proj", config.attention_bias, (k * h, d)),
        ("self_attn.v_proj", config.attention_bias, (k * h, d)),
        ("self_attn.o_proj", config.attention_bias, (d, n * h)),
        ("mlp.gate_proj", False, None),
        ("mlp.up_proj", False, None),
        ("mlp.down_proj", False, None),
    ]
    norms = [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ]
    if config.model_type == "gemma3_text":
        norms += ["self_attn.q_norm", "self_attn.k_norm"]
    for i in range(config.num_hidden_layers):
        pre, ours = f"{p}layers.{i}.", f"layers.{i}."
        for name in norms:
            table.append(HFParam(f"{pre}{name}.weight", f"{ours}{name}.scale"))
        for name, bias, shape in projections:
            table.append(HFParam(f"{pre}{name}.weight", f"{ours}{name}.kernel", True, shape))
            if bias:
                bias_shape = None if name.endswith("o_proj") else shape[:1]
                table.append(HFParam(f"{pre}{name}.bias", f"{ours}{name}.bias", False, bias_shape))
    table.append(HFParam(p + "norm.weight", "norm.scale"))
    if not config.tie_word_embeddings:
        table.append(HFParam("lm_head.weight", "lm_head.kernel", transpose=True))
    return table


class GemmaRMSNorm(nnx.Module):
    """Zero-centred RMSNorm as in HF Gemma: ``x / rms(x) * (1 + scale)``, all in float32, then
    cast (HF Gemma2RMSNorm). ``scale`` holds HF's ``weight`` as is (initialised to zeros)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        axes: tuple[str, ...] = ("embed",),
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.zeros((features,), param_dtype), axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [..., F]. Returns [..., F] in the compute dtype."""
        x32 = jnp.asarray(x, jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class GemmaAttention(nnx.Module):
    """Grouped-query attention: q/k norms (Gemma 3), per-layer RoPE base, score scale
    ``query_pre_attn_scalar ** -0.5``, soft-capped scores (Gemma 2), local or global mask."""

    def __init__(self, config: GemmaConfig, *, dtype, param_dtype, rngs):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        kw = dict(std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bias = config.attention_bias
        self.q_proj = Dense(d, (n, h), axes=("embed", "heads", "head_dim"), use_bias=bias, **kw)
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.k_proj = Dense(d, (k, h), axes=kv_axes, use_bias=bias, **kw)
        self.v_proj = Dense(d, (k, h), axes=kv_axes, use_bias=bias, **kw)
        self.o_proj = Dense((n, h), d, axes=("heads", "head_dim", "embed"), use_bias=bias, **kw)
        gemma3 = config.model_type == "gemma3_text"
        norm_kw = dict(eps=config.rms_norm_eps, axes=("head_dim",), dtype=dtype)
        self.q_norm = GemmaRMSNorm(h, **norm_kw, param_dtype=param_dtype) if gemma3 else None
        self.k_norm = GemmaRMSNorm(h, **norm_kw, param_dtype=param_dtype) if gemma3 else None
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        self.softcap = None if gemma3 else config.attn_logit_softcapping
        self.local = config.local_layers
        # static, hashable inverse frequencies of global and local layers
        global_freq = layers.rope_inv_freq(h, config.rope_theta, config.rope_scaling_dict)
        self.global_freq = tuple(float(f) for f in global_freq)
        self.local_freq = tuple(float(f) for f in layers.rope_inv_freq(h, config.local_rope_theta))
        self.dtype = dtype

    def _inv_freq(self, local: bool | jax.Array) -> jax.Array:
        if isinstance(local, bool):
            return jnp.asarray(self.local_freq if local else self.global_freq, jnp.float32)
        both = jnp.asarray([self.global_freq, self.local_freq], jnp.float32)  # (2, H/2)
        return both[local.astype(jnp.int32)]

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


class GemmaDecoderLayer(nnx.Module):
    """Sandwich-norm block: ``x + post_attn_norm(attn(input_norm(x)))``, then
    ``x + post_ff_norm(mlp(pre_ff_norm(x)))``."""

    def __init__(self, config: GemmaConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps=eps, **kw)
        self.self_attn = GemmaAttention(config, **kw)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps=eps, **kw)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps=eps, **kw)
        self.mlp = LlamaMLP(config, **kw)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps=eps, **kw)

    def __call__(self, x, ctx, cache, layer):
        a, cache = self.self_attn(self.input_layernorm(x), ctx, cache, layer)
        x = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(m), cache


class GemmaForCausalLM(decoder.CausalLM):
    """Gemma 2 / Gemma 3 (text) causal LM.

    Called as ``model(input_ids, attention_mask, position_ids, *, segment_ids)`` -> logits
    [B, T, V] float32, soft-capped by ``final_logit_softcapping`` when set; ``hidden`` gives the
    final hidden states, ``head`` the output projection and ``final_logit_softcap`` the cap that
    the chunked loss applies (see :class:`sevjax.models.decoder.CausalLM`).

    Args:
        config: the hyper-parameters.
        dtype: compute dtype (float32 or bfloat16); softmax and RMSNorm statistics stay f32.
        param_dtype: storage dtype of the parameters.
        options: scanned layers, remat, attention kernel (default: ``ModelOptions()``).
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        config: GemmaConfig,
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
        self.final_logit_softcap = config.final_logit_softcapping
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = Embed(v, d, std=config.initializer_range, **kw, rngs=rngs)
        self.normalizer = math.sqrt(d)
        self.layers = stack.make_layers(
            lambda r: GemmaDecoderLayer(config, **kw, rngs=r),
            config.num_hidden_layers,
            options=self.options,
            rngs=rngs,
        )
        self.norm = GemmaRMSNorm(d, eps=config.rms_norm_eps, **kw)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Dense(d, v, axes=("embed", "vocab"), use_bias=False, **kw, rngs=rngs)
        )

    @property
    def token_embedding(self) -> Embed:
        return self.embed_tokens

    @property
    def kv_heads_and_dim(self) -> tuple[int, int]:
        return self.config.num_key_value_heads, self.config.head_dim

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        # HF multiplies by the normalizer cast to the embedding's dtype (sqrt(3072) -> 55.5 in bf16)
        return self.embed_tokens(input_ids) * jnp.asarray(self.normalizer, self.dtype)  # (B, T, D)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x)
