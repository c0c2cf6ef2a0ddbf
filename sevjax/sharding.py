"""Logical axis names and the one rules table that maps them onto the device mesh.

Every parameter is created with ``sevjax.sharding.param(value, axes)``, which records its logical
axis names (``embed``, ``heads``, ...) as NNX variable metadata under ``axes``. The mesh has at most
three axes, ``data``, ``fsdp`` and ``tensor``; :data:`RULES` says which mesh axes each logical
name may use. A mesh axis is used at most once per array (MaxText's convention), and a dimension
that the mesh axes do not divide is left replicated rather than failing; that case is logged
once (a warning naming the parameter path or logical axis, the dimension and the mesh axis).
Scanned models carry a leading ``layers`` axis, which is never sharded.

Typical use::

    mesh = make_mesh(data=-1, fsdp=1, tensor=1)
    model = create_sharded(lambda: GPT2(cfg, rngs=nnx.Rngs(0)), mesh)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes it may be sharded over, in order.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("classes", ()),
    ("seq", ()),
    ("head_dim", ()),
    ("layers", ()),
)
LOGICAL_AXES = tuple(name for name, _ in RULES)
_RULES = dict(RULES)
log = logging.getLogger(__name__)
_WARNED: set[tuple[str, int, str, int]] = set()


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """Wraps a parameter value with its logical axis names.

    Args:
        value: the initial value.
        axes: one logical name (or None) per dimension of ``value``.

    Returns:
        An ``nnx.Param`` whose metadata ``axes`` holds the names.

    Raises:
        ValueError: if the number of names differs from ``value.ndim`` or a name is unknown.
    """
    axes = tuple(axes)
    if len(axes) != len(value.shape):
        raise ValueError(f"axes {axes} do not match parameter shape {tuple(value.shape)}")
    unknown = [a for a in axes if a is not None and a not in _RULES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; known: {LOGICAL_AXES}")
    return nnx.Param(value, axes=axes)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh; one size may be -1 for "the remaining devices".

    Raises:
        ValueError: if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh size may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(f"mesh sizes {sizes} do not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{math.prod(sizes)} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None],
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    *,
    name: str | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` on ``mesh`` following :data:`RULES`.

    Mesh axes of size 1 are dropped, a mesh axis is used at most once, and with ``shape`` a mesh
    axis that does not divide its dimension is skipped (that dimension stays replicated, and a
    warning naming ``name`` (or the logical axis), the dimension and the mesh axis is logged
    once per distinct case).
    """
    used: set[str] = set()
    spec = []
    for i, logical in enumerate(axes):
        chosen = []
        size = 1
        for mesh_axis in _RULES.get(logical, ()) if logical is not None else ():
            n = mesh.shape.get(mesh_axis, 1)
            if n == 1 or mesh_axis in used:
                continue
            if shape is not None and shape[i] % (size * n):
                _warn_replicated(name or f"logical axis {logical!r}", shape[i], mesh_axis, n)
                continue
            chosen.append(mesh_axis)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _warn_replicated(what: str, dim: int, mesh_axis: str, size: int) -> None:
    key = (what, dim, mesh_axis, size)
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning(
        "%s: dimension %d is not divisible by mesh axis %r (size %d); left replicated",
        what,
        dim,
        mesh_axis,
        size,
    )


def _axes_of(variable: Any) -> tuple[str | None, ...] | None:
    return variable.get_metadata().get("axes") if isinstance(variable, nnx.Variable) else None


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree of ``NamedSharding`` matching ``state`` (an ``nnx.State`` or tree of variables).

    Variables without ``axes`` metadata (RNG keys, counters) are replicated.
    """

    def one(path: Any, x: Any) -> Any:
        axes = _axes_of(x)
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        shape = getattr(value, "shape", ())
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        spec = logical_to_spec(axes, mesh, shape, name=name) if axes else PartitionSpec()
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
    """Builds a model with every parameter created directly on its target sharding.

    The model is traced abstractly first (no memory), then created inside one ``jit`` whose
    output shardings come from the logical axes, so no device ever holds a full copy.
    """
    if mesh is None:
        return factory()
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    def init() -> Any:
        return nnx.split(factory())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int = 2, lead: int = 0) -> NamedSharding:
    """Sharding of a batch array: dimension ``lead`` over ``data`` and ``fsdp``, the rest
    replicated (``lead=1`` for the ``[A, B, ...]`` micro-batches of gradient accumulation)."""
    axes = (None,) * lead + ("batch",) + (None,) * (ndim - lead - 1)
    return NamedSharding(mesh, logical_to_spec(axes, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Applies a logical sharding constraint to an activation when a mesh is active.

    Outside ``jax.set_mesh(mesh)`` (plain single-device use) this returns ``x`` unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, x.shape))
