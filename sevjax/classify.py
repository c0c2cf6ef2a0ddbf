"""Severity classifier: a Flax BERT trained on rule (or gold) labels, calibrated, used to annotate.

``run(cfg)`` trains (tiny random BERT + a WordPiece tokenizer trained on the corpus by default,
or an HF BERT checkpoint such as AraBERT with a new 3-class head), early-stops on validation
macro-F1 (against gold labels when the data has them), checkpoints every epoch with Orbax (a
killed run resumes where it stopped when rerun), fits a softmax temperature on validation and exports the classifier with its tokenizer to ``<run_dir>/hf``.
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
import json
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sevjax import data as data_lib
from sevjax import hf, models, optim, sharding
from sevjax import loss as L
from sevjax.arabic import normalize, rule_severity
from sevjax.calibration import (
    fit_temperature,
    label_metrics,
    majority_baseline,
    prob_metrics,
    reliability_diagram,
    softmax,
)
from sevjax.config import MeshSection, OptimSection, Section, choice, positive
from sevjax.tokenizer import train_wordpiece


@dataclasses.dataclass(frozen=True)
class ClassifierModelSection(Section):
    """An HF BERT checkpoint (encoder kept, head new), or a tiny random BERT of these sizes."""

    name_or_path: str | None = None  # e.g. aubmindlab/bert-base-arabertv02; None = tiny
    layers: int = 2
    width: int = 64
    heads: int = 4
    mlp: int = 256
    vocab_size: int = 3000  # the WordPiece tokenizer trained on the corpus
    max_length: int = 128  # tokens, [CLS] and [SEP] included
    dropout: float = 0.1

    def validate(self) -> None:
        for name in ("layers", "width", "heads", "mlp", "vocab_size", "max_length"):
            positive(f"model.{name}", getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be a multiple of heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class ClassifierDataSection(Section):
    """The examples; training labels from the rule labeler (the paper's setting) or gold."""

    path: str | None = None  # csv/json/jsonl/parquet or Hub id; None = the embedded set
    columns: dict[str, str] | None = None  # our field -> the file's column
    drop_bad: bool = False
    labels: Literal["rule", "gold"] = "rule"
    text: Literal["complaint", "complaint+response"] = "complaint"


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(Section):
    """Severity classifier (``python classify.py train|evaluate|annotate``; defaults: tiny CPU)."""

    run_dir: str = "runs/classify"
    seed: int = 0
    epochs: int = 25
    patience: int = 8  # epochs without a better validation macro-F1 before stopping
    batch_size: int = 32
    class_weighted: bool = False  # "balanced" class weights in the cross-entropy
    ece_bins: int = 15
    output: str | None = None  # annotate: .jsonl or .parquet; default <run_dir>/annotated.jsonl
    overwrite: bool = False  # annotate: replace an existing output
    model: ClassifierModelSection = dataclasses.field(default_factory=ClassifierModelSection)
    data: ClassifierDataSection = dataclasses.field(default_factory=ClassifierDataSection)
    optim: OptimSection = dataclasses.field(
        default_factory=lambda: OptimSection(lr=2e-3, warmup_steps=30, b2=0.999, min_lr_ratio=0.0)
    )
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    def validate(self) -> None:
        for name in ("epochs", "patience", "batch_size", "ece_bins"):
            positive(name, getattr(self, name))
        if self.output is not None:
            choice("output extension", Path(self.output).suffix.lower(), (".jsonl", ".parquet"))
        if self.optim.grad_accum != 1:
            raise ValueError("optim.grad_accum must be 1 for the classifier")


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


def build_classifier(cfg: ClassifyConfig, tokenizer: Any, mesh: Any) -> tuple[Any, Any]:
    """``(model, BertConfig)``: the checkpoint's encoder with a 3-class head, or a tiny BERT."""
    m = cfg.model
    if m.name_or_path is not None:
        model, config = models.load_pretrained(m.name_or_path, mesh=mesh)
        if config.num_labels != len(L.SEVERITIES):
            raise ValueError(
                f"{m.name_or_path} is a {config.num_labels}-class classifier; need "
                f"{len(L.SEVERITIES)} classes (use the plain encoder checkpoint)"
            )
        return model, dataclasses.replace(config, id2label=L.SEVERITIES)
    hf = dict(hidden_size=m.width, num_hidden_layers=m.layers, num_attention_heads=m.heads)
    hf.update(intermediate_size=m.mlp, max_position_embeddings=max(m.max_length, 128))
    hf.update(hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
    hf.update(model_type="bert", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = models.config_from_hf(hf)
    config = dataclasses.replace(config, num_labels=3, id2label=L.SEVERITIES)
    return models.build(config, seed=cfg.seed, mesh=mesh), config


class Steps:
    """Jitted steps over the split model state (params as a plain dict, RNG state closed over).

    ``logits(params, batch) -> [B, C] f32`` (eval mode). :meth:`make_train` gives
    ``train(state, batch, rng) -> (state, metrics)`` with ``state = {params, opt_state, step}``
    donated and metrics ``loss``, ``grad_norm``, ``lr``.
    """

    def __init__(self, model: Any, mesh: Any):
        model.train()
        self.train_def, param_state, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        eval_def = nnx.split(model, nnx.Param, ...)[0]
        treedef, rest_def = jax.tree.structure(param_state), jax.tree.structure(rest)
        self.params = nnx.to_pure_dict(param_state)

        rest_leaves = jax.tree.leaves(rest)

        def model_of(graphdef, params, rng_leaves=None):
            # Fresh Variable objects per trace (NNX refuses mutation across trace levels).
            p = jax.tree.unflatten(treedef, jax.tree.leaves(params))
            rngs = jax.tree.unflatten(rest_def, rest_leaves if rng_leaves is None else rng_leaves)
            return nnx.merge(graphdef, p, rngs)

        def logits_fn(params, batch):
            model = model_of(eval_def, params)
            return model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)

        self.mesh, self.model_of = mesh, model_of
        self.replicated = NamedSharding(mesh, PartitionSpec())
        rows = sharding.batch_sharding(mesh, 2)
        self.batch_sh = {"input_ids": rows, "attention_mask": rows}
        self.param_sh = jax.tree.map(lambda x: x.sharding, self.params)
        self.logits = jax.jit(
            logits_fn, in_shardings=(self.param_sh, self.batch_sh), out_shardings=rows
        )
        self.eval_model = lambda params: model_of(eval_def, params)

    def make_train(self, tx: Any, schedule: Any, class_weights: np.ndarray) -> tuple[Any, Any]:
        """``(train_step, state_shardings)``; the CE is weighted by ``class_weights`` [C]."""
        weights, model_of, train_def = (
            jnp.asarray(class_weights, jnp.float32),
            self.model_of,
            self.train_def,
        )

        def train_step(state, batch, rng):
            seeded = model_of(train_def, state["params"])
            nnx.reseed(seeded, dropout=jax.random.fold_in(rng, state["step"]))
            rngs = jax.tree.leaves(nnx.split(seeded, nnx.Param, ...)[2])

            def loss_fn(params):
                model = model_of(train_def, params, rngs)
                logits = model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
                nll = L.token_nll(logits[:, None, :], batch["labels"][:, None])[:, 0]  # (B,)
                w = weights[batch["labels"]]  # (B,)
                return jnp.sum(w * nll) / jnp.sum(w), {}

            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
            lr = schedule(state["step"])
            return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr}

        opt_sh = optim.opt_state_shardings(tx, self.params, self.param_sh, self.replicated)
        state_sh = {"params": self.param_sh, "opt_state": opt_sh, "step": self.replicated}
        batch_sh = {**self.batch_sh, "labels": sharding.batch_sharding(self.mesh, 1)}
        step = jax.jit(
            train_step,
            in_shardings=(state_sh, batch_sh, self.replicated),
            out_shardings=(state_sh, self.replicated),
            donate_argnums=(0,),
        )
        return step, state_sh


def predict_logits(steps: Steps, params: Any, enc: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """[N, C] float32 logits, in batches of ``batch`` rows (the last one padded)."""
    n = len(enc["input_ids"])
    out = []
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in enc.items()}
        pad = batch - len(chunk["input_ids"])
        chunk = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in chunk.items()}
        out.append(np.asarray(steps.logits(params, chunk))[: batch - pad])
    return np.concatenate(out)


