"""LoRA on the decoder projections, by target name, for any family built on ``layers.Dense``.

:func:`apply` gives every targeted :class:`sevjax.models.layers.Dense` inside ``model.layers``
an ``nnx.LoRA`` branch (A [prod(in), r] random as PEFT initializes it, B [r, prod(out)] zeros, so
the adapted model starts equal to its base) held as ``nnx.LoRAParam`` variables: training with
``trainable=nnx.LoRAParam`` (:func:`sevjax.loop.fit`) trains, checkpoints and keeps optimizer state
for the adapters alone. A scanned stack gets adapters created under ``nnx.vmap`` ([L, ...], a
leading ``layers`` axis), an unrolled one per layer. Adapters carry logical axes (A
(<in axis>, None), B (None, <out axis>), a flattened ``(N, H)`` dimension taking the name of its
first part), so they are created already sharded on a mesh (``apply(..., mesh=mesh)`` after
:func:`sevjax.hf.load_pretrained`). :func:`merged` folds them into the kernels
(``W + alpha / r * A B``) for the HF export; :mod:`sevjax.peft` writes and reads PEFT adapters.

Target names (``model.lora.targets``) match a Dense by its path inside a block, PEFT-style: the
name itself, a dotted suffix of it, or the name plus ``_proj``. So ``q k v o gate up down`` name
the Llama-family projections (``self_attn.q_proj``, ``mlp.down_proj``, ...), ``c_attn c_fc`` and
``c_proj`` GPT-2's (``c_proj`` both the attention and the MLP output; ``attn.c_proj`` or
``mlp.c_proj`` one of them). Names that match nothing in one family (GPT-2's in a Llama) are
ignored, so one list serves every family; a list that matches nothing is an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sevjax import sharding
from sevjax.models import stack
from sevjax.models.layers import Dense
from sevjax.schema import LORA_TARGETS

# PEFT's default: torch's kaiming_uniform_(a=sqrt(5)) on lora_A [r, in], i.e. U(+-1/sqrt(in))
PEFT_A_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", -2, -1)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What :func:`apply` attaches (static; kept on the model as ``model.lora_spec``).

    Attributes:
        rank: r (> 0).
        alpha: the output is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``).
        dropout: dropout on the LoRA input in training (PEFT's ``lora_dropout``).
        targets: target names (see the module docstring).
        base_model_name_or_path: the base checkpoint, written into exported adapters.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_of(section: Any, base_model_name_or_path: str | None = None) -> LoRASpec | None:
    """The :class:`LoRASpec` of a ``model.lora`` config section; None when ``rank`` is 0."""
    if section.rank == 0:
        return None
    return LoRASpec(
        section.rank, section.alpha, section.dropout, tuple(section.targets),
        base_model_name_or_path,
    )  # fmt: skip


def matches(path: str, target: str) -> bool:
    """Whether the block-relative module path ``path`` (``self_attn.q_proj``) is ``target``."""
    last = path.rsplit(".", 1)[-1]
    return path == target or path.endswith("." + target) or last == f"{target}_proj"


def _path(parts: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in parts)


def block_denses(model: nnx.Module) -> Iterator[tuple[str, str, Dense]]:
    """``(model path, block-relative path, dense)`` of every Dense inside ``model.layers``.

    The model path is ``layers.<i>.<rel>`` unrolled and ``layers.<rel>`` scanned.
    """
    scanned = stack.is_scanned(model.layers)
    for parts, module in nnx.iter_modules(model.layers):
        if isinstance(module, Dense):
            rel = parts if scanned else parts[1:]
            yield _path(("layers", *parts)), _path(rel), module


def lora_denses(model: nnx.Module) -> Iterator[tuple[str, str, Dense]]:
    """Like :func:`block_denses`, only those with a LoRA branch."""
    return ((p, r, d) for p, r, d in block_denses(model) if d.lora is not None)


def has_lora(model: nnx.Module) -> bool:
    """Whether ``model`` has LoRA branches (what :func:`apply` attached)."""
    return getattr(model, "lora_spec", None) is not None


@dataclasses.dataclass(frozen=True)
class _Target:
    """Everything needed to create one Dense's adapter (static, no arrays)."""

    n_in: int
    n_out: int
    in_axis: str | None
    out_axis: str | None
    dtype: Any
    layers: int | None  # L of a scanned stack, None unrolled


