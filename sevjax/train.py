"""Fine-tuning the LM: the severity-weighted LM as a trainer task, its model source, fine-tune and
export stages. The stage order (annotate -> tokenize -> fine-tune -> export) is in
:func:`sevjax.pipeline.train`; this module knows nothing about where the data came from.

:class:`LMTask` gives :func:`sevjax.loop.fit` the token loss of :mod:`sevjax.loss` (full logits,
or the chunked loss above ``loss.chunked_vocab_threshold``), per-severity NLL sums, and the
resumable batches of :mod:`sevjax.lm_data`. :func:`model_source` builds a random-init model or
loads a pretrained checkpoint straight onto the mesh (only when no checkpoint is being resumed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sevjax import hf, lm_data, lora, models, peft, prepare
from sevjax import loss as L
from sevjax.config import to_dict
from sevjax.distributed import is_main
from sevjax.logs import plot_curves
from sevjax.loop import Fit, Loop, fit
from sevjax.schema import TrainConfig
from sevjax.trainer import ModelSource, Position, model_options


def _dtype(name: str) -> Any:
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def model_config(cfg: TrainConfig, tokenizer: Any = None) -> Any:
    """The model's config: the checkpoint's own ``config.json``, or the random-init sizes.

    ``tokenizer`` (random init) gives the special token ids and is checked against
    ``model.vocab_size``; without one (``train.py plan``) only the sizes matter.
    """
    m = cfg.model
    if m.name_or_path is not None:
        return hf.read_config(m.name_or_path)
    if tokenizer is not None and len(tokenizer) > m.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens > model.vocab_size={m.vocab_size}"
        )
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if m.model_type == "gpt2":
        sizes = dict(n_layer=m.layers, n_embd=m.width, n_head=m.heads, n_positions=m.max_positions)
    else:
        sizes = dict(
            num_hidden_layers=m.layers,
            hidden_size=m.width,
            num_attention_heads=m.heads,
            num_key_value_heads=m.kv_heads or m.heads,
            intermediate_size=4 * m.width,
            max_position_embeddings=m.max_positions,
            tie_word_embeddings=True,
        )
    return models.config_from_hf(
        {"model_type": m.model_type, "vocab_size": m.vocab_size, **sizes, **ids}
    )


def trainable(cfg: TrainConfig) -> Any:
    """The trained-parameter filter: the LoRA adapters with ``model.lora.rank`` > 0, else all."""
    return nnx.LoRAParam if cfg.model.lora.rank else nnx.Param


def model_source(cfg: TrainConfig, config: Any, mesh: jax.sharding.Mesh | None) -> ModelSource:
    """How to make the LM: random init from ``cfg.seed``, or the pretrained weights on ``mesh``.

    With LoRA (``model.lora.rank`` > 0) the base is stored in ``model.lora.base_dtype`` and gets
    adapters (:func:`sevjax.lora.apply`): inside the factory for a random-init base, attached on
    the mesh after loading a pretrained one, and set from ``model.lora.adapter`` when given.
    """
    dtype = _dtype(cfg.model.dtype)
    options = model_options(cfg.model)
    cls = models.model_class(config)
    spec = lora.spec_of(cfg.model.lora, cfg.model.name_or_path)
    param_dtype = jnp.float32 if spec is None else _dtype(cfg.model.lora.base_dtype)

    def factory() -> nnx.Module:
        kw = dict(dtype=dtype, param_dtype=param_dtype, options=options)
        model = cls(config, **kw, rngs=nnx.Rngs(cfg.seed))
        return model if spec is None else lora.apply(model, spec, seed=cfg.seed)

    load = None
    if cfg.model.name_or_path is not None:
        path, adapter = cfg.model.name_or_path, cfg.model.lora.adapter

        def load() -> nnx.Module:
            kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, options=options)
            model = hf.load_pretrained(path, **kw)[0]
            if spec is None:
                return model
            model = lora.apply(model, spec, seed=cfg.seed, mesh=mesh)
            return model if adapter is None else peft.load_adapter(model, config, adapter)

    return ModelSource(factory, load)


class LMTask:
    """The severity-weighted LM as a :class:`sevjax.trainer.Task`.

    Args:
        cfg: the run config (loss, data and eval sections are read here, before tracing).
        data: ``{"train", "validation"}`` encoded examples (:func:`sevjax.prepare.prepare`), or
            None for the traced functions alone (benchmarks, ahead-of-time compilation).
        chunked: use the chunked loss (no ``[B, T, V]`` logits) instead of full logits.
    """

    score = ("loss", "min")
    unit = "tokens"

    def __init__(self, cfg: TrainConfig, data: dict[str, lm_data.Encoded] | None, *, chunked: bool):
        d = cfg.data
        self.batcher = self.validation = None
        if data is not None:
            self.batcher = lm_data.Batcher(
                data["train"],
                batch_size=d.batch_size,
                accum=cfg.optim.grad_accum,
                buckets=d.buckets,
                pack=d.pack,
                seed=cfg.seed,
            )
            self.validation = data["validation"]
        self.buckets = d.buckets
        self.train_rows, self.eval_rows = d.batch_size, cfg.eval.batch_size
        self.chunked, self.chunk_size = chunked, cfg.loss.chunk_size
        self.normalize, self.z_loss = cfg.loss.normalize, cfg.loss.z_loss
        self.lora_dropout = cfg.model.lora.rank > 0 and cfg.model.lora.dropout > 0
        self.loss_label = "weighted CE" if cfg.loss.mode == "severity" else "CE"

    # traced ------------------------------------------------------------------------------

    def _forward(self, model, mb):
        """Logits ``[B, T, V]``, or the final hidden states with the chunked loss."""
        kw = dict(position_ids=mb["positions"], segment_ids=mb["segment_ids"])
        return (model.hidden if self.chunked else model)(mb["input_ids"], **kw)

    def _token_loss(self, model, out, mb, mask, weights, **lkw):
        """The aux sums of :mod:`sevjax.loss` from ``out`` (full or chunked, as configured)."""
        if self.chunked:
            w, transpose = model.head()
            return L.chunked_severity_weighted_cross_entropy(
                out, w, mb["labels"], mask, weights, chunk_size=self.chunk_size,
                transpose_head=transpose, logit_softcap=model.final_logit_softcap, **lkw,
            )[1]  # fmt: skip
        return L.severity_weighted_cross_entropy(out, mb["labels"], mask, weights, **lkw)[1]

    def loss_sums(self, model, batch, rng):
        if self.lora_dropout:  # our decoders have no dropout of their own; LoRA's may
            nnx.reseed(model, dropout=rng, policy="match_shape")  # stacked keys when scanned
        out = self._forward(model, batch)
        lkw = dict(normalize=self.normalize, z_loss=self.z_loss)
        aux = self._token_loss(model, out, batch, batch["loss_mask"], batch["weights"], **lkw)
        if not self.chunked:  # per-severity sums from the same logits (no extra vocabulary pass)
            nll = L.token_nll(jax.lax.stop_gradient(out), batch["labels"])  # (B, T)
            aux.update(_severity_sums(lambda m: (jnp.sum(nll * m), jnp.sum(m)), batch))
        return aux

    def loss_terms(self, sums):
        return L.loss_terms(sums, normalize=self.normalize)

    def eval_sums(self, model, batch):
        ones = jnp.ones_like(batch["weights"])
        out = self._forward(model, batch)  # one forward; XLA shares it across the four masks

        def nll_fn(mask):
            aux = self._token_loss(model, out, batch, mask, ones, normalize="tokens", z_loss=0.0)
            return aux["nll_sum"], aux["token_count"]

        sums = _severity_sums(nll_fn, batch)
        sums["nll_sum"], sums["tokens"] = nll_fn(batch["loss_mask"])
        return sums

    # host --------------------------------------------------------------------------------

    def train_batch(self, position: Position, rows: slice):
        return self.batcher.batch_at(*position, rows=rows)

    def eval_batches(self, rows: slice) -> Iterator[dict[str, np.ndarray]]:
        for batch in lm_data.eval_batches(self.validation, self.eval_rows, self.buckets):
            yield {k: v[rows] for k, v in batch.items()}

    def train_record(self, sums):
        tokens = float(sums["token_count"])
        record = {"nll": float(sums["nll_sum"]) / max(tokens, 1.0), "tokens": tokens}
        if "tokens/mild" in sums:
            record.update(_per_severity(sums))
        return record

    def eval_record(self, sums):
        loss = float(sums["nll_sum"]) / max(float(sums["tokens"]), 1.0)
        out: dict[str, Any] = {"loss": loss, "perplexity": float(np.exp(loss))}
        for k, v in _per_severity(sums).items():
            out[k] = v
            out[k.replace("loss", "perplexity")] = None if v is None else float(np.exp(v))
        return out

    def describe(self, record):
        return f"validation loss {record['loss']:.4f} (perplexity {record['perplexity']:.1f})"

    def count(self, batch):
        return int((batch["segment_ids"] > 0).sum())


def _severity_sums(nll_fn, mb: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-severity token NLL sums and counts; ``nll_fn(mask) -> (nll_sum, count)``."""
    out = {}
    for k, name in enumerate(L.SEVERITIES):
        mask = mb["loss_mask"] * (mb["severity"] == k)
        out[f"nll_sum/{name}"], out[f"tokens/{name}"] = nll_fn(mask)
    return out


