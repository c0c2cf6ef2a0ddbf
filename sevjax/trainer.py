"""The trainer's state and jitted steps, shared by every task; all gradient code lives here.

The severity classifier (:mod:`sevjax.classify`) and the LM (:mod:`sevjax.train`) are *tasks*
(:class:`Task`: their loss and evaluation sums, batches and records) handed to
:func:`sevjax.loop.fit`. This module gives that loop:

- :func:`setup`: the abstract train state ``{params, opt_state, step}`` on the mesh (shapes,
  dtypes, shardings; no memory) from a :class:`ModelSource`. Only the parameters selected by
  ``trainable`` (``nnx.Param`` for full fine-tuning) are trained and have optimizer state; the
  rest (frozen parameters, RNG streams) is ``fixed`` and passed to the steps as an argument.
- :func:`initial_state` (build or load the model, fresh optimizer state) and
  :func:`restored_fixed` (what a restored run needs besides its checkpoint; a full fine-tuning
  run never builds its parameters before restoring them).
- :func:`make_train_step`: ``loss_sums -> value_and_grad -> exact accumulation -> optax``. Each
  micro-batch contributes the numerator of the loss and its gradient; the summed numerator is
  divided once by the summed denominator (:meth:`Task.loss_terms`), so A micro-batches of B rows
  give the same loss and gradient as one batch of A*B rows. The update is applied only when the
  loss, the gradient norm and the update norm are finite, so a non-finite step changes nothing.
- :func:`make_eval_step`, :func:`evaluate`, and the process-local batch placement :func:`put`
  (each process builds and places only its own rows of the global batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sevjax import models, optim, sharding
from sevjax.schema import MeshSection, OptimSection

Batch = dict[str, np.ndarray]
Position = tuple[int, int]  # (epoch, index of the next example in that epoch's order)
TRACES = {"train_step": 0}  # incremented when a train step is traced (tests check compile-once)


class Task(Protocol):
    """What a task hands to :func:`fit`. Methods marked *traced* run inside ``jax.jit``.

    Attributes:
        score: ``(eval record key, "min" | "max")`` for early stopping and the best checkpoint.
        loss_label: what the trained loss is, for the progress bar (e.g. "weighted CE").
        unit: what :meth:`count` counts (the throughput is logged as ``<unit>_per_s``).
        train_rows, eval_rows: global batch rows of train micro-batches and of eval batches.
    """

    score: tuple[str, str]
    loss_label: str
    unit: str  # what count() counts, e.g. "tokens"
    train_rows: int  # B of the [A, B, ...] train batches, across all devices
    eval_rows: int  # B of the [B, ...] eval batches

    def loss_sums(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
        """*Traced.* Float32 sums of one micro-batch ``[B, ...]``; never divides."""

    def loss_terms(self, sums: dict[str, Any]) -> tuple[Any, Any]:
        """*Traced* (and on the host). ``(numerator, denominator)`` of the loss from summed sums;
        the numerator is a sum over examples, the denominator depends on the data only."""

    def eval_sums(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """*Traced.* Summable evaluation statistics of one batch ``[B, ...]``."""

    def train_batch(self, position: Position, rows: slice) -> tuple[Batch, Position]:
        """The step starting at ``position`` (``[A, B, ...]`` arrays, only rows ``rows`` of the
        global B) and the position after it. A pure function of ``position``."""

    def eval_batches(self, rows: slice) -> Iterable[Batch]:
        """Evaluation batches ``[B, ...]`` (rows ``rows`` of each), always the same."""

    def train_record(self, sums: dict[str, float]) -> dict[str, Any]:
        """Log fields from loss sums summed over a logging interval (host)."""

    def eval_record(self, sums: dict[str, Any]) -> dict[str, Any]:
        """Metrics from eval sums summed over all eval batches (host); holds the score key."""

    def describe(self, record: dict[str, Any]) -> str:
        """One line about an eval record, for the log."""

    def count(self, batch: Batch) -> int:
        """Units in a (local) train batch for the throughput figure (e.g. non-padding tokens)."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """How to make the model.

    Attributes:
        factory: a random-init constructor; traceable (``nnx.eval_shape`` and ``jax.jit`` call it),
            so its abstract state costs no memory.
        load: materializes pretrained weights already sharded on the mesh; None = random init
            (``factory`` under ``jit`` with the parameter shardings).
    """

    factory: Callable[[], nnx.Module]
    load: Callable[[], nnx.Module] | None = None


# ------------------------------------------------------------------------------ model and state


def model_options(section: Any) -> models.ModelOptions:
    """The :class:`sevjax.models.ModelOptions` of a model config section.

    ``scan_layers=None`` scans the layers of a pretrained checkpoint (deep, compile time matters)
    and keeps a random-init toy model unrolled.
    """
    scan = section.scan_layers
    return models.ModelOptions(
        scan_layers=section.name_or_path is not None if scan is None else scan,
        remat=section.remat,
        attention=section.attention,
        grad_barrier=getattr(section, "grad_barrier", False),
    )


def make_mesh(section: MeshSection) -> Mesh:
    """The ``data x fsdp x tensor`` mesh (one size may be -1 = the remaining devices).

    Fixed sizes whose product is below the device count use that many devices (a printed
    note), which a single process can do; a multi-process job must use all its devices.
    """
    devices = jax.devices()
    sizes = (section.data, section.fsdp, section.tensor)
    n = int(np.prod(sizes))
    if -1 not in sizes and n < len(devices):
        if jax.process_count() > 1:
            raise ValueError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} uses {n} of "
                f"{len(devices)} devices; a multi-process run must use them all (set one size to -1)"
            )
        print(
            f"[mesh] data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} uses {n} of {len(devices)} devices"
        )
        devices = devices[:n]
    return sharding.make_mesh(*sizes, devices=devices)


@dataclasses.dataclass(frozen=True)
class Graph:
    """The static halves of the split model: train-mode and eval-mode graphdefs, params treedef."""

    train: Any
    eval: Any
    treedef: Any

    def merge(self, params: Any, fixed: dict[str, Any], *, train: bool) -> nnx.Module:
        """A model from pure-dict ``params`` and the non-trained state ``fixed``."""
        state = jax.tree.unflatten(self.treedef, jax.tree.leaves(params))
        # fresh Variable objects at the current trace level (NNX refuses mutating, e.g.
        # reseeding dropout, a Variable created at another one)
        frozen, rest = jax.tree.map(lambda x: x, (fixed["frozen"], fixed["rest"]))
        return nnx.merge(self.train if train else self.eval, state, frozen, rest)


def split(model: nnx.Module, trainable: Any) -> tuple[Graph, Any, dict[str, Any]]:
    """``(graph, params, fixed)``: trained params as a pure dict, frozen params and other state."""
    model.train()
    train_def, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    model.eval()
    eval_def = nnx.split(model, trainable, nnx.Param, ...)[0]
    graph = Graph(train_def, eval_def, jax.tree.structure(params))
    return graph, nnx.to_pure_dict(params), {"frozen": frozen, "rest": rest}


@dataclasses.dataclass
class Setup:
    """Everything :func:`fit` (and ``train.py plan``) derives before any weight exists.

    Attributes:
        graph: the split model's static halves.
        tx, schedule: the optimizer and its learning-rate schedule.
        state: abstract ``{params, opt_state, step}`` (``ShapeDtypeStruct`` with shardings).
        fixed: abstract ``{frozen, rest}`` (the non-trained state), ``fixed_sh`` its shardings.
        mesh: the device mesh.
    """

    graph: Graph
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: dict[str, Any]
    fixed: dict[str, Any]
    fixed_sh: dict[str, Any]
    mesh: Mesh

    @property
    def state_sh(self) -> dict[str, Any]:
        return jax.tree.map(lambda x: x.sharding, self.state)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def rng(self, seed: int) -> jax.Array:
        """The run's base PRNG key, replicated."""
        return jax.device_put(jax.random.PRNGKey(seed), self.replicated)

    def checkpoint_target(self) -> dict[str, Any]:
        """The abstract tree a checkpoint holds: the state plus the rng."""
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated)
        return {**self.state, "rng": rng}


