"""The severity classifier: a Flax BERT trained on rule (or gold) labels, calibrated, used to annotate.

:class:`ClassifierTask` hands the classifier to the shared trainer (:func:`sevjax.loop.fit`):
class-weighted cross-entropy with dropout, evaluation by validation macro-F1 (against gold labels
when the data has them) every epoch, early stopping after ``patience`` epochs without a better
one, and the best epoch's checkpoint kept. ``run(cfg)`` trains (a tiny random BERT with a WordPiece
tokenizer trained on the corpus by default, or an HF BERT checkpoint such as AraBERT with a new
3-class head), fits a softmax temperature on validation and exports the classifier with its
tokenizer to ``<run_dir>/hf``; a killed run resumes where it stopped when rerun.
``evaluate(cfg)`` reports accuracy, macro-F1, per-class P/R/F1, confusion, NLL, Brier and ECE
before and after temperature scaling, plus a reliability diagram. ``annotate(cfg)`` writes the
data with calibrated ``p_mild, p_moderate, p_critical`` and ``severity_pred``.

Typical use (``classify.py`` is the entry script)::

    python classify.py train                 # 1-2 min on 2 CPU cores
    python classify.py evaluate
    python classify.py annotate --set data.path=maqa.csv --set output=maqa_sev.parquet
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sevjax import data as data_lib
from sevjax import hf, models
from sevjax import loss as L
from sevjax.arabic import normalize, rule_severity
from sevjax.calibration import (
    confusion_metrics,
    fit_temperature,
    label_metrics,
)
from sevjax.config import to_dict
from sevjax.distributed import is_main
from sevjax.logs import read as read_log
from sevjax.loop import Loop, fit
from sevjax.rundir import RunDir
from sevjax.schema import ClassifyConfig, LogSection
from sevjax.tokenizer import train_wordpiece
from sevjax.trainer import ModelSource, Position, make_mesh, model_options


def encode(
    tokenizer: Any, examples: list[dict], text: str, max_length: int
) -> dict[str, np.ndarray]:
    """Normalized complaint (and response) -> right-padded ``input_ids`` / ``attention_mask``.

    Returns:
        ``{"input_ids": [N, T] int32, "attention_mask": [N, T] int32}``, T = the longest
        encoding rounded up to a multiple of 16, at most ``max_length``.
    """
    first = [normalize(ex["complaint"]) for ex in examples]
    second = [normalize(ex["response"]) for ex in examples] if text != "complaint" else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length)
    longest = max(len(ids) for ids in enc["input_ids"])
    t = min(max_length, -(-longest // 16) * 16)
    ids = np.full((len(examples), t), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(examples), t), np.int32)
    for i, row in enumerate(enc["input_ids"]):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def rule_labels(examples: list[dict]) -> np.ndarray:
    """[N] int32 rule-labeler classes (indices into ``SEVERITIES``) of the complaints."""
    return np.array(
        [L.SEVERITIES.index(rule_severity(ex["complaint"])[0]) for ex in examples], np.int32
    )


def gold_labels(examples: list[dict]) -> np.ndarray | None:
    """[N] int32 gold classes, or None when some example has no ``severity``."""
    if not examples or any("severity" not in ex for ex in examples):
        return None
    return np.array([L.SEVERITIES.index(ex["severity"]) for ex in examples], np.int32)


def classifier_source(cfg: ClassifyConfig, tokenizer: Any, mesh: Any) -> tuple[ModelSource, Any]:
    """``(source, BertConfig)``: a checkpoint's encoder with a new 3-class head, or a tiny BERT."""
    m, options = cfg.model, model_options(cfg.model)
    if m.name_or_path is not None:
        config = hf.read_config(m.name_or_path)
        if config.num_labels != len(L.SEVERITIES):
            raise ValueError(
                f"{m.name_or_path} is a {config.num_labels}-class classifier; need "
                f"{len(L.SEVERITIES)} classes (use the plain encoder checkpoint)"
            )

        def load() -> nnx.Module:
            return hf.load_pretrained(m.name_or_path, mesh=mesh, seed=cfg.seed, options=options)[0]

    else:
        d = dict(hidden_size=m.width, num_hidden_layers=m.layers, num_attention_heads=m.heads)
        d.update(intermediate_size=m.mlp, max_position_embeddings=max(m.max_length, 128))
        d.update(hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
        d.update(model_type="bert", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        config, load = models.config_from_hf(d), None
    config = dataclasses.replace(config, num_labels=3, id2label=L.SEVERITIES)
    cls = models.model_class(config)

    def factory() -> nnx.Module:
        return cls(config, options=options, rngs=nnx.Rngs(cfg.seed))

    return ModelSource(factory, load), config


def _padded(enc: dict[str, np.ndarray], labels: np.ndarray, idx: np.ndarray, rows: int) -> dict:
    """Rows ``idx`` of an encoded split as a batch of ``rows`` rows (``valid`` marks real ones)."""
    pad = rows - len(idx)
    batch = {k: np.pad(v[idx], ((0, pad), (0, 0))) for k, v in enc.items()}
    batch["labels"] = np.pad(labels[idx], (0, pad))
    batch["valid"] = np.pad(np.ones(len(idx), np.float32), (0, pad))
    return batch


class ClassifierTask:
    """The severity classifier as a :class:`sevjax.trainer.Task`.

    Args:
        enc_train, y_train: encoded train split and its labels.
        enc_val, y_val: encoded validation split and its (gold when present) labels.
        batch: rows per step and per eval batch (across all devices).
        class_weights: ``[C]`` weights of the cross-entropy.
        seed: the epoch order is ``default_rng([seed, epoch]).permutation``.
    """

    score = ("macro_f1", "max")
    loss_label = "CE"
    unit = "examples"

    def __init__(self, enc_train, y_train, enc_val, y_val, *, batch, class_weights, seed):
        self.enc_train, self.y_train, self.enc_val, self.y_val = enc_train, y_train, enc_val, y_val
        self.train_rows = self.eval_rows = batch
        self.class_weights = tuple(float(w) for w in class_weights)
        self.seed = seed

    def loss_sums(self, model, batch, rng):
        nnx.reseed(model, dropout=rng, policy="match_shape")  # stacked keys when scanned
        logits = model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
        nll = L.token_nll(logits[:, None, :], batch["labels"][:, None])[:, 0]  # (B,)
        w = jnp.asarray(self.class_weights, jnp.float32)[batch["labels"]] * batch["valid"]  # (B,)
        return {"weighted_nll_sum": jnp.sum(w * nll), "weight_sum": jnp.sum(w)}

    def loss_terms(self, sums):
        return sums["weighted_nll_sum"], sums["weight_sum"]

    def eval_sums(self, model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
        nll = L.token_nll(logits[:, None, :], batch["labels"][:, None])[:, 0]  # (B,)
        c = len(self.class_weights)
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), c) * batch["valid"][:, None]  # (B, C)
        confusion = jax.nn.one_hot(batch["labels"], c).T @ pred  # (C, C) rows gold
        return {"nll_sum": jnp.sum(nll * batch["valid"]), "count": jnp.sum(batch["valid"]),
                "confusion": confusion}  # fmt: skip

    def train_batch(self, position: Position, rows: slice):
        epoch, index = position
        n, b = len(self.y_train), self.train_rows
        if index and index + b > n:  # drop the epoch's incomplete tail
            epoch, index = epoch + 1, 0
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        idx = order[index : index + b]
        if len(idx) < b:  # fewer examples than one batch: repeat some
            idx = np.resize(idx, b)
        index += b
        if index >= n:
            epoch, index = epoch + 1, 0
        batch = _padded(self.enc_train, self.y_train, idx, b)
        return {k: v[None, rows] for k, v in batch.items()}, (epoch, index)

    def eval_batches(self, rows: slice) -> Iterator[dict[str, np.ndarray]]:
        n, b = len(self.y_val), self.eval_rows
        for start in range(0, n, b):
            batch = _padded(self.enc_val, self.y_val, np.arange(start, min(start + b, n)), b)
            yield {k: v[rows] for k, v in batch.items()}

    def train_record(self, sums):
        return {}

    def eval_record(self, sums):
        out = confusion_metrics(np.asarray(sums["confusion"]))
        return {"loss": float(sums["nll_sum"]) / max(float(sums["count"]), 1.0), **out}

    def describe(self, record):
        return f"validation macro-F1 {record['macro_f1']:.3f}, loss {record['loss']:.4f}"

    def count(self, batch):
        return int(batch["valid"].sum())


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask).astype(jnp.float32)


def predict_logits(model: nnx.Module, enc: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """[N, C] float32 logits of ``model`` (eval mode) in batches of ``batch`` rows."""
    model.eval()
    graphdef, state = nnx.split(model)
    n, out = len(enc["input_ids"]), []
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in enc.items()}
        pad = batch - len(chunk["input_ids"])
        chunk = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in chunk.items()}
        logits = _logits(graphdef, state, chunk["input_ids"], chunk["attention_mask"])
        out.append(np.asarray(logits)[: batch - pad])
    return np.concatenate(out)


def examples_of(cfg: ClassifyConfig) -> list[dict[str, Any]]:
    """The classifier's examples (``cfg.data``), validated."""
    d = cfg.data
    return data_lib.load_examples(d.path, columns=d.columns, drop_bad=d.drop_bad)


def batch_size_of(cfg: ClassifyConfig, mesh: Any) -> int:
    """``cfg.batch_size``, checked to divide over the mesh's data devices."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {n} data devices")
    return cfg.batch_size


def labels_of(cfg: ClassifyConfig, parts: dict[str, list]) -> tuple[np.ndarray, np.ndarray, str]:
    """``(y_train, y_val, val_source)``: training labels per ``data.labels``, gold val if any."""
    train, val = parts["train"], parts["validation"]
    if not train or not val:
        raise ValueError("the classifier needs non-empty train and validation splits")
    if cfg.data.labels == "gold":
        y_train = gold_labels(train)
        if y_train is None:
            raise ValueError("data.labels=gold but the data has no 'severity' column")
    else:
        y_train = rule_labels(train)
    y_val = gold_labels(val)
    source = "gold" if y_val is not None else cfg.data.labels
    return y_train, y_val if y_val is not None else rule_labels(val), source


def _tokenizer(cfg: ClassifyConfig, run_dir: Path, train: list[dict]) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.model.name_or_path is not None:
        return AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():  # a resumed run: the tokenizer it trained
        return PreTrainedTokenizerFast.from_pretrained(str(saved))
    corpus = [normalize(ex[f]) for ex in train for f in ("complaint", "response")]
    tokenizer = train_wordpiece(corpus, cfg.model.vocab_size)
    if is_main():
        tokenizer.save_pretrained(str(saved))
    return tokenizer


def run(cfg: ClassifyConfig, *, holdout: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Trains the classifier; writes ``<run_dir>/{tokenizer,checkpoints,best,hf}``, calibration.

    Args:
        cfg: the classifier config.
        holdout: ids of training examples left out (the held-out fold of a fold model).

    Returns:
        A summary: best epoch, validation macro-F1 (against gold when present), temperature,
        train seconds, the label sources and the per-epoch history.
    """
    t0 = time.time()
    with RunDir(cfg.run_dir, lock=is_main()) as run_dir:
        parts = data_lib.split_examples(examples_of(cfg))
        parts["train"] = [ex for ex in parts["train"] if ex["id"] not in holdout]
        y_train, y_val, val_source = labels_of(cfg, parts)
        mesh = make_mesh(cfg.mesh)
        batch = batch_size_of(cfg, mesh)
        tokenizer = _tokenizer(cfg, run_dir.path, parts["train"])
        enc_train = encode(tokenizer, parts["train"], cfg.data.text, cfg.model.max_length)
        enc_val = encode(tokenizer, parts["validation"], cfg.data.text, cfg.model.max_length)
        source, config = classifier_source(cfg, tokenizer, mesh)
        counts = np.maximum(np.bincount(y_train, minlength=3), 1)
        preset = "balanced" if cfg.class_weighted else "uniform"
        weights = L.class_weights(preset, class_frequencies=counts)
        task = ClassifierTask(enc_train, y_train, enc_val, y_val, batch=batch,
                              class_weights=weights, seed=cfg.seed)  # fmt: skip
        per_epoch = max(len(y_train) // batch, 1)
        loop = Loop(
            steps=per_epoch * cfg.epochs, eval_every=per_epoch, patience=cfg.patience,
            keep_best=True, checkpoint=dataclasses.replace(cfg.checkpoint, every=per_epoch),
            log=LogSection(every=per_epoch, tensorboard=False, plot=False, progress=cfg.progress),
        )  # fmt: skip
        # fit writes config.json once the checkpoints in run_dir are known to fit
        result = fit(task, source, run_dir=run_dir.path, mesh=mesh, optim_cfg=cfg.optim,
                     loop=loop, seed=cfg.seed, config=to_dict(cfg))  # fmt: skip
        val_logits = predict_logits(result.model, enc_val, batch)
        best_f1 = label_metrics(y_val, val_logits.argmax(-1))["macro_f1"]
        temperature = fit_temperature(val_logits, y_val)
        hf.save_pretrained(result.model, config, run_dir.path / "hf", tokenizer=tokenizer)
        history = _history(run_dir.path / "metrics.jsonl", per_epoch)
        best_epoch = result.best["step"] // per_epoch if result.best else 0
        summary = dict(best_epoch=best_epoch, epochs_run=result.steps // per_epoch)
        summary.update(val_macro_f1=best_f1, val_labels=val_source, train_labels=cfg.data.labels)
        summary.update(temperature=temperature, seconds=round(time.time() - t0, 1), history=history)
        if is_main():
            (run_dir.path / "calibration.json").write_text(
                json.dumps({"temperature": temperature}) + "\n"
            )
            (run_dir.path / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"[classify] best val macro-F1 {best_f1:.3f} ({val_source} labels) at epoch "
        f"{best_epoch}/{summary['epochs_run']}; T={temperature:.3f}; {summary['seconds']}s"
    )
    return summary


def _history(metrics_path: Path, per_epoch: int) -> list[dict[str, Any]]:
    """Per epoch: mean train loss and validation macro-F1, from the run's ``metrics.jsonl``."""
    rows = read_log(metrics_path) if metrics_path.exists() else []
    train_loss = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    return [
        {"epoch": r["step"] // per_epoch, "loss": train_loss.get(r["step"]),
         "val_macro_f1": r["macro_f1"]}
        for r in rows if r["split"] == "validation" and r["step"] > 0
    ]  # fmt: skip


# ------------------------------------------------------------------------------ fold models


def fold_assignment(cfg: ClassifyConfig, k: int) -> dict[str, int]:
    """Training example id -> fold (0..k-1), stratified by training label, seeded by cfg.seed."""
    parts = data_lib.split_examples(examples_of(cfg))
    y_train = labels_of(cfg, parts)[0]
    rng = np.random.default_rng([cfg.seed, 7919])
    fold = {}
    for c in range(len(L.SEVERITIES)):
        members = np.flatnonzero(y_train == c)
        for j, i in enumerate(members[rng.permutation(len(members))]):
            fold[parts["train"][int(i)]["id"]] = j % k
    return fold


def fold_dir(run_dir: str | Path, k: int, fold: int) -> Path:
    """Where fold model ``fold`` of ``k`` lives: ``<run_dir>/folds/<k>-<fold>``."""
    return Path(run_dir) / "folds" / f"{k}-{fold}"


def train_folds(cfg: ClassifyConfig, k: int) -> list[Path]:
    """Trains the ``k`` fold models (each on the training data minus one fold) when missing.

    Each fold model is a full :func:`run` (same config and seed; its own tokenizer, early
    stopping and temperature on the validation split) under :func:`fold_dir`; a killed run
    resumes. Returns their directories.
    """
    if k < 2:
        raise ValueError(f"folds must be >= 2 for out-of-fold annotation, got {k}")
    assignment = fold_assignment(cfg, k)
    dirs = []
    for f in range(k):
        out = fold_dir(cfg.run_dir, k, f)
        if not (out / "calibration.json").is_file():
            print(f"[classify] fold model {f + 1}/{k}: training without fold {f}")
            held = frozenset(i for i, g in assignment.items() if g == f)
            run(dataclasses.replace(cfg, run_dir=str(out)), holdout=held)
        dirs.append(out)
    return dirs
