"""Model families and the registry that dispatches on HF ``model_type``.

``gpt2`` -> :mod:`sevjax.models.gpt2`; ``llama``, ``mistral``, ``qwen2``, ``qwen3`` ->
:mod:`sevjax.models.llama`; ``gemma2``, ``gemma3_text`` -> :mod:`sevjax.models.gemma` (built on
``llama``'s attention, model and HF table); ``bert`` -> :mod:`sevjax.models.bert`. Family modules are imported lazily so that one family's
absence or import cost never affects another. Shared pieces: :mod:`~sevjax.models.layers`
(dense, norms, RoPE), :mod:`~sevjax.models.attention` (masks and kernels),
:mod:`~sevjax.models.stack` (unrolled / scanned layers, remat), :mod:`~sevjax.models.decoder`
(the causal-LM trunk and KV cache), :mod:`~sevjax.models.hf_table` (HF table rows).
:class:`ModelOptions` switches layout and kernels without changing the model code.

Loading a checkpoint is :func:`sevjax.hf.load_pretrained` (this package never imports
``sevjax.hf``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models.options import ModelOptions
from sevjax.sharding import create_sharded

SUPPORTED_MODEL_TYPES = (
    "bert",
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
)


def family(model_type: str) -> ModuleType:
    """The family module for an HF ``model_type``.

    Raises:
        ValueError: for a ``model_type`` outside :data:`SUPPORTED_MODEL_TYPES`.
    """
    if model_type == "gpt2":
        from sevjax.models import gpt2

        return gpt2
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        from sevjax.models import llama

        return llama
    if model_type in ("gemma2", "gemma3_text"):
        from sevjax.models import gemma

        return gemma
    if model_type == "bert":
        from sevjax.models import bert

        return bert
    raise ValueError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _classes(module: ModuleType) -> tuple[type, type]:
    """(config class, task model class) of a family module."""
    if module.__name__.endswith(".gpt2"):
        return module.GPT2Config, module.GPT2LMHeadModel
    if module.__name__.endswith(".llama"):
        return module.LlamaConfig, module.LlamaForCausalLM
    if module.__name__.endswith(".gemma"):
        return module.GemmaConfig, module.GemmaForCausalLM
    return module.BertConfig, module.BertForSequenceClassification


def model_type_of(config: Any) -> str:
    """The HF ``model_type`` of one of our config dataclasses."""
    return config.to_hf_config()["model_type"]


def max_positions(config: Any) -> int | None:
    """The model's position limit (``n_positions`` / ``max_position_embeddings``)."""
    hf_config = config.to_hf_config()
    return hf_config.get("n_positions") or hf_config.get("max_position_embeddings")


def config_from_hf(d: dict[str, Any]) -> Any:
    """Our config dataclass from an HF ``config.json`` dict, dispatched on ``model_type``.

    Raises:
        ValueError: if ``model_type`` is missing or unsupported.
    """
    if "model_type" not in d:
        raise ValueError(f"config has no model_type; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    config_cls, _ = _classes(family(d["model_type"]))
    return config_cls.from_hf_config(d)


def model_class(config: Any) -> type:
    """The task model class (e.g. ``GPT2LMHeadModel``) for a config."""
    return _classes(family(model_type_of(config)))[1]


def build(
    config: Any,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    options: ModelOptions | None = None,
) -> nnx.Module:
    """A randomly initialised model for ``config`` in eval mode (dropout off), created already
    sharded when ``mesh`` is set.

    Args:
        config: a GPT2Config / LlamaConfig / GemmaConfig / BertConfig.
        seed: seed of the ``params`` (and ``dropout``) streams.
        dtype: compute dtype.
        param_dtype: storage dtype of the parameters.
        mesh: optional device mesh; parameters follow :data:`sevjax.sharding.RULES`.
        options: layout and kernels (default ``ModelOptions()``).
    """
    cls = model_class(config)
    return create_sharded(
        lambda: cls(
            config, dtype=dtype, param_dtype=param_dtype, options=options, rngs=nnx.Rngs(seed)
        ),
        mesh,
    )


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ModelOptions",
    "build",
    "config_from_hf",
    "family",
    "max_positions",
    "model_class",
    "model_type_of",
]