def setup(
    source: ModelSource, *, mesh: Mesh, optim_cfg: OptimSection, steps: int, trainable: Any
) -> Setup:
    """The abstract train state on ``mesh``: shapes, dtypes and shardings, no memory."""
    abstract_model = nnx.eval_shape(source.factory)
    abstract_model.train()
    _, params_state, frozen, rest = nnx.split(abstract_model, trainable, nnx.Param, ...)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(params_state, mesh))
    fixed_sh = {
        "frozen": sharding.state_shardings(frozen, mesh),
        "rest": sharding.state_shardings(rest, mesh),
    }
    graph, params, fixed = split(abstract_model, trainable)
    tx, schedule = optim.make_optimizer(optim_cfg, steps, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optim.opt_state_shardings(tx, params, param_sh, replicated)

    def with_sh(x: Any, sh: NamedSharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    state = {
        "params": jax.tree.map(with_sh, params, param_sh),
        "opt_state": jax.tree.map(with_sh, jax.eval_shape(tx.init, params), opt_sh),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    }
    return Setup(graph, tx, schedule, state, fixed, fixed_sh, mesh)


def initial_state(source: ModelSource, s: Setup, *, trainable: Any):
    """``(state, fixed)``: the model built (or loaded) on the mesh, fresh optimizer state."""
    if source.load is not None:
        model = source.load()
    else:
        model = sharding.create_sharded(source.factory, s.mesh)
    _, params, fixed = split(model, trainable)
    del model
    sh = s.state_sh
    state = {
        "params": params,
        "opt_state": jax.jit(s.tx.init, out_shardings=sh["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"]),
    }
    return state, fixed


def restored_fixed(source: ModelSource, s: Setup, *, trainable: Any) -> dict[str, Any]:
    """The non-trained state for a restored run: frozen weights loaded, other state re-made.

    With nothing frozen (full fine-tuning) only small non-parameter state (RNG streams) is
    needed; it is made inside ``jit`` from ``factory``, whose parameters XLA never computes.
    """
    if jax.tree.leaves(s.fixed["frozen"]):
        return initial_state(source, s, trainable=trainable)[1]

    def make() -> dict[str, Any]:
        return split(source.factory(), trainable)[2]

    return jax.jit(make, out_shardings=s.fixed_sh)()


# -------------------------------------------------------------------------------------- steps


def batch_shardings(batch: Any, mesh: Mesh, lead: int) -> Any:
    """Shardings of a batch tree: axis ``lead`` split over the data axes, the rest replicated."""
    return jax.tree.map(lambda x: sharding.batch_sharding(mesh, len(x.shape), lead), batch)


def accumulate(
    task: Task,
    graph: Graph,
    params: Any,
    fixed: Any,
    batch: Any,
    rng: jax.Array,
    step: Any = 0,
    param_sh: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Exact loss and gradient of a batch split into micro-batches (``lax.scan`` over axis 0).

    Args:
        task: gives the loss sums of one micro-batch and the loss terms of their total.
        graph, params, fixed: the split model (``params`` a pure dict).
        batch: tree of ``[A, B, ...]`` arrays.
        rng, step: micro-batch ``i`` of step ``step`` gets the key ``fold_in(rng, step * A + i)``
            (dropout), so every micro-batch of the run has its own key.
        param_sh: parameter shardings; the gradient accumulators are constrained to them.

    Returns:
        ``(loss, sums, grads)``: the whole batch's loss (numerator / denominator of the summed
        sums), the summed sums, and the gradient of that loss.
    """

    def objective(p, mb, key):
        sums = task.loss_sums(graph.merge(p, fixed, train=True), mb, key)
        return task.loss_terms(sums)[0], sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def constrain(tree):
        return tree if param_sh is None else jax.lax.with_sharding_constraint(tree, param_sh)

    accum = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, xs):
        mb, i = xs
        (_, sums), grads = grad_fn(params, mb, jax.random.fold_in(rng, step * accum + i))
        return jax.tree.map(jnp.add, carry, (constrain(grads), sums)), None

    first = jax.tree.map(lambda x: x[0], batch)
    zero_sums = jax.eval_shape(lambda: objective(params, first, rng)[1])
    zeros = constrain(jax.tree.map(jnp.zeros_like, params))
    zeros = (zeros, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero_sums))
    (grad_sum, sums), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
    numerator, denominator = task.loss_terms(sums)
    grads = jax.tree.map(lambda g: g / denominator, grad_sum)
    return numerator / denominator, sums, grads


def make_train_step(task: Task, s: Setup, batch_sh: Any) -> Callable:
    """The jitted ``train_step(state, fixed, batch, rng) -> (state, metrics)``; ``state`` donated.

    ``batch`` arrays are ``[A, B, ...]``; micro-batch ``i`` of step ``t`` gets the key
    ``fold_in(rng, t * A + i)`` (dropout). Metrics: ``loss``, ``grad_norm`` (before
    clipping), ``lr``, ``finite`` (whether the update was applied) and ``sums`` (the task's loss
    sums over the A micro-batches).
    """
    param_sh = s.state_sh["params"]

    def train_step(state, fixed, batch, rng):
        TRACES["train_step"] += 1
        params = state["params"]
        loss, sums, grads = accumulate(
            task, s.graph, params, fixed, batch, rng, state["step"], param_sh
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = s.tx.update(grads, state["opt_state"], params)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))

        def keep(new, old):  # a non-finite step changes nothing
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new = {
            "params": keep(optax.apply_updates(params, updates), params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
        }
        lr = s.schedule(state["step"])
        return new, {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": ok, "sums": sums}

    return jax.jit(
        train_step,
        in_shardings=(s.state_sh, s.fixed_sh, batch_sh, s.replicated),
        out_shardings=(s.state_sh, s.replicated),
        donate_argnums=(0,),
    )


def make_eval_step(task: Task, s: Setup) -> Callable:
    """The jitted ``eval_step(params, fixed, batch) -> sums`` (eval mode, replicated sums)."""

    def eval_step(params, fixed, batch):
        return task.eval_sums(s.graph.merge(params, fixed, train=False), batch)

    return jax.jit(eval_step, out_shardings=s.replicated)


def local_rows(shardings: Any, global_shape: tuple[int, ...], axis: int) -> slice:
    """The rows of ``axis`` that this process's devices hold (contiguous) under ``shardings``."""
    one = jax.tree.leaves(shardings)[0]
    index = one.addressable_devices_indices_map(global_shape).values()
    n = global_shape[axis]
    starts = [i[axis].start or 0 for i in index]
    stops = [n if i[axis].stop is None else i[axis].stop for i in index]
    lo, hi = min(starts), max(stops)
    if sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)}) < hi - lo:
        raise ValueError(
            f"this process's batch rows are not contiguous: {sorted(zip(starts, stops))}"
        )
    return slice(lo, hi)


def put(batch: Batch, shardings: Any, rows: int, axis: int) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays of ``rows`` rows along ``axis``."""

    def one(x: np.ndarray, sh: NamedSharding) -> jax.Array:
        shape = x.shape[:axis] + (rows,) + x.shape[axis + 1 :]
        return jax.make_array_from_process_local_data(sh, x, shape)

    return jax.tree.map(one, batch, shardings)


def add_sums(total: dict[str, Any], sums: dict[str, Any]) -> dict[str, Any]:
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + np.asarray(v, np.float64)
    return total


def process_rows(mesh: Mesh, rows: int) -> slice:
    """This process's slice of ``rows`` batch rows on ``mesh``."""
    return local_rows(batch_shardings(np.zeros(rows), mesh, lead=0), (rows,), axis=0)


def evaluate(task: Task, eval_step: Callable, params: Any, fixed: Any, mesh: Mesh) -> dict:
    """The task's eval record: eval sums over all its eval batches, finalized once."""
    rows, total = process_rows(mesh, task.eval_rows), {}
    for batch in task.eval_batches(rows):
        sh = batch_shardings(batch, mesh, lead=0)
        add_sums(total, jax.device_get(eval_step(params, fixed, put(batch, sh, task.eval_rows, 0))))
    return task.eval_record(total)
