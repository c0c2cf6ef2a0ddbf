"""Severity-aware LM fine-tuning: sharded, checkpointed, resumable. Entry point: :func:`run`.

The pipeline: annotated examples -> tokenizer -> model (already sharded on the mesh) -> AdamW with
exact gradient accumulation -> periodic validation, JSONL/TensorBoard logs, Orbax checkpoints ->
loss-curve PNG and an HF export under ``<run_dir>/hf``. Rerunning the same command resumes from
the newest checkpoint in ``run_dir`` (on any mesh shape).

Multi-process runs (several hosts, one process each): :func:`maybe_initialize_distributed` calls
``jax.distributed.initialize()`` when the standard environment is present, i.e.
``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), a SLURM job with
more than one task, an Open MPI launch (``OMPI_COMM_WORLD_SIZE`` > 1), or a multi-host TPU slice
(``TPU_WORKER_HOSTNAMES``). Every process builds the same global batch and feeds its own
devices; only process 0 writes logs, plots and the HF export (Orbax coordinates checkpoints).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sevjax import lm_data, models, optim, sharding
from sevjax import loss as L
from sevjax.checkpoint import Checkpointer
from sevjax.config import TrainConfig, to_dict

TRACES = {"train_step": 0}  # incremented when train_step is traced (tests check it compiles once)


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` once when a multi-process environment is set."""
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(data: int, fsdp: int, tensor: int) -> jax.sharding.Mesh:
    """The mesh; with fixed sizes below the device count it uses the first devices (a note)."""
    devices = jax.devices()
    sizes = (data, fsdp, tensor)
    if -1 not in sizes and int(np.prod(sizes)) < len(devices):
        n = int(np.prod(sizes))
        print(f"[mesh] data={data} fsdp={fsdp} tensor={tensor} uses {n} of {len(devices)} devices")
        devices = devices[:n]
    return sharding.make_mesh(data, fsdp, tensor, devices=devices)


# ----------------------------------------------------------------------------------------------
# model and steps
# ----------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, tokenizer: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """``(model, model_config)``: pretrained weights or a random init, sharded on ``mesh``."""
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    if cfg.model.name_or_path is not None:
        return models.load_pretrained(cfg.model.name_or_path, dtype=dtype, mesh=mesh)
    m = cfg.model
    if len(tokenizer) > m.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens > model.vocab_size={m.vocab_size}"
        )
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if m.model_type == "gpt2":
        hf = dict(n_layer=m.layers, n_embd=m.width, n_head=m.heads, n_positions=m.max_positions)
    else:
        hf = dict(
            num_hidden_layers=m.layers,
            hidden_size=m.width,
            num_attention_heads=m.heads,
            num_key_value_heads=m.kv_heads or m.heads,
            intermediate_size=4 * m.width,
            max_position_embeddings=m.max_positions,
            tie_word_embeddings=True,
        )
    config = models.config_from_hf(
        {"model_type": m.model_type, "vocab_size": m.vocab_size, **hf, **ids}
    )
    return models.build(config, seed=cfg.seed, dtype=dtype, mesh=mesh), config


