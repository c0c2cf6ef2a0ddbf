"""GPT-2 language model (AraGPT2 and friends) in Flax NNX, laid out like HF ``GPT2LMHeadModel``.

Pre-LN blocks, learned positions, ``gelu_new`` MLP and a tied LM head, on the shared decoder
(:class:`sevjax.models.decoder.CausalLM`). The fused ``c_attn`` kernel is stored [D, 3, N, H]
(HF ``Conv1D``: [D, 3D]) so that tensor parallelism splits the heads of q, k and v alike rather
than cutting across the q|k|v boundary; ``c_proj`` is [N, H, D]. HF ``Conv1D`` weights are
already [in, out], so the HF table only reshapes (and transposes an untied ``lm_head``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import attention, decoder, layers, stack
from sevjax.models.decoder import DecoderContext, update_cache
from sevjax.models.hf_table import HFParam
from sevjax.models.layers import Dense, Dtype, Embed, LayerNorm
from sevjax.models.options import ModelOptions, resolve

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


def hf_param_table(config: GPT2Config) -> list[HFParam]:
    """One :class:`HFParam` per parameter of :class:`GPT2LMHeadModel` (per-layer paths)."""
    p, d = HF_BASE_PREFIX, config.n_embd
    table = [HFParam(p + "wte.weight", "wte.embedding"), HFParam(p + "wpe.weight", "wpe.embedding")]
    for i in range(config.n_layer):
        pre, ours = f"{p}h.{i}.", f"layers.{i}."
        table += [
            HFParam(pre + "ln_1.weight", ours + "ln_1.scale"),
            HFParam(pre + "ln_1.bias", ours + "ln_1.bias"),
            HFParam(pre + "attn.c_attn.weight", ours + "attn.c_attn.kernel", hf_shape=(d, 3 * d)),
            HFParam(pre + "attn.c_attn.bias", ours + "attn.c_attn.bias", hf_shape=(3 * d,)),
            HFParam(pre + "attn.c_proj.weight", ours + "attn.c_proj.kernel", hf_shape=(d, d)),
            HFParam(pre + "attn.c_proj.bias", ours + "attn.c_proj.bias"),
            HFParam(pre + "ln_2.weight", ours + "ln_2.scale"),
            HFParam(pre + "ln_2.bias", ours + "ln_2.bias"),
            HFParam(pre + "mlp.c_fc.weight", ours + "mlp.c_fc.kernel"),
            HFParam(pre + "mlp.c_fc.bias", ours + "mlp.c_fc.bias"),
            HFParam(pre + "mlp.c_proj.weight", ours + "mlp.c_proj.kernel"),
            HFParam(pre + "mlp.c_proj.bias", ours + "mlp.c_proj.bias"),
        ]
    table += [HFParam(p + "ln_f.weight", "ln_f.scale"), HFParam(p + "ln_f.bias", "ln_f.bias")]
    if not config.tie_word_embeddings:
        table.append(HFParam("lm_head.weight", "lm_head.kernel", transpose=True))
    return table


class GPT2Attention(nnx.Module):
    """Causal self-attention with the fused ``c_attn`` [D, 3, N, H] projection."""

    def __init__(self, config: GPT2Config, *, dtype, param_dtype, rngs):
        d, n, std = config.n_embd, config.n_head, config.initializer_range
        h = d // n
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_axes = ("embed", None, "heads", "head_dim")
        self.c_attn = Dense(d, (3, n, h), axes=qkv_axes, std=std, **kw)
        proj_std = std / math.sqrt(2 * config.n_layer)
        self.c_proj = Dense((n, h), d, axes=("heads", "head_dim", "embed"), std=proj_std, **kw)
        self.scale = 1.0 / math.sqrt(h) if config.scale_attn_weights else 1.0
        self.inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.dtype = dtype

    def __call__(self, x, ctx: DecoderContext, cache, layer):
        qkv = self.c_attn(x)  # (B, T, 3, N, H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, H) each
        if cache is not None:
            cache = update_cache(cache, k, v, ctx.cache_index)
            k, v = cache
        scale = self.scale
        if self.inverse_layer_idx:  # ``layer`` is traced when scanned
            scale = scale / (jnp.asarray(layer, jnp.float32) + 1.0)
        out = attention.attend(q, k, v, ctx.mask, dtype=self.dtype, scale=scale)  # (B,T,N,H)
        return self.c_proj(out), cache  # (B, T, D)


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
    """Pre-LN transformer block: ``block(x, ctx, cache, layer) -> (x, cache)``."""

    def __init__(self, config: GPT2Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps=eps, **kw)
        self.attn = GPT2Attention(config, **kw)
        self.ln_2 = LayerNorm(config.n_embd, eps=eps, **kw)
        self.mlp = GPT2MLP(config, **kw)

    def __call__(self, x, ctx, cache, layer):
        a, cache = self.attn(self.ln_1(x), ctx, cache, layer)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class GPT2LMHeadModel(decoder.CausalLM):
    """GPT-2 with an LM head.

    Called as ``model(input_ids, attention_mask, position_ids, *, segment_ids)`` -> logits
    [B, T, V] float32; ``hidden`` gives the final hidden states and ``head`` the output
    projection (see :class:`sevjax.models.decoder.CausalLM`).

    Args:
        config: the hyper-parameters.
        dtype: compute dtype (float32 or bfloat16); softmax and LayerNorm statistics stay f32.
        param_dtype: storage dtype of the parameters.
        options: scanned layers, remat, attention kernel (default: ``ModelOptions()``).
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        config: GPT2Config,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        options: ModelOptions | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.options = resolve(options)
        self.max_positions = config.n_positions
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        std = config.initializer_range
        self.wte = Embed(config.vocab_size, config.n_embd, std=std, **kw, rngs=rngs)
        self.wpe = Embed(
            config.n_positions, config.n_embd, axes=(None, "embed"), std=0.01, **kw, rngs=rngs
        )
        self.layers = stack.make_layers(
            lambda r: GPT2Block(config, **kw, rngs=r),
            config.n_layer,
            options=self.options,
            rngs=rngs,
        )
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, **kw)
        self.lm_head = decoder.untied_head(
            config.tie_word_embeddings, config.n_embd, config.vocab_size, **kw, rngs=rngs
        )

    @property
    def token_embedding(self) -> Embed:
        return self.wte

    @property
    def kv_heads_and_dim(self) -> tuple[int, int]:
        return self.config.n_head, self.config.n_embd // self.config.n_head

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.wte(input_ids) + self.wpe(positions)  # (B, T, D)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.ln_f(x)