def _examples(cfg: ClassifyConfig) -> list[dict[str, Any]]:
    d = cfg.data
    return data_lib.load_examples(d.path, columns=d.columns, drop_bad=d.drop_bad)


def _batch_size(cfg: ClassifyConfig, mesh: Any) -> int:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {n} data devices")
    return cfg.batch_size


def run(cfg: ClassifyConfig) -> dict[str, Any]:
    """Trains the classifier and writes ``<run_dir>/{tokenizer,checkpoints,hf}``, calibration.

    Returns:
        A summary: best epoch, validation macro-F1 (against gold when present), temperature,
        train seconds, and the label source.
    """
    from sevjax.checkpoint import Checkpointer
    from sevjax.config import to_dict

    t0 = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    examples = _examples(cfg)
    parts = data_lib.split_examples(examples)
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
    val_source = "gold" if y_val is not None else cfg.data.labels
    if y_val is None:
        y_val = rule_labels(val)

    if cfg.model.name_or_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    else:
        corpus = [normalize(ex[f]) for ex in train for f in ("complaint", "response")]
        tokenizer = train_wordpiece(corpus, cfg.model.vocab_size)
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    enc_train = encode(tokenizer, train, cfg.data.text, cfg.model.max_length)
    enc_val = encode(tokenizer, val, cfg.data.text, cfg.model.max_length)

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    batch = _batch_size(cfg, mesh)
    model, config = build_classifier(cfg, tokenizer, mesh)
    steps_per_epoch = max(len(train) // batch, 1)
    total = steps_per_epoch * cfg.epochs
    counts = np.maximum(np.bincount(y_train, minlength=3), 1)
    weights = L.class_weights(
        "balanced" if cfg.class_weighted else "uniform", class_frequencies=counts
    )
    steps = Steps(model, mesh)
    tx, schedule = optim.make_optimizer(cfg.optim, total, steps.params)
    train_step, state_sh = steps.make_train(tx, schedule, weights)
    state = {
        "params": steps.params,
        "opt_state": jax.jit(tx.init, out_shardings=state_sh["opt_state"])(steps.params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), steps.replicated),
    }
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed), steps.replicated)
    # Everything a resumed run needs, checkpointed after every epoch: the live state, the best
    # (early-stopping) params, and the per-epoch history as fixed-size arrays.
    track = {
        "state": state,
        "best_params": jax.tree.map(jnp.copy, state["params"]),
        "history": jnp.full((cfg.epochs, 3), jnp.nan, jnp.float32),  # loss, val F1, seconds
    }
    ckpt = Checkpointer(run_dir / "checkpoints", every=1, keep=1)
    start = 0
    if (last := ckpt.latest_step()) is not None:
        track, (start, _) = ckpt.restore(last, track)
        print(f"[classify] resuming after epoch {start} from {ckpt.directory}")
    history = np.array(jax.device_get(track["history"]))  # writable host copy

    def best_so_far(epochs_done: int) -> tuple[float, int, int]:
        f1 = history[:epochs_done, 1]
        if not epochs_done:
            return -1.0, 0, 0
        best = int(np.argmax(f1))  # first maximum = the earliest best epoch
        return float(f1[best]), best + 1, epochs_done - best - 1

    best_f1, best_epoch, since = best_so_far(start)
    for epoch in range(start, cfg.epochs):
        if since >= cfg.patience:
            break
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        losses = []
        for k in range(steps_per_epoch):
            idx = order[k * batch : (k + 1) * batch]
            if len(idx) < batch:  # fewer examples than one batch: repeat some
                idx = np.resize(idx, batch)
            b = {**{n: v[idx] for n, v in enc_train.items()}, "labels": y_train[idx]}
            track["state"], metrics = train_step(track["state"], b, rng)
            losses.append(metrics["loss"])
        pred = predict_logits(steps, track["state"]["params"], enc_val, batch).argmax(-1)
        f1 = label_metrics(y_val, pred)["macro_f1"]
        history[epoch] = (float(np.mean(jax.device_get(losses))), f1, time.time() - t0)
        if f1 > best_f1:
            track["best_params"] = jax.tree.map(jnp.copy, track["state"]["params"])
        track["history"] = jax.device_put(history, steps.replicated)
        ckpt.save(epoch + 1, track, (epoch + 1, 0), to_dict(cfg), force=True)
        best_f1, best_epoch, since = best_so_far(epoch + 1)
    ckpt.close()
    done = int(np.sum(~np.isnan(history[:, 0])))
    history = [
        {"epoch": e + 1, "loss": float(h[0]), "val_macro_f1": float(h[1]), "s": float(h[2])}
        for e, h in enumerate(history[:done])
    ]
    params = track["best_params"]
    val_logits = predict_logits(steps, params, enc_val, batch)
    best_f1 = label_metrics(y_val, val_logits.argmax(-1))["macro_f1"]  # exact; history is f32
    temperature = fit_temperature(val_logits, y_val)
    hf.save_pretrained(steps.eval_model(params), config, run_dir / "hf", tokenizer=tokenizer)
    summary = dict(best_epoch=best_epoch, epochs_run=len(history), val_macro_f1=best_f1)
    summary.update(val_labels=val_source, train_labels=cfg.data.labels, temperature=temperature)
    summary.update(seconds=round(time.time() - t0, 1), history=history)
    (run_dir / "calibration.json").write_text(json.dumps({"temperature": temperature}) + "\n")
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"[classify] best val macro-F1 {best_f1:.3f} ({val_source} labels) at epoch "
        f"{best_epoch}/{len(history)}; T={temperature:.3f}; {summary['seconds']}s"
    )
    return summary


