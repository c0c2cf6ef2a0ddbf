"""``ModelOptions``: the scale switches shared by every model family (same code path, no forks).

``scan_layers``
    False: the L blocks are a list (``layers.0.attn...``) applied by a Python loop, so XLA sees
    an unrolled program whose compile time grows with depth. True: the blocks are ONE module
    whose parameters carry a leading ``layers`` logical axis (``layers.attn...`` of shape
    [L, ...]), created with ``nnx.vmap`` and applied with ``nnx.scan``: compile time no longer
    grows with depth, and a KV cache is stacked [L, B, S, K, H].
``remat``
    Rematerialization per block (per scanned layer, or per list entry):
    "none"  keep every activation for the backward pass (fastest, most memory);
    "full"  keep nothing inside a block; recompute the whole block in the backward pass
            (least memory, about one extra forward);
    "dots"  keep only the outputs of matmuls that have no batch dimension, i.e. the
            projections ``x @ W`` (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``);
            norms, activations and attention scores/probabilities are recomputed.
``attention``
    The attention kernel (:mod:`sevjax.models.attention` decides per call, at trace time):
    "reference" the float32-softmax einsum path, the parity baseline;
    "xla"       ``jax.nn.dot_product_attention(implementation="xla")``;
    "cudnn"     ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention,
                GPU, bf16/fp16);
    "splash"    the Pallas TPU splash-attention kernel (on a CPU target it runs in Pallas
                interpret mode, for tests only);
    "auto"      cudnn on GPU and splash on TPU where they apply, otherwise xla.
    A kernel that cannot serve a call (decode step, odd length, float32 on cuDNN, attention-
    probability dropout) falls back to "xla" ("reference" under dropout), with one warning
    when the kernel was asked for explicitly. Attention-logit soft-capping (Gemma 2) has no
    ``jax.nn.dot_product_attention`` form: such layers use "reference", or "splash" on TPU,
    which applies the cap itself.
``grad_barrier``
    XLA:CPU only: route each block's residual gradient through a barrier between unrolled
    blocks (see :func:`sevjax.models.stack.grad_barrier`); ignored when scanned and on other
    backends.
"""

from __future__ import annotations

import dataclasses

import jax

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "reference")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a model is laid out and run; the defaults reproduce the plain unrolled model.

    Attributes:
        scan_layers: stack the blocks into one scanned module (leading ``layers`` axis).
        remat: "none" | "full" | "dots" (see the module docstring).
        attention: "auto" | "xla" | "cudnn" | "splash" | "reference".
        grad_barrier: CPU-only gradient barrier between unrolled blocks.
    """

    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"
    grad_barrier: bool = False

    def __post_init__(self) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelOptions.remat={self.remat!r}; allowed: {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"ModelOptions.attention={self.attention!r}; allowed: {ATTENTION_IMPLEMENTATIONS}"
            )
        for name in ("scan_layers", "grad_barrier"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelOptions.{name} must be a bool, got {getattr(self, name)!r}")


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a ``remat`` name, or None for "none" (no checkpoint)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat={name!r}; allowed: {REMAT_POLICIES}")


def resolve(options: ModelOptions | None) -> ModelOptions:
    """``options`` or the defaults.

    Raises:
        ValueError: if ``options`` is not a ModelOptions.
    """
    if options is None:
        return ModelOptions()
    if not isinstance(options, ModelOptions):
        raise ValueError(f"options must be a sevjax.models.ModelOptions, got {type(options)}")
    return options