def _severity_sums(nll_fn, mb: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-severity token NLL sums and counts; ``nll_fn(mask) -> (nll_sum, count)``."""
    out = {}
    for k, name in enumerate(L.SEVERITIES):
        mask = mb["loss_mask"] * (mb["severity"] == k)
        out[f"nll_sum/{name}"], out[f"tokens/{name}"] = nll_fn(mask)
    return out


def init_state(cfg: TrainConfig, model: nnx.Module, mesh: jax.sharding.Mesh):
    """Splits ``model`` and builds the train state ``{params, opt_state, step}`` on ``mesh``.

    Returns:
        ``(state, state_shardings, (graphdef, treedef, rest), tx, schedule)``; ``params`` is the
        pure dict of the ``nnx.Param`` state, ``rest`` the non-parameter state, and the split is
        what :func:`make_forward` takes.
    """
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    treedef = jax.tree.structure(param_state)
    params = nnx.to_pure_dict(param_state)
    replicated = NamedSharding(mesh, PartitionSpec())
    tx, schedule = optim.make_optimizer(cfg.optim, cfg.steps, params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = optim.opt_state_shardings(tx, params, param_sh, replicated)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
    state = {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
    }
    return state, state_sh, (graphdef, treedef, rest), tx, schedule


def make_forward(
    graphdef: Any,
    treedef: Any,
    rest: Any,
    *,
    chunked: bool,
    chunk_size: int,
    normalize: str,
    z_loss: float,
):
    """The traced forward passes: ``(aux_fn, eval_fn)``.

    ``aux_fn(params, mb) -> aux``: the ``sevjax.loss`` sums of one micro-batch (``mb`` holds the
    ``[B, T]`` arrays of :mod:`sevjax.lm_data`), plus per-severity ``nll_sum/<name>`` and
    ``tokens/<name>`` (full-logits path only). ``eval_fn(params, mb)``: unweighted NLL sums and
    token counts, overall and per severity.

    Args:
        graphdef, treedef, rest: from ``nnx.split(model, nnx.Param, ...)``; ``params`` is the
            pure dict of the ``Param`` state, rebuilt with ``treedef``.
        chunked: settled before tracing: ``model.hidden`` + ``model.head`` with the chunked loss
            (large vocabularies; no ``[B, T, V]`` logits) instead of full logits.
        chunk_size: tokens per chunk of the chunked loss.
        normalize: ``tokens`` | ``weighted`` | ``sequence`` (see ``sevjax.loss.loss_from_sums``).
        z_loss: coefficient of the z-loss term.
    """

    def model_of(params):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, jax.tree.leaves(params)), rest)

    def forward(model, mb):
        kw = dict(position_ids=mb["positions"], segment_ids=mb["segment_ids"])
        return (model.hidden if chunked else model)(mb["input_ids"], **kw)

    def loss(model, out, mb, mask, weights):
        kw = dict(normalize=normalize, z_loss=z_loss)
        if chunked:
            w, transpose = model.head()
            return L.chunked_severity_weighted_cross_entropy(
                out,
                w,
                mb["labels"],
                mask,
                weights,
                chunk_size=chunk_size,
                transpose_head=transpose,
                **kw,
            )
        return L.severity_weighted_cross_entropy(out, mb["labels"], mask, weights, **kw)

    def aux_fn(params, mb):
        model = model_of(params)
        out = forward(model, mb)
        _, aux = loss(model, out, mb, mb["loss_mask"], mb["weights"])
        if not chunked:  # per-severity sums from the same logits (no extra vocabulary pass)
            nll = L.token_nll(jax.lax.stop_gradient(out), mb["labels"])  # (B, T)
            aux.update(_severity_sums(lambda m: (jnp.sum(nll * m), jnp.sum(m)), mb))
        return aux

    def eval_fn(params, mb):
        model = model_of(params)
        out = forward(model, mb)
        ones = jnp.ones_like(mb["weights"])

        def nll_fn(mask):
            aux = loss(model, out, mb, mask, ones)[1]
            return aux["nll_sum"], aux["token_count"]

        sums = _severity_sums(nll_fn, mb)
        sums["nll_sum"], sums["tokens"] = nll_fn(mb["loss_mask"])
        return sums

    return aux_fn, eval_fn


def make_steps(
    cfg: TrainConfig, aux_fn, eval_fn, tx, schedule, mesh, state_shardings, param_shardings
):
    """Jitted ``train_step(state, batch, rng) -> (state, metrics)`` and ``eval_step(params, batch)``.

    ``state`` is ``{params, opt_state, step}`` (donated; shardings ``state_shardings``). Train
    batches are ``[A, B, T]`` (A micro-batches, B split over ``data`` x ``fsdp``), eval batches
    ``[B, T]``. Metrics are replicated float32 scalars: ``loss`` (the configured loss), ``nll``
    (unweighted token loss), ``grad_norm`` (before clipping), ``lr``, ``tokens`` (loss tokens) and
    per-severity ``nll_sum/<name>``, ``tokens/<name>``.

    Returns:
        ``(train_step, eval_step, train_batch_sharding, eval_batch_sharding)``.
    """
    normalize = cfg.loss.normalize
    replicated = NamedSharding(mesh, PartitionSpec())
    train_batch = NamedSharding(mesh, sharding.logical_to_spec((None, "batch", None), mesh))
    eval_batch = sharding.batch_sharding(mesh, 2)

    def train_step(state, batch, rng):
        TRACES["train_step"] += 1
        del rng  # jax.random.fold_in(rng, state["step"]) would seed dropout; our decoders have none
        loss, aux, grads = optim.accumulate_gradients(
            aux_fn, state["params"], batch, normalize=normalize
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "nll": aux["nll_sum"] / jnp.maximum(aux["token_count"], 1.0),
            "tokens": aux["token_count"],
            **{k: v for k, v in aux.items() if "/" in k},
        }
        new = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new, metrics

    train = jax.jit(
        train_step,
        in_shardings=(state_shardings, train_batch, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(
        eval_fn, in_shardings=(param_shardings, eval_batch), out_shardings=replicated
    )
    return train, evaluate, train_batch, eval_batch


def put(batch: dict[str, np.ndarray], target: NamedSharding) -> dict[str, jax.Array]:
    """Host batch -> global sharded arrays (every process holds the whole global batch)."""
    return {
        k: jax.make_array_from_callback(v.shape, target, functools.partial(_index, v))
        for k, v in batch.items()
    }


def _index(array: np.ndarray, idx: Any) -> np.ndarray:
    return array[idx]


# ----------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------


class NonFiniteLoss(FloatingPointError):
    """A NaN/inf training loss; the run stops before saving anything after it."""


class RunLog:
    """metrics.jsonl + TensorBoard (tensorboardX) + a tqdm bar; inactive on processes > 0."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int, active: bool):
        from tqdm.auto import tqdm

        self.active, self.path = active, run_dir / "metrics.jsonl"
        self.tb = None
        if active and self.path.exists():  # drop records a killed run wrote after its checkpoint
            keep = [r for r in self.path.read_text().splitlines() if json.loads(r)["step"] <= start]
            self.path.write_text("".join(r + "\n" for r in keep))
        if active and cfg.log.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start or None)
        self.bar = tqdm(
            total=cfg.steps, initial=start, disable=not (active and cfg.log.progress), desc="train"
        )

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record ``{"step", "split", ...scalars}``."""
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and v is not None:
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _per_severity(sums: dict[str, float], prefix: str = "") -> dict[str, float | None]:
    out = {}
    for name in L.SEVERITIES:
        n = sums[f"tokens/{name}"]
        out[f"{prefix}loss/{name}"] = sums[f"nll_sum/{name}"] / n if n else None
    return out


def evaluate(eval_step, params, data: lm_data.Encoded, cfg: TrainConfig, target) -> dict[str, Any]:
    """Validation token loss and perplexity, overall and per severity (plain, unweighted CE)."""
    total: dict[str, float] = {}
    for batch in lm_data.eval_batches(data, cfg.eval.batch_size, cfg.data.buckets):
        sums = jax.device_get(eval_step(params, put(batch, target)))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    loss = total["nll_sum"] / max(total["tokens"], 1.0)
    out: dict[str, Any] = {"loss": loss, "perplexity": float(np.exp(loss))}
    for k, v in _per_severity(total).items():
        out[k] = v
        out[k.replace("loss", "perplexity")] = None if v is None else float(np.exp(v))
    return out


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Train and validation loss against step (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in metrics_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        key = "nll" if split == "train" else "loss"  # unweighted token loss in both
        pts = [(r["step"], r[key]) for r in rows if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts), style, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("token loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def _flush(pending: list, log: RunLog, tokens: int, since: float) -> tuple[dict[str, Any], float]:
    """Fetches pending step metrics, stops on a non-finite loss, logs the last step.

    Returns:
        ``(record, seconds)``: the logged record and the seconds since ``since`` (measured after
        the fetch, i.e. after the device finished those steps).
    """
    host = jax.device_get([m for _, m in pending])
    seconds = time.time() - since
    for (step, _), m in zip(pending, host):
        if not np.isfinite(m["loss"]):
            raise NonFiniteLoss(f"non-finite loss {float(m['loss'])} at step {step}")
    sums = {k: sum(float(m[k]) for m in host) for k in host[-1] if "/" in k}
    last = {k: float(v) for k, v in host[-1].items() if "/" not in k}
    record = {
        "step": pending[-1][0],
        "split": "train",
        "loss": last["loss"],
        "nll": last["nll"],
        "grad_norm": last["grad_norm"],
        "lr": last["lr"],
        "tokens_per_s": tokens / seconds if tokens and seconds > 0 else None,
        **(_per_severity(sums) if sums else {}),
    }
    log.write(record)
    tok_s = "-" if record["tokens_per_s"] is None else f"{record['tokens_per_s']:.0f}"
    log.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=tok_s)
    return record, seconds


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tunes (or resumes fine-tuning) the LM described by ``cfg``; see the module docstring.

    Returns:
        A summary: ``run_dir``, ``steps``, ``final_loss``, ``val_loss_start`` (None when resumed),
        ``val_loss_end``, ``tokens_per_s`` (after the first step's compile), ``wall_s``,
        ``train_step_traces`` and the output paths.

    Raises:
        NonFiniteLoss: when a step's loss is NaN/inf (checkpoints up to the previous save stay).
        ValueError / FileNotFoundError: bad data, sizes or paths.
    """
    t_begin = time.time()
    maybe_initialize_distributed()
    main = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = to_dict(cfg)
    if main:
        (run_dir / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % rows:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} must divide over data x fsdp = {rows}"
        )
    if cfg.eval.batch_size % rows:
        raise ValueError(
            f"eval.batch_size={cfg.eval.batch_size} must divide over data x fsdp = {rows}"
        )

    tokenizer, data = lm_data.prepare(cfg, run_dir)
    model, model_config = build_model(cfg, tokenizer, mesh)
    hf_config = model_config.to_hf_config()
    positions = hf_config.get("n_positions") or hf_config.get("max_position_embeddings")
    if positions and max(cfg.data.buckets) > positions:
        raise ValueError(
            f"max(data.buckets)={max(cfg.data.buckets)} exceeds the model's {positions} positions"
        )
    state, state_sh, (graphdef, treedef, rest), tx, schedule = init_state(cfg, model, mesh)
    del model
    param_sh = state_sh["params"]
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(
        f"[model] {hf_config['model_type']} with {n_params:,} parameters on mesh {dict(mesh.shape)}"
    )

    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed), replicated)

    ckpt = Checkpointer(
        run_dir / "checkpoints",
        every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    start, position = 0, (0, 0)
    latest = ckpt.latest_step() if cfg.checkpoint.resume else None
    if latest is not None:
        restored, position = ckpt.restore(latest, {**state, "rng": rng})
        rng = restored.pop("rng")
        state, start = restored, latest
        print(
            f"[checkpoint] resumed from step {latest} (epoch {position[0]}, example {position[1]})"
        )
        changed = _changed_keys(ckpt.restore_config(latest), config_dict)
        if changed:
            print(
                f"[checkpoint] note: config differs from the checkpoint's in {', '.join(changed)}"
            )

    chunked = model_config.vocab_size > cfg.loss.chunked_vocab_threshold
    aux_fn, eval_fn = make_forward(
        graphdef,
        treedef,
        rest,
        chunked=chunked,
        chunk_size=cfg.loss.chunk_size,
        normalize=cfg.loss.normalize,
        z_loss=cfg.loss.z_loss,
    )
    train_step, eval_step, train_sh, eval_sh = make_steps(
        cfg, aux_fn, eval_fn, tx, schedule, mesh, state_sh, param_sh
    )
    batcher = lm_data.Batcher(
        data["train"],
        batch_size=cfg.data.batch_size,
        accum=cfg.optim.grad_accum,
        buckets=cfg.data.buckets,
        pack=cfg.data.pack,
        seed=cfg.seed,
    )
    log = RunLog(run_dir, cfg, start, main)
    val_start = val = None
    record: dict[str, Any] = {}
    measured_tokens, measured_s = 0, 0.0
    try:
        if start == 0:
            val_start = val = evaluate(eval_step, state["params"], data["validation"], cfg, eval_sh)
            log.write({"step": 0, "split": "validation", **val})
            log.bar.write(
                f"[eval] step 0: validation loss {val['loss']:.4f} (perplexity {val['perplexity']:.1f})"
            )
        pending: list = []  # (step, device metrics) not yet fetched
        interval_tokens, t_interval = 0, time.time()
        for step in range(start, cfg.steps):
            batch_np, position = batcher.batch_at(*position)
            state, metrics = train_step(state, put(batch_np, train_sh), rng)
            done = step + 1
            pending.append((done, metrics))
            log.bar.update(1)
            if step == start:  # the first step compiles: measure throughput after it
                jax.block_until_ready(metrics)
                t_interval = time.time()
            else:
                interval_tokens += int((batch_np["segment_ids"] > 0).sum())
            save = done % cfg.checkpoint.every == 0 or done == cfg.steps
            if done % cfg.log.every and not save:
                continue
            record, seconds = _flush(pending, log, interval_tokens, t_interval)
            measured_tokens, measured_s = measured_tokens + interval_tokens, measured_s + seconds
            pending, interval_tokens = [], 0
            if save:  # only after _flush has checked every loss up to here
                ckpt.save(done, {**state, "rng": rng}, position, config_dict, force=True)
            if done % cfg.eval.every == 0 or done == cfg.steps:
                val = evaluate(eval_step, state["params"], data["validation"], cfg, eval_sh)
                log.write({"step": done, "split": "validation", **val})
                log.bar.write(
                    f"[eval] step {done}: validation loss {val['loss']:.4f} "
                    f"(perplexity {val['perplexity']:.1f})"
                )
            t_interval = time.time()
        if val is None:  # resumed a finished run: still report the validation loss
            val = evaluate(eval_step, state["params"], data["validation"], cfg, eval_sh)
    except NonFiniteLoss as e:
        ckpt.wait()
        last_good = ckpt.latest_step()
        raise NonFiniteLoss(
            f"{e}; stopped. The last good checkpoint is step {last_good} in {ckpt.directory}"
        ) from None
    finally:
        ckpt.close()
        log.close()

    outputs = {"checkpoints": str(ckpt.directory), "metrics": str(log.path)}
    if main and cfg.log.tensorboard:
        outputs["tensorboard"] = str(run_dir / "tb")
    if main and cfg.log.plot and log.path.exists():
        plot_losses(log.path, run_dir / "loss_curve.png")
        outputs["loss_curve"] = str(run_dir / "loss_curve.png")
    if cfg.export_hf:
        params = state["params"]
        if jax.process_count() > 1:  # gather so process 0 can write every tensor
            params = jax.jit(lambda p: p, out_shardings=replicated)(params)
        if main:
            from sevjax import hf

            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, jax.tree.leaves(params)), rest)
            hf.save_pretrained(model, model_config, run_dir / "hf", tokenizer=tokenizer)
            outputs["hf"] = str(run_dir / "hf")
    summary = {
        "run_dir": str(run_dir),
        "steps": cfg.steps,
        "final_loss": record.get("loss"),
        "val_loss_start": None if val_start is None else val_start["loss"],
        "val_loss_end": None if val is None else val["loss"],
        "tokens_per_s": measured_tokens / measured_s if measured_s else None,
        "wall_s": time.time() - t_begin,
        "train_step_traces": TRACES["train_step"],
        **outputs,
    }
    if main:
        print(f"[done] {cfg.steps} steps in {summary['wall_s']:.0f}s; outputs:")
        for k, v in outputs.items():
            print(f"  {k:12s} {v}")
    return summary
