"""BERT encoder with a sequence-classification head, in the HF ``BertForSequenceClassification`` layout.

Matches transformers' PyTorch BERT (post-LayerNorm, absolute positions, erf GELU) so that AraBERT
checkpoints import with parity. Kernels are ``[in, out]`` with heads as their own dimension
(query/key/value [D, N, H], attention output [N, H, D]); the HF table transposes and reshapes
torch's ``nn.Linear`` weights. The encoder layers are a :mod:`sevjax.models.stack` (unrolled or
scanned, with remat), so ``hidden_states`` returns the L + 1 states either way.

Dropout draws from the ``"dropout"`` RNG stream. A model is created in eval mode (dropout off,
like transformers' ``from_pretrained``); training switches it on explicitly with
``nnx.view(model, deterministic=False)`` (a view sharing the parameters) or
``model.train()``. A scanned model's dropout streams are stacked [L], so reseed them with
``nnx.reseed(model, dropout=seed, policy="match_shape")``.

Typical use::

    cfg = BertConfig.from_hf_config(json.load(open("config.json")))
    model = BertForSequenceClassification(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    logits = model(input_ids, attention_mask, token_type_ids)  # (B, C), eval mode
    train_model = nnx.view(model, deterministic=False)  # dropout on, same parameters
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax.models import attention, stack
from sevjax.models.hf_table import HFParam
from sevjax.models.layers import Dense, Embed, LayerNorm, activation
from sevjax.models.options import ModelOptions, resolve
from sevjax.sharding import constrain

HF_ARCHITECTURE = "BertForSequenceClassification"
HF_BASE_PREFIX = "bert."
# HF keys that have no counterpart here: the MLM / NSP pre-training heads and buffers.
HF_IGNORE = (
    r"cls\..*",
    r".*position_ids",
    r".*token_type_ids",
)
# Our parameter paths that a checkpoint may lack (BertForMaskedLM has no pooler and no
# classifier); the loader initializes them fresh and says so.
HF_NEW_IF_MISSING = ("pooler.", "classifier.")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT encoder + classifier options; field names follow transformers' ``BertConfig``.

    Defaults are AraBERT v0.2 base (``aubmindlab/bert-base-arabertv02``) with a 3-class head.

    Attributes:
        id2label: class names in index order; empty means ``LABEL_0 .. LABEL_{C-1}``.
        classifier_dropout: dropout before the classifier; None means ``hidden_dropout_prob``.
    """

    vocab_size: int = 64000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    num_labels: int = 3
    id2label: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        try:
            activation(self.hidden_act)
        except ValueError as e:
            raise ValueError(f"BertConfig.hidden_act: {e}") from None
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {p}")
        if self.id2label:
            if not isinstance(self.id2label, tuple):
                raise ValueError(f"BertConfig.id2label must be a tuple, got {type(self.id2label)}")
            if len(self.id2label) != self.num_labels or len(set(self.id2label)) != self.num_labels:
                raise ValueError(
                    f"BertConfig.id2label {self.id2label} must hold num_labels={self.num_labels} "
                    "distinct names"
                )

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in index order (``LABEL_i`` when ``id2label`` is empty)."""
        return self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> BertConfig:
        """Reads a transformers ``config.json`` dict of ``model_type`` "bert".

        The label set is taken from ``id2label`` only when the checkpoint is a sequence
        classifier (its ``architectures`` name one); a pre-training checkpoint such as
        AraBERT's ``BertForMaskedLM`` gets the default 3-class head.

        Raises:
            ValueError: for another model type or an option this module does not implement
                (relative position embeddings, decoder / cross-attention use).
        """
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type {d.get('model_type')!r} is not 'bert'")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={d['position_embedding_type']!r} unsupported; "
                "only 'absolute'"
            )
        for flag in ("is_decoder", "add_cross_attention"):
            if d.get(flag, False):
                raise ValueError(f"{flag}=True unsupported: this is an encoder-only BERT")
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_labels", "id2label"}
        kwargs = {k: d[k] for k in fields if k in d}
        archs = d.get("architectures") or ()
        if any(a.endswith("ForSequenceClassification") for a in archs) and d.get("id2label"):
            id2label = {int(k): v for k, v in d["id2label"].items()}
            if sorted(id2label) != list(range(len(id2label))):
                raise ValueError(f"id2label keys {sorted(id2label)} are not 0..C-1")
            labels = tuple(id2label[i] for i in range(len(id2label)))
            kwargs["num_labels"] = len(labels)
            generic = labels == tuple(f"LABEL_{i}" for i in range(len(labels)))
            kwargs["id2label"] = () if generic else labels
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict for ``BertForSequenceClassification``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del d["num_labels"], d["id2label"]
        labels = self.labels
        d.update(
            model_type="bert",
            architectures=[HF_ARCHITECTURE],
            position_embedding_type="absolute",
            id2label={str(i): name for i, name in enumerate(labels)},
            label2id={name: i for i, name in enumerate(labels)},
        )
        return d


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token type embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        D = cfg.hidden_size
        # Looked up and summed in f32 like torch; the LayerNorm casts to the compute dtype.
        kw = dict(std=cfg.initializer_range, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.word = Embed(cfg.vocab_size, D, axes=("vocab", "embed"), **kw)
        if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.vocab_size:
            table = self.word.embedding
            table[...] = table[...].at[cfg.pad_token_id].set(0)  # as nn.Embedding(padding_idx)
        self.position = Embed(cfg.max_position_embeddings, D, axes=(None, "embed"), **kw)
        self.token_type = Embed(cfg.type_vocab_size, D, axes=(None, "embed"), **kw)
        self.norm = LayerNorm(D, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.dropout = _dropout(cfg.hidden_dropout_prob, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        T = input_ids.shape[1]
        positions = jnp.arange(T)[None]  # (1, T): absolute positions, right padding
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)
        return self.dropout(self.norm(x))  # (B, T, D)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """Dropout created in eval mode (``deterministic=True``)."""
    return nnx.Dropout(rate, deterministic=True, rngs=rngs)


class BertSelfAttention(nnx.Module):
    """Bidirectional multi-head attention with a key padding mask; softmax in float32."""

    def __init__(self, cfg: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        D, N = cfg.hidden_size, cfg.num_attention_heads
        H = D // N
        kw = dict(std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_axes = ("embed", "heads", "head_dim")
        self.query = Dense(D, (N, H), axes=qkv_axes, **kw)
        self.key = Dense(D, (N, H), axes=qkv_axes, **kw)
        self.value = Dense(D, (N, H), axes=qkv_axes, **kw)
        self.output = Dense((N, H), D, axes=("heads", "head_dim", "embed"), **kw)
        self.dropout = _dropout(cfg.attention_probs_dropout_prob, rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, mask: attention.AttentionMask) -> jax.Array:
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, N, H) each
        out = attention.attend(
            q, k, v, mask, dtype=self.dtype, probs_dropout=self.dropout
        )  # (B, T, N, H)
        return self.output(out)  # (B, T, D)


class BertLayer(nnx.Module):
    """Post-LN transformer block: ``LN(x + attn(x))`` then ``LN(h + mlp(h))``.

    Follows the stack convention ``layer(x, mask, cache, index) -> (x, None)``.
    """

    def __init__(self, cfg: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        D, F, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn = BertSelfAttention(cfg, **kw, rngs=rngs)
        self.attn_dropout = _dropout(cfg.hidden_dropout_prob, rngs)
        self.attn_norm = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)
        self.intermediate = Dense(D, F, axes=("embed", "mlp"), std=std, **kw, rngs=rngs)
        self.output = Dense(F, D, axes=("mlp", "embed"), std=std, **kw, rngs=rngs)
        self.mlp_dropout = _dropout(cfg.hidden_dropout_prob, rngs)
        self.mlp_norm = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array, mask: attention.AttentionMask, cache=None, layer=None):
        h = self.attn_norm(x + self.attn_dropout(self.attn(x, mask)))
        y = self.output(self.act(self.intermediate(h)))
        return self.mlp_norm(h + self.mlp_dropout(y)), cache


class BertForSequenceClassification(nnx.Module):
    """BERT encoder, tanh pooler on the first token, dropout and a linear classifier.

    Args:
        config: the model options.
        dtype: compute dtype (float32 or bfloat16); softmax and LayerNorm statistics stay f32.
        param_dtype: storage dtype of the parameters.
        options: scanned layers, remat, attention kernel (default: ``ModelOptions()``).
        rngs: ``params`` for initialization and ``dropout`` for dropout masks (a plain
            ``nnx.Rngs(seed)`` serves both).
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        options: ModelOptions | None = None,
        rngs: nnx.Rngs,
    ):
        if "dropout" not in rngs:
            # Dropout gets its own "dropout"-tagged stream, so nnx.reseed(model, dropout=seed)
            # reaches it even when the caller passed a plain nnx.Rngs(seed).
            rngs = nnx.Rngs(params=rngs.params(), dropout=rngs.params())
        self.config = config
        self.dtype = dtype
        self.options = resolve(options)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        D, std = config.hidden_size, config.initializer_range
        self.embeddings = BertEmbeddings(config, **kw, rngs=rngs)
        self.layers = stack.make_layers(
            lambda r: BertLayer(config, **kw, rngs=r),
            config.num_hidden_layers,
            options=self.options,
            rngs=rngs,
        )
        self.pooler = Dense(D, D, axes=("embed", None), std=std, **kw, rngs=rngs)
        p = config.classifier_dropout
        self.dropout = _dropout(config.hidden_dropout_prob if p is None else p, rngs)
        self.classifier = Dense(
            D, config.num_labels, axes=("embed", "classes"), std=std, **kw, rngs=rngs
        )

    def _inputs(self, input_ids, attention_mask, token_type_ids):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if x is not None and x.shape != input_ids.shape:
                raise ValueError(f"{name} shape {x.shape} != input_ids shape {input_ids.shape}")
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask > 0
        tt = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        return attention.padding_mask(valid, implementation=self.options.attention), tt

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> list[jax.Array]:
        """Encoder outputs, as transformers' ``output_hidden_states=True``.

        Args:
            input_ids: [B, T] int token ids, right-padded.
            attention_mask: [B, T], 1 = token, 0 = padding (default all ones).
            token_type_ids: [B, T] int segment ids (default zeros).

        Returns:
            ``num_hidden_layers + 1`` arrays [B, T, D] in the compute dtype: the embedding
            output, then the output of each layer (scanned: the scan's stacked outputs, split).
        """
        mask, tt = self._inputs(input_ids, attention_mask, token_type_ids)
        x = constrain(self.embeddings(input_ids, tt), ("batch", "seq", "embed"))  # (B, T, D)
        _, _, outs = stack.run_layers(self.layers, x, mask, options=self.options, collect=True)
        return [x, *outs]  # a stacked [L, B, T, D] unpacks into L arrays

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Classification logits.

        Args:
            input_ids: [B, T] int token ids, right-padded (position ids are ``arange(T)``).
            attention_mask: [B, T], 1 = token, 0 = padding (default all ones).
            token_type_ids: [B, T] int segment ids (default zeros).

        Returns:
            [B, C] logits in the compute dtype, C = ``config.num_labels``.
        """
        mask, tt = self._inputs(input_ids, attention_mask, token_type_ids)
        x = constrain(self.embeddings(input_ids, tt), ("batch", "seq", "embed"))  # (B, T, D)
        x, _, _ = stack.run_layers(self.layers, x, mask, options=self.options)
        pooled = jnp.tanh(self.pooler(x[:, 0]))  # (B, D)
        return self.classifier(self.dropout(pooled))  # (B, C)


def hf_param_table(config: BertConfig) -> list[HFParam]:
    """One :class:`HFParam` per parameter of :class:`BertForSequenceClassification`.

    hf_key is the ``BertForSequenceClassification`` checkpoint key; path is the per-layer
    dot-joined path in ``nnx.state(model, nnx.Param)``; torch ``nn.Linear`` weights [out, in]
    are transposed, and the attention projections reshaped to per-head kernels.
    """
    D = config.hidden_size

    def dense(hf: str, ours: str, heads: bool = False, out_heads: bool = True):
        shape = (D, D) if heads else None
        bias_shape = (D,) if heads and out_heads else None
        return [
            HFParam(f"{hf}.weight", f"{ours}.kernel", True, shape),
            HFParam(f"{hf}.bias", f"{ours}.bias", False, bias_shape),
        ]

    def norm(hf: str, ours: str):
        return [HFParam(f"{hf}.weight", f"{ours}.scale"), HFParam(f"{hf}.bias", f"{ours}.bias")]

    e = "bert.embeddings"
    rows = [
        HFParam(f"{e}.word_embeddings.weight", "embeddings.word.embedding"),
        HFParam(f"{e}.position_embeddings.weight", "embeddings.position.embedding"),
        HFParam(f"{e}.token_type_embeddings.weight", "embeddings.token_type.embedding"),
        *norm(f"{e}.LayerNorm", "embeddings.norm"),
    ]
    for i in range(config.num_hidden_layers):
        hf, ours = f"bert.encoder.layer.{i}", f"layers.{i}"
        for name in ("query", "key", "value"):
            rows += dense(f"{hf}.attention.self.{name}", f"{ours}.attn.{name}", heads=True)
        rows += dense(f"{hf}.attention.output.dense", f"{ours}.attn.output", True, False)
        rows += norm(f"{hf}.attention.output.LayerNorm", f"{ours}.attn_norm")
        rows += dense(f"{hf}.intermediate.dense", f"{ours}.intermediate")
        rows += dense(f"{hf}.output.dense", f"{ours}.output")
        rows += norm(f"{hf}.output.LayerNorm", f"{ours}.mlp_norm")
    rows += dense("bert.pooler.dense", "pooler")
    rows += dense("classifier", "classifier")
    return rows