def _load_trained(cfg: ClassifyConfig) -> tuple[Any, Steps, float, int]:
    """The exported classifier, its tokenizer, the fitted temperature and the batch size."""
    from transformers import AutoTokenizer

    run_dir = Path(cfg.run_dir)
    hf_dir, calib = run_dir / "hf", run_dir / "calibration.json"
    if not (hf_dir / "config.json").is_file() or not calib.is_file():
        raise FileNotFoundError(f"no trained classifier in {run_dir}: python classify.py train")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    model, _ = models.load_pretrained(str(hf_dir), mesh=mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    steps = Steps(model, mesh)
    return tokenizer, steps, json.loads(calib.read_text())["temperature"], _batch_size(cfg, mesh)


def evaluate(cfg: ClassifyConfig) -> dict[str, Any]:
    """Metrics on validation and test before / after temperature scaling (fitted on validation).

    Writes ``<run_dir>/eval.json``, ``eval.md`` (a table) and ``reliability.png``.

    Returns:
        ``{"temperature", "labels", "baseline_macro_f1", "rule_labeler", "validation": {"raw",
        "calibrated"}, "test": {...}}``; each metrics dict has accuracy, macro_f1, per_class,
        confusion, nll, brier, ece.
    """
    run_dir = Path(cfg.run_dir)
    tokenizer, steps, _, batch = _load_trained(cfg)
    examples = _examples(cfg)
    parts = data_lib.split_examples(examples)
    logits, labels = {}, {}
    for split in ("validation", "test"):
        if parts[split]:
            enc = encode(tokenizer, parts[split], cfg.data.text, cfg.model.max_length)
            logits[split] = predict_logits(steps, steps.params, enc, batch)
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
        raise FileExistsError(f"{out} already exists; pass --set overwrite=true to replace it")
    tokenizer, steps, temperature, batch = _load_trained(cfg)
    examples = _examples(cfg)
    enc = encode(tokenizer, examples, cfg.data.text, cfg.model.max_length)
    probs = softmax(predict_logits(steps, steps.params, enc, batch) / temperature)
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


def ensure_annotated(run_dir: str | Path, cfg: ClassifyConfig | None = None) -> Path:
    """The embedded set annotated by the tiny classifier, trained under ``run_dir`` if needed.

    Args:
        run_dir: the LM run's directory; the classifier lives in ``<run_dir>/severity_classifier``
            and the annotated set is ``<run_dir>/annotated.jsonl``.
        cfg: classifier config (default: the tiny defaults); its run_dir/output are replaced.

    Returns:
        The annotated JSONL's path (reused when it already exists).
    """
    out = Path(run_dir) / "annotated.jsonl"
    if out.is_file():
        return out
    cfg = dataclasses.replace(
        cfg or ClassifyConfig(),
        run_dir=str(Path(run_dir) / "severity_classifier"),
        output=str(out),
        overwrite=False,
    )
    if not (Path(cfg.run_dir) / "calibration.json").is_file():
        run(cfg)
    return annotate(cfg)