def _per_severity(sums: dict[str, Any]) -> dict[str, float | None]:
    out = {}
    for name in L.SEVERITIES:
        n = float(sums[f"tokens/{name}"])
        out[f"loss/{name}"] = float(sums[f"nll_sum/{name}"]) / n if n else None
    return out


def check_inputs(cfg: TrainConfig, config: Any, mesh: jax.sharding.Mesh) -> None:
    """The checks of a run against its model and mesh, before anything is built.

    Raises:
        ValueError: a batch size that does not divide over ``data x fsdp``, or buckets longer
            than the model's positions.
    """
    prepare.check_batch_sizes(cfg, mesh.shape["data"] * mesh.shape["fsdp"])
    limit = models.max_positions(config)
    if limit and max(cfg.data.buckets) > limit:
        raise ValueError(
            f"max(data.buckets)={max(cfg.data.buckets)} exceeds the model's {limit} positions"
        )


def finetune(
    cfg: TrainConfig, config: Any, data: dict[str, lm_data.Encoded], mesh: jax.sharding.Mesh
) -> Fit:
    """The fine-tune stage: trains (or resumes) the LM; see :func:`sevjax.loop.fit`.

    Writes ``<run_dir>/checkpoints/`` (and ``best/``), ``metrics.jsonl``, ``tb/`` and the
    loss-curve PNG.
    """
    check_inputs(cfg, config, mesh)
    task = LMTask(cfg, data, chunked=config.vocab_size > cfg.loss.chunked_vocab_threshold)
    c = cfg.checkpoint
    loop = Loop(
        steps=cfg.steps, eval_every=cfg.eval.every,
        patience=cfg.eval.patience, keep_best=c.best, checkpoint=c, log=cfg.log,
    )  # fmt: skip
    result = fit(
        task, model_source(cfg, config, mesh), run_dir=Path(cfg.run_dir), mesh=mesh,
        optim_cfg=cfg.optim, loop=loop, seed=cfg.seed, config=to_dict(cfg),
        trainable=trainable(cfg),
    )  # fmt: skip
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    if is_main() and cfg.log.plot and metrics.exists():
        plot_curves(metrics, Path(cfg.run_dir) / "loss_curve.png", train_key="nll")
    return result


