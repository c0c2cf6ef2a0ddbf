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
    majority_baseline,
    prob_metrics,
    reliability_diagram,
    softmax,
)
from sevjax.config import to_dict
from sevjax.logs import read as read_log
from sevjax.loop import Loop, fit
from sevjax.rundir import RunDir
from sevjax.schema import ClassifyConfig, LogSection
from sevjax.tokenizer import train_wordpiece
from sevjax.trainer import ModelSource, Position, make_mesh


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
    m = cfg.model
    if m.name_or_path is not None:
        config = hf.read_config(m.name_or_path)
        if config.num_labels != len(L.SEVERITIES):
            raise ValueError(
                f"{m.name_or_path} is a {config.num_labels}-class classifier; need "
                f"{len(L.SEVERITIES)} classes (use the plain encoder checkpoint)"
            )

        def load() -> nnx.Module:
            return hf.load_pretrained(m.name_or_path, mesh=mesh, seed=cfg.seed)[0]

    else:
        d = dict(hidden_size=m.width, num_hidden_layers=m.layers, num_attention_heads=m.heads)
        d.update(intermediate_size=m.mlp, max_position_embeddings=max(m.max_length, 128))
        d.update(hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
        d.update(model_type="bert", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        config, load = models.config_from_hf(d), None
    config = dataclasses.replace(config, num_labels=3, id2label=L.SEVERITIES)
    cls = models.model_class(config)

    def factory() -> nnx.Module:
        return cls(config, rngs=nnx.Rngs(cfg.seed))

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
        nnx.reseed(model, dropout=rng)
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


def _examples(cfg: ClassifyConfig) -> list[dict[str, Any]]:
    d = cfg.data
    return data_lib.load_examples(d.path, columns=d.columns, drop_bad=d.drop_bad)


def _batch_size(cfg: ClassifyConfig, mesh: Any) -> int:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {n} data devices")
    return cfg.batch_size


def _labels(cfg: ClassifyConfig, parts: dict[str, list]) -> tuple[np.ndarray, np.ndarray, str]:
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
    if jax.process_index() == 0:
        tokenizer.save_pretrained(str(saved))
    return tokenizer


def run(cfg: ClassifyConfig) -> dict[str, Any]:
    """Trains the classifier; writes ``<run_dir>/{tokenizer,checkpoints,best,hf}``, calibration.

    Returns:
        A summary: best epoch, validation macro-F1 (against gold when present), temperature,
        train seconds, the label sources and the per-epoch history.
    """
    t0 = time.time()
    with RunDir(cfg.run_dir, lock=jax.process_index() == 0) as run_dir:
        parts = data_lib.split_examples(_examples(cfg))
        y_train, y_val, val_source = _labels(cfg, parts)
        mesh = make_mesh(cfg.mesh)
        batch = _batch_size(cfg, mesh)
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
        if jax.process_index() == 0:
            run_dir.write_config(to_dict(cfg))
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
        if jax.process_index() == 0:
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


def _load_trained(cfg: ClassifyConfig) -> tuple[Any, Any, float, int]:
    """The exported classifier, its tokenizer, the fitted temperature and the batch size."""
    from transformers import AutoTokenizer

    run_dir = Path(cfg.run_dir)
    hf_dir, calib = run_dir / "hf", run_dir / "calibration.json"
    if not (hf_dir / "config.json").is_file() or not calib.is_file():
        raise FileNotFoundError(f"no trained classifier in {run_dir}: python classify.py train")
    mesh = make_mesh(cfg.mesh)
    model, _ = hf.load_pretrained(str(hf_dir), mesh=mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    temperature = json.loads(calib.read_text())["temperature"]
    return tokenizer, model, temperature, _batch_size(cfg, mesh)


def evaluate(cfg: ClassifyConfig) -> dict[str, Any]:
    """Metrics on validation and test before / after temperature scaling (fitted on validation).

    Writes ``<run_dir>/eval.json``, ``eval.md`` (a table) and ``reliability.png``.

    Returns:
        ``{"temperature", "labels", "baseline_macro_f1", "rule_labeler", "validation": {"raw",
        "calibrated"}, "test": {...}}``; each metrics dict has accuracy, macro_f1, per_class,
        confusion, nll, brier, ece.
    """
    run_dir = Path(cfg.run_dir)
    tokenizer, model, _, batch = _load_trained(cfg)
    parts = data_lib.split_examples(_examples(cfg))
    logits, labels = {}, {}
    for split in ("validation", "test"):
        if parts[split]:
            enc = encode(tokenizer, parts[split], cfg.data.text, cfg.model.max_length)
            logits[split] = predict_logits(model, enc, batch)
            gold = gold_labels(parts[split])
            labels[split] = gold if gold is not None else rule_labels(parts[split])
    if "validation" not in logits:
        raise ValueError("evaluate needs a validation split to fit the temperature")
    temperature = fit_temperature(logits["validation"], labels["validation"])
    train_labels = gold_labels(parts["train"])
    train_labels = train_labels if train_labels is not None else rule_labels(parts["train"])
    has_gold = gold_labels(parts["validation"]) is not None
    result: dict[str, Any] = {"temperature": temperature, "labels": "gold" if has_gold else "rule"}
    result["baseline_macro_f1"] = {}
    result["rule_labeler"] = {}
    curves = {}
    for split, z in logits.items():
        raw = prob_metrics(softmax(z), labels[split], bins=cfg.ece_bins)
        cal = prob_metrics(softmax(z / temperature), labels[split], bins=cfg.ece_bins)
        result[split] = {"raw": raw, "calibrated": cal}
        result["baseline_macro_f1"][split] = majority_baseline(train_labels, labels[split])
        if has_gold:
            result["rule_labeler"][split] = label_metrics(labels[split], rule_labels(parts[split]))
        curves[split] = (softmax(z), softmax(z / temperature), labels[split])
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    table = _table(result)
    (run_dir / "eval.md").write_text(table + "\n", encoding="utf-8")
    reliability_diagram(curves, run_dir / "reliability.png", bins=cfg.ece_bins)
    print(table)
    return result


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"temperature {result['temperature']:.3f} (fitted on validation); labels: {result['labels']}",
        "",
        "| split | scaling | accuracy | macro-F1 | NLL | Brier | ECE | majority macro-F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in ("validation", "test"):
        for kind in ("raw", "calibrated"):
            if split in result:
                m = result[split][kind]
                lines.append(
                    f"| {split} | {kind} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                    f"{m['nll']:.3f} | {m['brier']:.3f} | {m['ece']:.3f} | "
                    f"{result['baseline_macro_f1'][split]:.3f} |"
                )
    return "\n".join(lines)


def annotate(cfg: ClassifyConfig) -> Path:
    """Writes the data with calibrated ``p_mild, p_moderate, p_critical`` and ``severity_pred``.

    The output (``cfg.output``, default ``<run_dir>/annotated.jsonl``; ``.parquet`` by extension)
    holds our field names; the input file is never modified.

    Raises:
        FileExistsError: if the output exists and ``overwrite`` is false.
        ValueError: if the output is the input file.
    """
    out = Path(cfg.output) if cfg.output is not None else Path(cfg.run_dir) / "annotated.jsonl"
    source = Path(cfg.data.path) if cfg.data.path is not None else data_lib.EMBEDDED_PATH
    if source.exists() and out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"annotate output {out} is the input file; choose another output")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    examples = _examples(cfg)
    tokenizer, model, temperature, batch = _load_trained(cfg)
    enc = encode(tokenizer, examples, cfg.data.text, cfg.model.max_length)
    probs = softmax(predict_logits(model, enc, batch) / temperature)
    probs = L.validate_severity_probs(probs.astype(np.float64) / probs.sum(-1, keepdims=True))
    rows = []
    for ex, p in zip(examples, probs.astype(np.float64)):
        row = {k: v for k, v in ex.items() if k not in data_lib.PROB_FIELDS}
        row.update(zip(data_lib.PROB_FIELDS, map(float, p)))
        row["severity_pred"] = L.SEVERITIES[int(np.argmax(p))]
        rows.append(row)
    data_lib.save_examples(rows, out, overwrite=cfg.overwrite)
    print(f"[classify] annotated {len(rows)} examples -> {out} (T={temperature:.3f})")
    return out