def _targets(model: nnx.Module, spec: LoRASpec) -> dict[str, _Target]:
    """The Dense layers ``spec.targets`` selects, by model path."""
    scanned = stack.is_scanned(model.layers)
    num = stack.num_layers(model.layers) if scanned else None
    out = {}
    for path, rel, dense in block_denses(model):
        if not any(matches(rel, t) for t in spec.targets):
            continue
        shape = dense.kernel.get_value().shape[1 if scanned else 0 :]
        axes = dense.kernel.get_metadata()["axes"][1 if scanned else 0 :]
        ins, outs = shape[: dense.n_in], shape[dense.n_in :]
        in_axis, out_axis = axes[0], axes[dense.n_in]
        out[path] = _Target(math.prod(ins), math.prod(outs), in_axis, out_axis, dense.dtype, num)
    if not out:
        rels = sorted({rel for _, rel, _ in block_denses(model)})
        raise ValueError(
            f"model.lora.targets {list(spec.targets)} match none of this model's projections {rels}"
        )
    return out


class _Adapter(nnx.Module):
    """One Dense's LoRA branch and its optional input dropout, until attached."""

    def __init__(self, lora: nnx.LoRA, dropout: nnx.Dropout | None):
        self.lora, self.dropout = lora, dropout


def _make_adapter(t: _Target, spec: LoRASpec, rngs: nnx.Rngs) -> _Adapter:
    """One Dense's adapter: ``nnx.LoRA`` (+ ``nnx.Dropout``), stacked [L, ...] when scanned."""

    def make(r: nnx.Rngs) -> _Adapter:
        lora = nnx.LoRA(
            t.n_in, spec.rank, t.n_out, dtype=t.dtype, param_dtype=jnp.float32,
            a_initializer=PEFT_A_INIT, rngs=r,
            a_metadata={"axes": (t.in_axis, None)}, b_metadata={"axes": (None, t.out_axis)},
        )  # fmt: skip
        drop = nnx.Dropout(spec.dropout, deterministic=True, rngs=r) if spec.dropout else None
        return _Adapter(lora, drop)

    return make(rngs) if t.layers is None else stack.stacked(make, t.layers, rngs)


def _make_adapters(targets: dict[str, _Target], spec: LoRASpec, seed: int) -> nnx.Dict:
    # "dropout" gets its own stream: LMTask reseeds it per micro-batch, as BERT's dropout
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    return nnx.Dict({str(i): _make_adapter(t, spec, rngs) for i, t in enumerate(targets.values())})


def _attach(model: nnx.Module, paths: list[str], adapters: nnx.Dict, spec: LoRASpec) -> None:
    denses = {p: d for p, _, d in block_denses(model)}
    for i, path in enumerate(paths):
        adapter, dense = adapters[str(i)], denses[path]
        dense.lora, dense.lora_dropout = adapter.lora, adapter.dropout
        dense.lora_scale = spec.scale
    model.lora_spec = spec


def apply(
    model: nnx.Module, spec: LoRASpec, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None
) -> nnx.Module:
    """Attaches LoRA branches to ``model`` in place (and returns it).

    Args:
        model: a causal LM of our families (its blocks in ``model.layers``).
        spec: rank, alpha, dropout and targets.
        seed: seed of the A initialization (and of the dropout stream).
        mesh: for a materialized (loaded) model, the mesh its adapters are created on, already
            sharded. Without one the call is traceable, so it can run inside a model factory
            under ``nnx.eval_shape`` / ``jax.jit``.

    Raises:
        ValueError: the model already has LoRA, or no target matches.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA branches")
    targets = _targets(model, spec)

    def make() -> nnx.Dict:
        return _make_adapters(targets, spec, seed)

    adapters = make() if mesh is None else sharding.create_sharded(make, mesh)
    _attach(model, list(targets), adapters, spec)
    return model


@jax.jit
def _merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``w + scale * A B`` in float32, cast back to w's dtype (stacked [L, ...] when scanned)."""
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)  # (*W)


def merged(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its kernel and removed (PEFT's
    ``merge_and_unload``); ``model`` is unchanged. Kernels keep their dtype (a bfloat16 base gives
    bfloat16 merged kernels)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables, same arrays
    for _, _, dense in list(lora_denses(copy)):
        lora = dense.lora
        w = dense.kernel.get_value()
        new = _merge_kernel(w, lora.lora_a.get_value(), lora.lora_b.get_value(), dense.lora_scale)
        dense.kernel.set_value(new)
        dense.lora, dense.lora_dropout, dense.lora_scale = None, None, 0.0
    copy.lora_spec = None
    return copy
