"""The paper's comparison table: no fine-tuning vs CE vs severity-weighted fine-tuning, per model.

For each model of a :class:`sevjax.schema.CompareConfig`, three rows with the same seed and step
budget: no fine-tuning (the starting checkpoint, or the random init for a model trained from
scratch), plain cross-entropy (``loss.mode=ce``) and severity-weighted fine-tuning
(``loss.mode=severity``). Each fine-tuning row runs :func:`sevjax.pipeline.train`, each row is
scored by :func:`sevjax.evaluate.evaluate_model`; writes ``compare.md``, ``compare.json`` and
``compare.png`` with paired-bootstrap 95% CIs of the severity - CE difference.

Usage::

    python train.py compare --config configs/compare-tiny.yaml
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sevjax import metrics, pipeline, train
from sevjax.config import load
from sevjax.evaluate import dtype_of, eos_ids, eval_examples, evaluate_model
from sevjax.loss import SEVERITIES
from sevjax.schema import BootstrapSection, CompareConfig, CompareModel, TrainConfig

ROWS = {"none": "none", "ce": "CE", "severity": "severity-weighted"}
DIFF_METRICS = {"bertscore_f1": "BERTScore F1", "chrf": "chrF (sentence)"}


def _train_configs(cfg: CompareConfig, m: CompareModel, out: Path) -> dict[str, TrainConfig]:
    """The CE and severity train configs of one model (same seed, steps and data)."""
    yaml, sets = m.train_config or cfg.train_config, [*cfg.train_overrides, *m.overrides]
    sets += [f"model.name_or_path={m.name_or_path}"] if m.name_or_path else []
    if load(TrainConfig, yaml, sets).data.path is None:  # annotate the embedded set once
        sets.append(f"data.path={pipeline.annotate_embedded(out)}")
    own = [f"seed={cfg.seed}", f"steps={cfg.steps}"]
    return {
        mode: load(TrainConfig, yaml, [*sets, *own, f"run_dir={out / m.name / mode}",
                                       f"loss.mode={mode}"])
        for mode in ("ce", "severity")
    }  # fmt: skip


def _starting_model(train_cfg: TrainConfig, tokenizer: Any) -> Any:
    """The "none" row: the model both fine-tuning runs start from (checkpoint or seeded init)."""
    config = train.model_config(train_cfg, tokenizer)
    source = train.model_source(train_cfg, config, None)
    model = source.load() if source.load is not None else source.factory()
    model.eval()
    return model


def run(cfg: CompareConfig) -> dict[str, Any]:
    """Trains and evaluates no-FT / CE / severity rows per model; writes the report files.

    Each model's runs live in ``<out_dir>/<name>/{ce,severity}`` (rerunning resumes them) and
    every row's evaluation in ``<out_dir>/<name>/<row>/eval``. On the embedded data the set is
    annotated once by the tiny classifier under ``out_dir`` and every run trains on that file,
    so the classifier is trained once and also serves as the default (pipeline-check) scorer.

    Returns:
        The report dict written to ``compare.json``.
    """
    from transformers import AutoTokenizer

    from sevjax.hf import load_pretrained

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer_path, layer, note = pipeline.default_scorer(out, cfg.scorer)
    results: dict[str, dict[str, Any]] = {}
    for m in cfg.models:
        train_cfgs = _train_configs(cfg, m, out)
        for mode, train_cfg in train_cfgs.items():
            print(f"\n[compare] {m.name} / {mode}: training {cfg.steps} steps")
            pipeline.train(train_cfg)
        data = train_cfgs["ce"].data
        examples = eval_examples(data, cfg.split, cfg.max_examples)
        ce_dir = out / m.name / "ce" / "hf"
        tokenizer = AutoTokenizer.from_pretrained(str(ce_dir))
        kw = dict(data=data, generation=cfg.generation, scorer=cfg.scorer, note=note)
        kw.update(scorer_path=scorer_path, layer=layer, eos_ids=eos_ids(tokenizer, ce_dir))
        rows: dict[str, Any] = {}
        for row in ROWS:
            if row == "none":
                model = _starting_model(train_cfgs["ce"], tokenizer)
            else:
                model, _ = load_pretrained(str(out / m.name / row / "hf"), dtype=dtype_of(cfg))
            summary, records = evaluate_model(
                model, tokenizer, examples, out_dir=out / m.name / row / "eval",
                name=f"{m.name}/{row}", **kw,
            )  # fmt: skip
            rows[row] = {"summary": summary, "records": records}
            del model
        results[m.name] = rows
    info = dict(steps=cfg.steps, seed=cfg.seed, scorer=f"{scorer_path} layer {layer}", note=note)
    report = build_report(results, cfg.bootstrap, **info)
    (out / "compare.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "compare.md").write_text(report_markdown(report), encoding="utf-8")
    report_plot(report, out / "compare.png")
    print(f"\n{report_markdown(report)}\n[compare] compare.md, .json, .png -> {out}")
    return report


# -------------------------------------------------------------------------------------- report


def build_report(
    results: dict[str, dict[str, Any]], boot: BootstrapSection, **info: Any
) -> dict[str, Any]:
    """Per model: each row's summary and the paired-bootstrap CIs of severity - CE.

    ``results`` is ``{model: {row: {"summary", "records"}}}`` for the :data:`ROWS`; ``info``
    (steps, seed, note, scorer) is copied into the report.
    """
    models = {}
    for name, rows in results.items():
        ce, sev = rows["ce"]["records"], rows["severity"]["records"]
        diffs = metrics.paired_differences(ce, sev, list(DIFF_METRICS), **dataclasses.asdict(boot))
        keep = ("overall", "by_severity")
        table = {row: {k: rows[row]["summary"][k] for k in keep} for row in ROWS}
        models[name] = {"rows": table, "severity_minus_ce": diffs}
    return {**info, "bootstrap": dataclasses.asdict(boot), "models": models}


def report_markdown(report: dict[str, Any]) -> str:
    """The comparison as Markdown: a score table and a severity - CE table with CIs."""
    level = round(100 * (1 - report["bootstrap"]["alpha"]))
    lines = ["# No fine-tuning vs CE vs severity-weighted fine-tuning", ""]
    if report.get("note"):
        lines += [f"> {report['note']}", ""]
    lines += [
        f"{report['steps']} steps per fine-tuning run, seed {report['seed']}, same data and "
        f"budget per row; scorer {report['scorer']}. BERTScore F1 mean over the test split.",
        "",
        "| model | fine-tuning | BERTScore F1 | mild | moderate | critical | chrF | BLEU "
        "| emergency referral, critical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        for row, label in ROWS.items():
            o, by = m["rows"][row]["overall"], m["rows"][row]["by_severity"]
            sev = [f"{by[s]['bertscore_f1']:.4f}" if by[s].get("n") else "-" for s in SEVERITIES]
            crit = by["critical"]
            emerg = f"{crit['emergency_referral']:.2f}" if crit.get("n") else "-"
            lines.append(
                f"| {name} | {label} | {o['bertscore_f1']:.4f} | {' | '.join(sev)} | "
                f"{o['chrf']:.2f} | {o['bleu']:.2f} | {emerg} |"
            )
    lines += [
        "",
        f"## Severity-weighted minus CE (paired bootstrap, {level}% CI, "
        f"{report['bootstrap']['n_resamples']} resamples)",
        "",
        "| model | metric | overall | mild | moderate | critical |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        for metric, label in DIFF_METRICS.items():
            cells = []
            for subset in ("overall", *SEVERITIES):
                c = m["severity_minus_ce"][metric].get(subset)
                cells.append(f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]" if c else "-")
            lines.append(f"| {name} | {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def report_plot(report: dict[str, Any], path: Path) -> None:
    """Bars of BERTScore F1 per row and model, and severity - CE F1 with CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    subsets = ("overall", *SEVERITIES)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x, width = np.arange(len(names)), 0.8 / len(ROWS)
    for k, (row, label) in enumerate(ROWS.items()):
        vals = [report["models"][n]["rows"][row]["overall"]["bertscore_f1"] for n in names]
        ax1.bar(x + (k - 1) * width, vals, width, label=label)
    ax1.set_xticks(x, names)
    ax1.set_ylabel("BERTScore F1")
    ax1.set_title("BERTScore F1 (test split)")
    ax1.margins(y=0.3)  # headroom for the legend
    ax1.legend(loc="upper left")
    x, width = np.arange(len(subsets)), 0.8 / max(len(names), 1)
    for k, n in enumerate(names):
        cells = [report["models"][n]["severity_minus_ce"]["bertscore_f1"].get(s) for s in subsets]
        d = np.array([c["diff"] if c else np.nan for c in cells])
        err = np.array([[c["diff"] - c["lo"], c["hi"] - c["diff"]] if c else [0, 0] for c in cells])
        ax2.bar(x + (k - (len(names) - 1) / 2) * width, d, width, yerr=err.T, capsize=3, label=n)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xticks(x, subsets)
    ax2.set_ylabel("severity - CE, BERTScore F1")
    ax2.set_title(f"{round(100 * (1 - report['bootstrap']['alpha']))}% paired-bootstrap CI")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI
