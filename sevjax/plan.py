"""``python train.py plan``: will it fit? The real train step compiled ahead of time, never run.

As MaxText's ``train_compile.py``: the LM's train step (:func:`sevjax.trainer.make_train_step`
over :class:`sevjax.train.LMTask`) is traced on abstract state and batch and compiled for a
target, without weights, tokenizer or data. The target is a TPU topology (``v5e:2x4``,
``v6e:4x4``: anything ``jax.experimental.topologies.get_topology_desc`` accepts; libtpu compiles
on any host, CPU-only included: ``pip install -r requirements-tpu.txt``) or the local devices.
The model is its ``config.json`` alone: a Hub id whose config ships in ``configs/hf/``, a local
directory holding ``config.json`` (or a full checkpoint: no weight is read), or the random-init
sizes of ``cfg.model``. With LoRA (``model.lora.rank`` > 0) the step is the LoRA run's: the base
frozen in ``model.lora.base_dtype``, only the adapters trained and given optimizer state, so
``trainable_params`` counts the adapters alone and ``params`` the base besides.

The report gives XLA's per-device memory analysis (``total = arguments + outputs + temp -
aliased``), the device memory (a local accelerator's ``bytes_limit``; for a TPU topology the
HBM libtpu reports available, read from its refusal of an oversized probe program), whether the
step fits (a compile-time out-of-memory is ``fits: false`` with the compiler's figure), and FLOPs
per step, global:

- ``flops_per_step``: the traced program's matmul FLOPs (:func:`jaxpr_flops`): scanned layers and
  micro-batches times their trip counts, rematerialized forwards included;
- ``xla_flops_per_step``: XLA's cost analysis of the compiled program times the devices; XLA
  counts a loop body once, so with loops (``xla_counts_loops_once``) it is far too low;
- ``model_flops_per_step``: ``(6 * N + 12 * L * A * T) * tokens``, N the matmul parameters
  (kernels, the tied head once), ``12 * L * A * T`` the attention matmuls over the full ``T x T``
  square (PaLM appendix B; as benchmarks/gpu_mfu.py). A Pallas kernel without a cost estimate
  (splash attention on TPU) counts as its grid size times its body's matmuls; such kernels are
  listed in ``kernels_counted_by_grid``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jex
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sevjax import hf, lm_data, models, sharding, train, trainer
from sevjax.schema import MeshSection, TrainConfig

HF_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hf"  # published config.json files
GIB = 2**30
_MEM_KEYS = ("arguments", "outputs", "temp", "aliased", "total")
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
# libtpu's two out-of-memory messages: "... Used 20.25G of 15.75G hbm ..." and "... required for
# HLO temporaries (2.00T) exceeds available HBM (15.75G)".
_OOM_PATTERNS = (
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
    re.compile(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
)


# --------------------------------------------------------------------------- model and target


def resolve_model_config(name_or_path: str) -> Any:
    """Our model config from a ``config.json`` alone.

    Args:
        name_or_path: a local directory with ``config.json`` (a checkpoint or the file alone),
            or a Hub id; a Hub id whose published config ships in ``configs/hf/<name>.json``
            (``<name>`` = the id's last part, lower-cased) is read from there, without network.

    Raises:
        FileNotFoundError: no local directory, no shipped config, and the Hub cannot be reached.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return hf.read_config(path)
    shipped = HF_CONFIGS / f"{str(name_or_path).rsplit('/', 1)[-1].lower()}.json"
    if shipped.is_file():
        return models.config_from_hf(json.loads(shipped.read_text()))
    return hf.read_config(name_or_path)  # config.json alone from the Hub (or its cache)


def model_config(cfg: TrainConfig) -> Any:
    """The model config ``python train.py`` would use, read from ``config.json`` alone."""
    if cfg.model.name_or_path is not None:
        return resolve_model_config(cfg.model.name_or_path)
    return train.model_config(cfg)


def tpu_compiler_available() -> bool:
    """Whether libtpu is installed, so that a TPU topology can be compiled for on this host."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and Path(path).is_file()) or importlib.util.find_spec("libtpu") is not None


def target_mesh(section: MeshSection, topology: str | None) -> Mesh:
    """The ``data x fsdp x tensor`` mesh of the target (one size may be -1 = the rest).

    Local devices: the mesh :func:`sevjax.trainer.make_mesh` gives training. A TPU topology:
    its compile-only devices, all of them, laid out along the torus.

    Raises:
        ValueError: no libtpu, a topology libtpu rejects, or sizes that do not fit the devices.
    """
    if topology is None:
        return trainer.make_mesh(section)
    from jax.experimental import mesh_utils, topologies

    if not tpu_compiler_available():
        raise ValueError(
            f"--topology {topology} needs libtpu: pip install -r requirements-tpu.txt "
            f"(jax[tpu]=={jax.__version__})"
        )
    # compile-only use claims no chip: several plans (or a plan beside a test) may load libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(topology, "tpu").devices
    except RuntimeError as e:  # JaxRuntimeError
        raise ValueError(f"TPU topology {topology!r} is not accepted by libtpu: {e}") from e
    mesh = sharding.make_mesh(section.data, section.fsdp, section.tensor, devices=devices)
    try:  # neighbours on the torus along each mesh axis
        return Mesh(mesh_utils.create_device_mesh(mesh.devices.shape, devices), mesh.axis_names)
    except (ValueError, NotImplementedError, AssertionError):
        return mesh  # a shape the torus helper does not place: plain device order


def abstract_batch(cfg: TrainConfig, mesh: Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(batch, shardings)``: the step's ``[A, B, T]`` batch as sharded ShapeDtypeStructs.

    Keys and dtypes are those of :mod:`sevjax.lm_data` batches; T = ``max(cfg.data.buckets)``.
    """
    shape = (cfg.optim.grad_accum, cfg.data.batch_size, max(cfg.data.buckets))
    floats = ("loss_mask", "weights")
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k in floats else jnp.int32)
        for k in lm_data.BATCH_KEYS
    }
    shardings = trainer.batch_shardings(batch, mesh, lead=1)
    batch = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), batch, shardings
    )
    return batch, shardings


# ------------------------------------------------------------------------------------- FLOPs


def _sub_jaxprs(params: dict[str, Any]) -> list[jex.Jaxpr]:
    out = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jex.ClosedJaxpr):
                out.append(x.jaxpr)
            elif isinstance(x, jex.Jaxpr):
                out.append(x)
    return out


def jaxpr_flops(jaxpr: jex.Jaxpr, notes: dict[str, Any]) -> float:
    """Matmul FLOPs of a jaxpr: ``2 * prod(out) * contracted size`` per ``dot_general``.

    A ``scan`` body counts ``length`` times, a ``cond`` its costliest branch, a ``while`` body
    once (no static trip count); ``shard_map`` bodies (per-shard shapes) times their shards;
    other sub-jaxprs (``pjit``, ``remat``, ``custom_vjp``, ...) are walked. A ``pallas_call``
    counts its ``cost_estimate`` or else its body's matmuls times its grid size: every block,
    also those a mask lets the kernel skip. ``notes`` receives ``kernels`` (Pallas kernels counted
    by grid) and ``loops`` (True when a loop body runs more than once).
    """
    notes.setdefault("kernels", set())
    notes.setdefault("loops", False)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[i] for i in contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "pallas_call" and params.get("cost_estimate") is not None:
            total += float(params["cost_estimate"].flops)
        elif name == "pallas_call":  # the body runs once per grid step
            notes["kernels"].add(params.get("name") or name)
            total += math.prod(params["grid_mapping"].grid) * jaxpr_flops(params["jaxpr"], notes)
        elif name == "scan":
            notes["loops"] |= params["length"] > 1
            total += params["length"] * jaxpr_flops(params["jaxpr"].jaxpr, notes)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr, notes) for b in params["branches"])
        elif name == "shard_map":
            shards = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
            total += shards * jaxpr_flops(params["jaxpr"], notes)
        else:
            notes["loops"] |= name == "while"
            total += sum(jaxpr_flops(j, notes) for j in _sub_jaxprs(params))
    return total


def matmul_params(params: Any, config: Any) -> int:
    """N of ``6 * N``: every ``kernel`` parameter plus the tied head ``V * D`` (counted once)."""
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if getattr(path[-1], "key", None) == "kernel":
            n += math.prod(leaf.shape)
    hf_config = config.to_hf_config()
    if hf_config.get("tie_word_embeddings", True):
        n += config.vocab_size * (hf_config.get("n_embd") or hf_config["hidden_size"])
    return n


def model_flops(params: Any, config: Any, tokens: int, seq: int) -> float:
    """``(6 * N + 12 * L * A * T) * tokens`` (see the module docstring)."""
    c = config.to_hf_config()
    if c["model_type"] == "gpt2":
        layers, attn = c["n_layer"], c["n_embd"]
    else:
        layers, attn = c["num_hidden_layers"], c["num_attention_heads"] * config.head_dim
    return (6.0 * matmul_params(params, config) + 12.0 * layers * attn * seq) * tokens


# ----------------------------------------------------------------------------- memory and fit


def parse_size(number: str, unit: str) -> int:
    """Bytes of an XLA human-readable size (``15.75``, ``G``); XLA's units are powers of 1024."""
    return int(float(number) * _UNITS[unit])


def oom_figures(message: str) -> tuple[int, int] | None:
    """``(required, available)`` bytes per device from a libtpu out-of-memory message, or None."""
    for pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            return parse_size(m[1], m[2]), parse_size(m[3], m[4])
    return None


def is_oom(error: BaseException) -> bool:
    """Whether a compile error is the compiler running out of device memory."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def hbm_bytes(device: Any) -> int | None:
    """Memory per device available to a program: ``bytes_limit`` of a local accelerator; for a
    TPU topology's compile-only device, the HBM libtpu reports when it refuses a 2 TiB program
    (precise to its two printed decimals); None for CPU or unknown."""
    if device.platform == "cpu":
        return None
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit is not None:
            return int(limit)
    except jax.errors.JaxRuntimeError:  # compile-only devices have no memory stats
        pass
    if device.platform != "tpu":
        return None
    sh = jax.sharding.SingleDeviceSharding(device)
    probe = jax.ShapeDtypeStruct((2**39,), jnp.float32, sharding=sh)
    try:
        jax.jit(lambda x: x + 1, out_shardings=sh).lower(probe).compile()
    except jax.errors.JaxRuntimeError as e:  # the refusal is the answer
        figures = oom_figures(str(e))
        return None if figures is None else figures[1]
    return None


def memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled step: ``total = arguments + outputs + temp - aliased``."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
    }
    out["total"] = out["arguments"] + out["outputs"] + out["temp"] - out["aliased"]
    return out


# --------------------------------------------------------------------------------------- plan


def _compile(step: Any, args: tuple, mesh: Mesh) -> dict[str, Any]:
    """Traces, lowers and compiles ``step(*args)``: the compiled step, or the memory error."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # activation sharding constraints apply only under a mesh
        traced = step.trace(*args)
        lowered = traced.lower()
        t1 = time.perf_counter()
        try:
            compiled, error = lowered.compile(), None
        except jax.errors.JaxRuntimeError as e:  # RESOURCE_EXHAUSTED: "does not fit" is a result
            if not is_oom(e):
                raise
            compiled, error = None, str(e)
    t2 = time.perf_counter()
    return dict(jaxpr=traced.jaxpr, compiled=compiled, error=error, times=(t1 - t0, t2 - t1))


def plan(
    cfg: TrainConfig, *, topology: str | None = None, hbm_gib: float | None = None
) -> dict[str, Any]:
    """Compiles the LM's train step for a target and reports whether and how it fits.

    Args:
        cfg: the run config (model, data buckets and batch size, grad_accum, optimizer, mesh).
        topology: a TPU topology (``v5e:2x4``) or None for the local devices.
        hbm_gib: device memory in GiB, overriding what the target reports.

    Returns:
        The report (JSON-serializable; see :func:`run` and the module docstring).

    Raises:
        ValueError: a bad topology, mesh or batch for this target, or no libtpu for a topology.
    """
    config = model_config(cfg)
    mesh = target_mesh(cfg.mesh, topology)
    devices = list(mesh.devices.flat)
    train.check_inputs(cfg, config, mesh)
    options = trainer.model_options(cfg.model)  # what training would use
    s = trainer.setup(  # outside set_mesh: optax runs tx.init eagerly, which a TPU topology can't
        train.model_source(cfg, config, None), mesh=mesh, optim_cfg=cfg.optim, steps=cfg.steps,
        trainable=train.trainable(cfg),
    )  # fmt: skip
    batch, batch_sh = abstract_batch(cfg, mesh)
    task = train.LMTask(cfg, None, chunked=config.vocab_size > cfg.loss.chunked_vocab_threshold)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
    step = trainer.make_train_step(task, s, batch_sh)
    out = _compile(step, (s.state, s.fixed, batch, rng), mesh)
    a, b, t = batch["input_ids"].shape
    frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(s.fixed["frozen"]))
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(s.state["params"]))
    notes: dict[str, Any] = {}
    report: dict[str, Any] = {
        "model": cfg.model.name_or_path or f"random-init {cfg.model.model_type}",
        "target": topology or f"local {devices[0].platform}",
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "options": dataclasses.asdict(options),
        "dtype": cfg.model.dtype,
        "chunked_loss": task.chunked,
        "params": trainable + frozen,
        "trainable_params": trainable,
        "lora": _lora_report(cfg),
        "tokens_per_step": a * b * t,
        "batch": {"grad_accum": a, "batch_size": b, "seq": t},
        "flops_per_step": jaxpr_flops(out["jaxpr"].jaxpr, notes),
        "model_flops_per_step": model_flops(_all_params(s), config, a * b * t, t),
        "kernels_counted_by_grid": sorted(notes["kernels"]),
        "lower_seconds": round(out["times"][0], 2),
        "compile_seconds": round(out["times"][1], 2),
    }
    report.update(_fit(out, devices[0], hbm_gib, len(devices)))
    report["xla_counts_loops_once"] = notes["loops"] if out["compiled"] is not None else None
    return report


def _all_params(s: trainer.Setup) -> dict[str, Any]:
    """Every parameter, trained or frozen (a LoRA run's kernels are frozen), for the 6N count."""
    frozen = nnx.to_pure_dict(s.fixed["frozen"])
    return {"trained": s.state["params"], "frozen": frozen}


def _lora_report(cfg: TrainConfig) -> dict[str, Any] | None:
    """The LoRA settings of a report (None for full fine-tuning)."""
    c = cfg.model.lora
    if not c.rank:
        return None
    return dict(rank=c.rank, alpha=c.alpha, targets=list(c.targets), base_dtype=c.base_dtype)


def _fit(out: dict[str, Any], device: Any, hbm_gib: float | None, n: int) -> dict[str, Any]:
    """The memory, fit and XLA FLOP fields of a report."""
    hbm = int(hbm_gib * GIB) if hbm_gib is not None else hbm_bytes(device)
    if out["compiled"] is None:
        required, available = oom_figures(out["error"]) or (None, None)
        return {
            "per_device_bytes": dict.fromkeys(_MEM_KEYS),
            "compiler_required_bytes": required,
            "hbm_bytes_per_device": hbm if hbm is not None else available,
            "fits": False,
            "compiler_error": out["error"].strip().splitlines()[0][:500],
            "xla_flops_per_step": None,
        }
    mem = memory(out["compiled"])
    cost = out["compiled"].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "per_device_bytes": mem,
        "hbm_bytes_per_device": hbm,
        "compiler_required_bytes": None,
        "fits": hbm is None or mem["total"] <= hbm,
        "compiler_error": None,
        "xla_flops_per_step": float(cost.get("flops", 0.0)) * n,
    }


# ------------------------------------------------------------------------------ entry point


def _gib(x: int | None) -> str:
    return "?" if x is None else f"{x / GIB:.2f} GiB"


def table(r: dict[str, Any]) -> str:
    """The report as a short table (what ``python train.py plan`` prints)."""
    mem, hbm, b = r["per_device_bytes"], r["hbm_bytes_per_device"], r["batch"]
    need = mem["total"] or r["compiler_required_bytes"]
    used = f" (needs {_gib(need)} of {_gib(hbm)}: {need / hbm:.0%})" if hbm and need else ""
    rows = {
        "model": f"{r['model']} ({r['dtype']} compute; {r['options']})",
        "target": f"{r['target']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
        "params": f"{r['params']:,} ({r['trainable_params']:,} trainable"
        + (
            f", LoRA r={r['lora']['rank']} on a {r['lora']['base_dtype']} base)"
            if r["lora"]
            else ")"
        ),
        "tokens / step": f"{r['tokens_per_step']:,} = {b['grad_accum']} x {b['batch_size']} x "
        f"{b['seq']}",
        "per device": "  ".join(f"{k} {_gib(mem[k])}" for k in _MEM_KEYS if k != "aliased"),
        "fits": ("yes" if r["fits"] else "NO") + used,
        "FLOPs / step": f"program {r['flops_per_step']:.3e}  model {r['model_flops_per_step']:.3e}",
        "compile": f"{r['compile_seconds']:.1f} s (+ {r['lower_seconds']:.1f} s tracing)",
        "compiler": (r["compiler_error"] or "")[:200],
        "kernels": ", ".join(r["kernels_counted_by_grid"]),
    }
    return "\n".join(f"{k:<14} {v}" for k, v in rows.items() if v)


def run(
    cfg: TrainConfig,
    *,
    topology: str | None = None,
    json_out: str | None = None,
    hbm_gib: float | None = None,
) -> dict[str, Any]:
    """``python train.py plan``: :func:`plan`, printed as a table and written to ``json_out``.

    A step that does not fit is a result, not an error: ``fits`` is False when the compiler
    refuses it for lack of memory (``compiler_error``, ``compiler_required_bytes``) or its total
    exceeds the device memory; with no known device memory (CPU) it is True once compiled.

    Returns:
        The report: ``params``, ``trainable_params``, ``devices``, ``device_kind``,
        ``per_device_bytes`` {arguments, outputs, temp, aliased, total}, ``hbm_bytes_per_device``,
        ``fits``, ``flops_per_step``, ``xla_flops_per_step``, ``model_flops_per_step``,
        ``tokens_per_step``, ``compile_seconds`` and the target, mesh and options.
    """
    report = plan(cfg, topology=topology, hbm_gib=hbm_gib)
    print(table(report))
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report