def export(result: Fit, config: Any, tokenizer: Any, run_dir: Path) -> dict[str, str]:
    """The export stage: the fine-tuned (or best) model and its tokenizer in HF format.

    Writes ``<run_dir>/hf``; a LoRA run also writes its PEFT adapter to ``<run_dir>/adapter``
    and exports the merged model (``W + alpha / r * A B``) to ``hf``. Every process takes part
    (tensors are gathered one at a time); process 0 writes.

    Returns:
        ``{"hf": path}`` (and ``"adapter"``) as strings.
    """
    model, out = result.model, {}
    if lora.has_lora(model):
        out["adapter"] = str(peft.save_adapter(model, config, Path(run_dir) / "adapter"))
        model = lora.merged(model)
    out["hf"] = str(hf.save_pretrained(model, config, Path(run_dir) / "hf", tokenizer=tokenizer))
    return out


def summary(cfg: TrainConfig, result: Fit, t_begin: float, outputs: dict[str, str]) -> dict:
    """The run's summary dict (also what ``python train.py`` prints at the end)."""
    return {
        "run_dir": str(cfg.run_dir),
        "steps": result.steps,
        "final_loss": result.last_train.get("loss"),
        "val_loss_start": None if result.first_eval is None else result.first_eval["loss"],
        "val_loss_end": None if result.last_eval is None else result.last_eval["loss"],
        "best": result.best,
        "stopped_early": result.stopped_early,
        "tokens_per_s": result.units_per_s,
        "wall_s": time.time() - t_begin,
        **outputs,
    }
