"""Using trained severity classifiers: calibrated probabilities, annotation, evaluation.

``annotate(cfg)`` writes the data with calibrated ``p_mild, p_moderate, p_critical``,
``severity_pred`` and ``annotator``. For the data the classifier was trained on (same
``data`` section as its run) and ``folds >= 2``, every training example is annotated
**out of fold**: K fold models (:func:`sevjax.classify.train_folds`, trained here when missing)
each learn from K-1 folds and annotate the fold they never saw, so the LM's severity weights do
not come from in-sample, over-confident predictions. Validation and test examples, and any other
data, are annotated by the full model (none of them was trained on). ``annotator`` records
``fold-f/K`` or ``full`` per row.

``evaluate(cfg)`` reports accuracy, macro-F1, per-class P/R/F1, confusion, NLL, Brier and ECE
before and after temperature scaling on validation and test, plus a reliability diagram, and the
calibration of the training split's probabilities in-sample (full model) next to out-of-fold.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sevjax import data as data_lib
from sevjax import hf
from sevjax import loss as L
from sevjax.calibration import (
    fit_temperature,
    label_metrics,
    majority_baseline,
    prob_metrics,
    reliability_diagram,
    softmax,
)
from sevjax.classify import (
    batch_size_of,
    encode,
    examples_of,
    fold_assignment,
    fold_dir,
    gold_labels,
    predict_logits,
    rule_labels,
    train_folds,
)
from sevjax.config import to_dict
from sevjax.distributed import barrier, is_main
from sevjax.schema import ClassifyConfig
from sevjax.trainer import make_mesh


@dataclasses.dataclass
class Trained:
    """An exported classifier: tokenizer, model (eval mode), temperature and batch size."""

    tokenizer: Any
    model: Any
    temperature: float
    batch: int

    def logits(self, cfg: ClassifyConfig, examples: list[dict]) -> np.ndarray:
        """[N, C] float32 raw logits."""
        enc = encode(self.tokenizer, examples, cfg.data.text, cfg.model.max_length)
        return predict_logits(self.model, enc, self.batch)

    def probs(self, cfg: ClassifyConfig, examples: list[dict]) -> np.ndarray:
        """[N, C] float64 temperature-scaled probabilities."""
        return softmax(self.logits(cfg, examples) / self.temperature)


def load_trained(cfg: ClassifyConfig, run_dir: str | Path | None = None) -> Trained:
    """The classifier exported under ``run_dir`` (default ``cfg.run_dir``)."""
    from transformers import AutoTokenizer

    run_dir = Path(cfg.run_dir if run_dir is None else run_dir)
    hf_dir, calib = run_dir / "hf", run_dir / "calibration.json"
    if not (hf_dir / "config.json").is_file() or not calib.is_file():
        raise FileNotFoundError(f"no trained classifier in {run_dir}: python classify.py train")
    mesh = make_mesh(cfg.mesh)
    model, _ = hf.load_pretrained(str(hf_dir), mesh=mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    temperature = json.loads(calib.read_text())["temperature"]
    return Trained(tokenizer, model, temperature, batch_size_of(cfg, mesh))


def trained_on_this_data(cfg: ClassifyConfig) -> bool:
    """Whether ``cfg.data`` is the data the classifier in ``cfg.run_dir`` was trained on."""
    path = Path(cfg.run_dir) / "config.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text(encoding="utf-8")).get("data", {})
    return saved == to_dict(cfg)["data"]


def out_of_fold(cfg: ClassifyConfig, examples: list[dict], probs: np.ndarray) -> list[str]:
    """Replaces the rows of training examples by their fold model's probabilities, in place.

    Returns:
        The annotator of each row: ``fold-f/K`` or ``full``.
    """
    k = cfg.folds
    assignment = fold_assignment(cfg, k)
    train_folds(cfg, k)
    annotator = ["full"] * len(examples)
    for f in range(k):
        rows = [i for i, ex in enumerate(examples) if assignment.get(ex["id"]) == f]
        if rows:
            model = load_trained(cfg, fold_dir(cfg.run_dir, k, f))
            probs[rows] = model.probs(cfg, [examples[i] for i in rows])
            for i in rows:
                annotator[i] = f"fold-{f + 1}/{k}"
    return annotator


def annotate(cfg: ClassifyConfig) -> Path:
    """Writes the data with calibrated probabilities, ``severity_pred`` and ``annotator``.

    The output (``cfg.output``, default ``<run_dir>/annotated.jsonl``; ``.parquet`` by extension)
    holds our field names; the input file is never modified. See the module docstring for which
    model annotates which row.

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
    examples = examples_of(cfg)
    full = load_trained(cfg)
    probs = full.probs(cfg, examples)
    annotator = ["full"] * len(examples)
    if cfg.folds >= 2 and trained_on_this_data(cfg):
        annotator = out_of_fold(cfg, examples, probs)
    probs = L.validate_severity_probs(probs / probs.sum(-1, keepdims=True))
    rows = []
    for ex, p, who in zip(examples, probs.astype(np.float64), annotator):
        row = {k: v for k, v in ex.items() if k not in data_lib.PROB_FIELDS}
        row.update(zip(data_lib.PROB_FIELDS, map(float, p)))
        row["severity_pred"] = L.SEVERITIES[int(np.argmax(p))]
        row["annotator"] = who
        rows.append(row)
    if is_main():
        data_lib.save_examples(rows, out, overwrite=cfg.overwrite)
    barrier(f"sevjax-annotate-{out}")  # every process reads the file next
    oof = sum(a != "full" for a in annotator)
    print(f"[classify] annotated {len(rows)} examples ({oof} out of fold) -> {out}")
    return out


