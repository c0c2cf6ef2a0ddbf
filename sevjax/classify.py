"""Severity classifier: a Flax BERT trained on rule (or gold) labels, calibrated, used to annotate.

``run(cfg)`` trains (tiny random BERT + a WordPiece tokenizer trained on the corpus by default,
or an HF BERT checkpoint such as AraBERT with a new 3-class head), early-stops on validation
macro-F1 (against gold labels when the data has them), saves an Orbax checkpoint, fits a softmax
temperature on validation and exports the classifier with its tokenizer to ``<run_dir>/hf``.
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
from sevjax.config import MeshSection, OptimSection, Section, choice, positive


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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of [N, C] logits in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def label_metrics(y: np.ndarray, pred: np.ndarray, num_classes: int = 3) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Args:
        y: [N] int gold classes; pred: [N] int predicted classes.

    Returns:
        ``{"accuracy", "macro_f1", "per_class": {name: {precision, recall, f1, support}},
        "confusion": [[int]] (rows gold, columns predicted)}``; an empty class scores 0.
    """
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    conf = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(conf, (y, pred), 1)
    tp = np.diag(conf).astype(np.float64)
    precision = np.divide(tp, conf.sum(0), out=np.zeros_like(tp), where=conf.sum(0) > 0)
    recall = np.divide(tp, conf.sum(1), out=np.zeros_like(tp), where=conf.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    names = L.SEVERITIES if num_classes == 3 else tuple(map(str, range(num_classes)))
    return {
        "accuracy": float(tp.sum() / max(len(y), 1)),
        "macro_f1": float(f1.mean()),
        "per_class": {
            n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for n, p, r, f, s in zip(names, precision, recall, f1, conf.sum(1))
        },
        "confusion": conf.tolist(),
    }


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: bin-weighted |accuracy - confidence| over ``bins`` equal-width confidence bins."""
    conf, correct = probs.max(-1), (probs.argmax(-1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def prob_metrics(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """:func:`label_metrics` of the argmax plus NLL, Brier score (sum over classes) and ECE."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, np.int64)
    onehot = np.eye(probs.shape[1])[y]
    out = label_metrics(y, probs.argmax(-1), probs.shape[1])
    out["nll"] = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))))
    out["brier"] = float(np.mean(np.sum((probs - onehot) ** 2, -1)))
    out["ece"] = expected_calibration_error(probs, y, bins)
    return out


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The softmax temperature minimizing NLL: grid over log T in [-3, 3], then a finer grid."""

    def nll(log_t: float) -> float:
        p = softmax(np.asarray(logits, np.float64) / np.exp(log_t))
        return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-300))))

    grid = np.linspace(-3.0, 3.0, 121)
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = np.linspace(best - 0.05, best + 0.05, 41)
    return float(np.exp(fine[int(np.argmin([nll(t) for t in fine]))]))


def majority_baseline(train_labels: np.ndarray, y: np.ndarray) -> float:
    """Macro-F1 on ``y`` of always predicting the most frequent training class."""
    majority = int(np.bincount(train_labels, minlength=3).argmax())
    return label_metrics(y, np.full_like(y, majority))["macro_f1"]


def reliability_diagram(curves: dict[str, tuple], path: Path, bins: int = 15) -> None:
    """PNG: per split, accuracy per confidence bin before / after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.5), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (split, (raw, cal, y)) in zip(axes[0], curves.items()):
        for probs, label, offset in ((raw, "raw", -0.25), (cal, "temperature-scaled", 0.25)):
            conf, correct = probs.max(-1), probs.argmax(-1) == y
            which = np.minimum((conf * bins).astype(int), bins - 1)
            acc = [correct[which == b].mean() if (which == b).any() else 0 for b in range(bins)]
            ece = expected_calibration_error(probs, y, bins)
            label = f"{label} (ECE {ece:.3f})"
            ax.bar(edges[:-1] + (0.5 + offset) / bins, acc, width=0.5 / bins, label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=split, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        tokenizer = data_lib.train_wordpiece(corpus, cfg.model.vocab_size)
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
    order_rng = np.random.default_rng(cfg.seed)
    history, best, best_f1, best_epoch, since = [], None, -1.0, 0, 0
    for epoch in range(cfg.epochs):
        order = order_rng.permutation(len(train))
        losses = []
        for k in range(steps_per_epoch):
            idx = order[k * batch : (k + 1) * batch]
            if len(idx) < batch:  # fewer examples than one batch: repeat some
                idx = np.resize(idx, batch)
            b = {**{n: v[idx] for n, v in enc_train.items()}, "labels": y_train[idx]}
            state, metrics = train_step(state, b, rng)
            losses.append(metrics["loss"])
        pred = predict_logits(steps, state["params"], enc_val, batch).argmax(-1)
        f1 = label_metrics(y_val, pred)["macro_f1"]
        loss = float(np.mean(jax.device_get(losses)))
        history.append(
            {"epoch": epoch + 1, "loss": loss, "val_macro_f1": f1, "s": time.time() - t0}
        )
        since = 0 if f1 > best_f1 else since + 1
        if f1 > best_f1:
            best_f1, best_epoch, best = f1, epoch + 1, jax.device_get({**state, "rng": rng})
        if since >= cfg.patience:
            break
    # One Orbax checkpoint of the early-stopping choice (params, AdamW state, step, rng).
    ckpt = Checkpointer(run_dir / "checkpoints", every=1, keep=1, async_save=False)
    ckpt.save(int(best["step"]), best, (best_epoch, 0), to_dict(cfg), force=True)
    ckpt.close()
    params = jax.device_put(best["params"], steps.param_sh)
    val_logits = predict_logits(steps, params, enc_val, batch)
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
