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
transformers' Gemma 3 ignores it. The attention, the model and the HF table are Llama's
(:mod:`sevjax.models.llama`) with these differences as hooks; the MLP is ``LlamaMLP``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import layers
from sevjax.models.hf_table import HFParam
from sevjax.models.layers import Dtype
from sevjax.models.llama import (
    LAYER_TYPES,
    QK_NORMS,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    check_decoder_config,
    decoder_table,
)
from sevjax.models.options import ModelOptions
from sevjax.sharding import param

HF_BASE_PREFIX = "model."
HF_IGNORE = (r".*rotary_emb\..*", r"lm_head\.weight")
HF_NEW_IF_MISSING: tuple[str, ...] = ()
HF_ARCHITECTURE = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
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
        check_decoder_config(self)

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

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections have a bias (``attention_bias``; what LlamaAttention reads)."""
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        """o_proj has a bias (``attention_bias``)."""
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """q and k are RMS-normalized per head before RoPE (Gemma 3)."""
        return self.model_type == "gemma3_text"

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
    norms = [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ]
    qk_norms = QK_NORMS if config.qk_norm else ()
    return decoder_table(config, (*norms, *qk_norms))


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


class GemmaAttention(LlamaAttention):
    """:class:`~sevjax.models.llama.LlamaAttention` with Gemma's q/k norms (Gemma 3), a RoPE base
    per layer kind, score scale ``query_pre_attn_scalar ** -0.5`` and soft-capped scores
    (Gemma 2)."""

    def __init__(self, config: GemmaConfig, *, dtype, param_dtype, rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        gemma3 = config.model_type == "gemma3_text"  # Gemma 3 ignores attn_logit_softcapping
        self.softcap = None if gemma3 else config.attn_logit_softcapping
        local_freq = layers.rope_inv_freq(config.head_dim, config.local_rope_theta)
        self.local_freq = tuple(float(f) for f in local_freq)  # static, hashable

    def _head_norm(self, h: int, **kw: Any) -> nnx.Module:
        return GemmaRMSNorm(h, axes=("head_dim",), **kw)

    def _inv_freq(self, local: bool | jax.Array) -> jax.Array:
        if isinstance(local, bool):
            return jnp.asarray(self.local_freq if local else self.inv_freq, jnp.float32)
        both = jnp.asarray([self.inv_freq, self.local_freq], jnp.float32)  # (2, H/2)
        return both[local.astype(jnp.int32)]


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


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 (text) causal LM: :class:`~sevjax.models.llama.LlamaForCausalLM` with
    Gemma's blocks and norms, ``sqrt(D)``-scaled embeddings and final-logit soft-capping.

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

    block_class = GemmaDecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(
        self,
        config: GemmaConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        options: ModelOptions | None = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, options=options, rngs=rngs)
        self.final_logit_softcap = config.final_logit_softcapping
        self.normalizer = math.sqrt(config.hidden_size)

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        # HF multiplies by the normalizer cast to the embedding's dtype (sqrt(3072) -> 55.5 in bf16)
        return self.embed_tokens(input_ids) * jnp.asarray(self.normalizer, self.dtype)  # (B, T, D)