def evaluate(cfg: ClassifyConfig) -> dict[str, Any]:
    """Metrics on validation and test before / after temperature scaling (fitted on validation).

    Writes ``<run_dir>/eval.json``, ``eval.md`` (a table) and ``reliability.png``.

    Returns:
        ``{"temperature", "labels", "baseline_macro_f1", "rule_labeler", "validation": {"raw",
        "calibrated"}, "test": {...}, "train": {"in_sample", "out_of_fold"}}``; each metrics dict
        has accuracy, macro_f1, per_class, confusion, nll, brier, ece. ``train`` holds the
        calibrated probabilities of the training split from the full model (in-sample) and,
        with ``folds >= 2``, from the fold models (out-of-fold), against gold labels when present.
    """
    run_dir = Path(cfg.run_dir)
    full = load_trained(cfg)
    parts = data_lib.split_examples(examples_of(cfg))
    logits, labels = {}, {}
    for split in ("validation", "test"):
        if parts[split]:
            logits[split] = full.logits(cfg, parts[split])
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
    result["train"] = _train_calibration(cfg, full, parts["train"], train_labels)
    table = _table(result)
    if is_main():
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        (run_dir / "eval.md").write_text(table + "\n", encoding="utf-8")
        reliability_diagram(curves, run_dir / "reliability.png", bins=cfg.ece_bins)
        print(table)
    return result


def _train_calibration(cfg: ClassifyConfig, full: Trained, train: list[dict], y: np.ndarray):
    """The training split's calibrated probabilities: in-sample, and out-of-fold if asked."""
    probs = full.probs(cfg, train)
    out = {"in_sample": prob_metrics(probs, y, bins=cfg.ece_bins)}
    if cfg.folds >= 2 and trained_on_this_data(cfg):
        out_of_fold(cfg, train, probs)
        out["out_of_fold"] = prob_metrics(probs, y, bins=cfg.ece_bins)
    return out


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
    for kind, m in result.get("train", {}).items():
        lines.append(
            f"| train | {kind.replace('_', '-')} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
            f"{m['nll']:.3f} | {m['brier']:.3f} | {m['ece']:.3f} | |"
        )
    return "\n".join(lines)
