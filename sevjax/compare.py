"""The paper's comparison table: no fine-tuning vs CE vs severity-weighted, over several seeds.

For each model of a :class:`sevjax.schema.CompareConfig` and each seed, every fine-tuned row
(by default ``ce`` and ``severity``; weighting presets and normalizations can be added as rows)
is trained by :func:`sevjax.pipeline.train` with the same data and step budget, and every row plus
"none" (the starting checkpoint, or the seeded random init) is scored on the test split by
:func:`sevjax.evaluate.evaluate_model`. Per row the report gives, as the mean and a 95% t-interval
over seeds: BERTScore P/R/F1, chrF, the emergency-referral proxy on critical cases, and the
per-severity validation NLL of the model (the mechanism the method relies on: a heavier loss on
critical cases should lower their NLL relative to CE at the same budget). Each row minus the
baseline (CE) is given per severity class with its interval over seeds, and within each seed as a
paired bootstrap over test examples. Writes ``compare.md``, ``compare.json``, ``compare.png``.

Usage::

    python train.py compare --config configs/compare-tiny.yaml
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sevjax import metrics, pipeline
from sevjax import train as lm
from sevjax.config import load
from sevjax.distributed import is_main
from sevjax.evaluate import dtype_of, eos_ids, eval_examples, evaluate_model
from sevjax.logs import read as read_log
from sevjax.loss import SEVERITIES
from sevjax.schema import CompareConfig, CompareModel, TrainConfig

SUBSETS = ("overall", *SEVERITIES)
# metric key -> table label; "/<severity>" keys read that severity's subset
TABLE = {
    "bertscore_p": "BERTScore P",
    "bertscore_r": "R",
    "bertscore_f1": "F1",
    "chrf": "chrF",
    "emergency_referral/critical": "emergency referral, critical",
    **{f"nll/{s}": f"val NLL {s}" for s in SEVERITIES},
}
DIFFS = {
    "bertscore_f1": "BERTScore F1",
    "chrf_sentence": "chrF (sentence)",
    "nll": "validation NLL",
}


def _train_configs(cfg: CompareConfig, m: CompareModel, out: Path, seed: int):
    """The fine-tuned rows' train configs of one model and seed (same data, steps, seed)."""
    yaml, sets = m.train_config or cfg.train_config, [*cfg.train_overrides, *m.overrides]
    sets += [f"model.name_or_path={m.name_or_path}"] if m.name_or_path else []
    if load(TrainConfig, yaml, sets).data.path is None:  # annotate the embedded set once
        sets.append(f"data.path={pipeline.annotate_embedded(out)}")
    own = [f"seed={seed}", f"steps={cfg.steps}"]
    return {
        r.name: load(TrainConfig, yaml, [*sets, *own, *r.overrides,
                                         f"run_dir={out / m.name / f'seed-{seed}' / r.name}"])
        for r in cfg.rows
    }  # fmt: skip


def _starting_model(train_cfg: TrainConfig, tokenizer: Any) -> Any:
    """The "none" row: the model every fine-tuning run starts from (checkpoint or seeded init)."""
    config = lm.model_config(train_cfg, tokenizer)
    source = lm.model_source(train_cfg, config, None)
    model = source.load() if source.load is not None else source.factory()
    model.eval()
    return model


def _seed_free(train_cfg: TrainConfig, cfg: CompareConfig) -> bool:
    """Whether the "none" row is the same for every seed (a checkpoint, decoded greedily)."""
    return train_cfg.model.name_or_path is not None and cfg.generation.temperature == 0


def _validation_nll(run_dir: Path, *, start: bool) -> dict[str, float | None]:
    """Validation NLL overall and per severity, at step 0 or at the end, from metrics.jsonl."""
    val = [r for r in read_log(run_dir / "metrics.jsonl") if r["split"] == "validation"]
    r = min(val, key=lambda r: r["step"]) if start else max(val, key=lambda r: r["step"])
    return {"overall": r["loss"], **{s: r.get(f"loss/{s}") for s in SEVERITIES}}


def run(cfg: CompareConfig) -> dict[str, Any]:
    """Trains and evaluates every row, per model and seed; writes the report files.

    Runs live in ``<out_dir>/<model>/seed-<s>/<row>`` (rerunning resumes them), evaluations in
    ``.../<row>/eval``. On the embedded data the set is annotated once under ``out_dir`` (the
    tiny classifier, which is also the default pipeline-check scorer).

    Returns:
        The report dict written to ``compare.json``.
    """
    from transformers import AutoTokenizer

    from sevjax.hf import load_pretrained

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer_path, layer, note = pipeline.default_scorer(out, cfg.scorer)
    results: dict[str, dict[str, dict[int, Any]]] = {}
    for m in cfg.models:
        rows: dict[str, dict[int, Any]] = {"none": {}, **{r.name: {} for r in cfg.rows}}
        for seed in cfg.seeds:
            train_cfgs = _train_configs(cfg, m, out, seed)
            for name, train_cfg in train_cfgs.items():
                print(f"\n[compare] {m.name} / seed {seed} / {name}: training {cfg.steps} steps")
                pipeline.train(train_cfg)
            first = train_cfgs[cfg.baseline]
            data, base_dir = first.data, Path(first.run_dir)
            examples = eval_examples(data, cfg.split, cfg.max_examples)
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir / "hf"))
            kw = dict(data=data, generation=cfg.generation, scorer=cfg.scorer, note=note)
            kw.update(
                scorer_path=scorer_path, layer=layer, eos_ids=eos_ids(tokenizer, base_dir / "hf")
            )
            for row in rows:
                run_dir = base_dir.parent / row
                if row == "none" and seed != cfg.seeds[0] and _seed_free(first, cfg):
                    rows[row][seed] = rows[row][cfg.seeds[0]]  # same checkpoint, greedy decoding
                    continue
                if row == "none":
                    model = _starting_model(first, tokenizer)
                    nll = _validation_nll(base_dir, start=True)
                else:
                    model, _ = load_pretrained(str(run_dir / "hf"), dtype=dtype_of(cfg))
                    nll = _validation_nll(run_dir, start=False)
                summary, records = evaluate_model(
                    model, tokenizer, examples, out_dir=run_dir / "eval",
                    name=f"{m.name}/seed-{seed}/{row}", **kw,
                )  # fmt: skip
                rows[row][seed] = {"summary": summary, "records": records, "nll": nll}
                del model
        results[m.name] = rows
    labels = {"none": "none", **{r.name: r.label or r.name for r in cfg.rows}}
    info = dict(steps=cfg.steps, seeds=list(cfg.seeds), scorer=f"{scorer_path} layer {layer}")
    report = build_report(results, cfg, labels, note=note, **info)
    if is_main():
        (out / "compare.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        (out / "compare.md").write_text(report_markdown(report), encoding="utf-8")
        report_plot(report, out / "compare.png")
    print(f"\n{report_markdown(report)}\n[compare] compare.md, .json, .png -> {out}")
    return report


# -------------------------------------------------------------------------------------- report


def _values(seed_result: dict[str, Any]) -> dict[str, float | None]:
    """The scalar metrics of one row and seed, flat: ``key`` or ``key/<subset>``."""
    summary, nll = seed_result["summary"], seed_result["nll"]
    groups = {"overall": summary["overall"], **summary["by_severity"]}
    out: dict[str, float | None] = {}
    for key in ("bertscore_p", "bertscore_r", "bertscore_f1", "chrf", "chrf_sentence"):
        out[key] = groups["overall"].get(key)
        out.update({f"{key}/{s}": groups[s].get(key) for s in SEVERITIES})
    out["emergency_referral/critical"] = groups["critical"].get("emergency_referral")
    out["nll"] = nll["overall"]
    out.update({f"nll/{s}": nll[s] for s in SEVERITIES})
    return out


def _diff_key(metric: str, subset: str) -> str:
    return metric if subset == "overall" else f"{metric}/{subset}"


def build_report(
    results: dict[str, dict[str, dict[int, Any]]],
    cfg: CompareConfig,
    labels: dict[str, str],
    **info: Any,
) -> dict[str, Any]:
    """Per model: each row's per-seed values and means with CIs, and row - baseline differences.

    ``results`` is ``{model: {row: {seed: {"summary", "records", "nll"}}}}``. Differences: for
    every fine-tuned row other than the baseline and every :data:`DIFFS` metric and subset, the
    mean over seeds of (row - baseline) with a 95% t-interval, and per seed a paired bootstrap
    over test examples (sentence-level metrics only).
    """
    boot = dataclasses.asdict(cfg.bootstrap)
    models = {}
    for name, rows in results.items():
        table = {}
        for row, per_seed in rows.items():
            values = {seed: _values(r) for seed, r in per_seed.items()}
            keys = values[next(iter(values))].keys()
            mean = {k: metrics.mean_ci([v[k] for v in values.values()], alpha=cfg.bootstrap.alpha)
                    for k in keys}  # fmt: skip
            table[row] = {"label": labels[row], "seeds": values, "mean": mean}
        diffs = {}
        for row in rows:
            if row in ("none", cfg.baseline):
                continue
            diffs[row] = _differences(rows[cfg.baseline], rows[row], table, row, cfg, boot)
        models[name] = {"rows": table, "minus_baseline": diffs}
    return {**info, "baseline": cfg.baseline, "bootstrap": boot, "models": models}


def _differences(base: dict, other: dict, table: dict, row: str, cfg: CompareConfig, boot: dict):
    """``{metric: {subset: {mean, lo, hi, n, per_seed: {seed: {diff, lo, hi, n}}}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for metric in DIFFS:
        out[metric] = {}
        for subset in SUBSETS:
            key = _diff_key(metric, subset)
            deltas = [
                None
                if table[row]["seeds"][s][key] is None
                or table[cfg.baseline]["seeds"][s][key] is None
                else table[row]["seeds"][s][key] - table[cfg.baseline]["seeds"][s][key]
                for s in cfg.seeds
            ]
            cell = metrics.mean_ci(deltas, alpha=cfg.bootstrap.alpha)
            if metric != "nll":  # sentence-level: a paired bootstrap over examples per seed
                score = "chrf" if metric == "chrf_sentence" else metric
                cell["per_seed"] = {
                    s: metrics.paired_differences(
                        base[s]["records"], other[s]["records"], [score], **boot
                    )[score].get(subset)
                    for s in cfg.seeds
                }
            out[metric][subset] = cell
    return out


def _cell(c: dict[str, Any] | None, digits: int = 4) -> str:
    if not c or c.get("mean") is None:
        return "-"
    if c.get("lo") is None:
        return f"{c['mean']:.{digits}f}"
    return f"{c['mean']:.{digits}f} ± {(c['hi'] - c['lo']) / 2:.{digits}f}"


def _signed(c: dict[str, Any] | None) -> str:
    if not c or c.get("mean", c.get("diff")) is None:
        return "-"
    m = c.get("mean", c.get("diff"))
    if c.get("lo") is None:
        return f"{m:+.4f}"
    return f"{m:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"


def report_markdown(report: dict[str, Any]) -> str:
    """The comparison as Markdown: the score table, row - baseline with CIs, and per seed."""
    level = round(100 * (1 - report["bootstrap"]["alpha"]))
    seeds = report["seeds"]
    lines = ["# No fine-tuning vs CE vs severity-weighted fine-tuning", ""]
    if report.get("note"):
        lines += [f"> {report['note']}", ""]
    lines += [
        f"{len(seeds)} seed(s) {seeds}, {report['steps']} steps per fine-tuning run, same data and "
        f"budget per row; scorer {report['scorer']}. Test-split generation scores and validation "
        f"NLL; each cell is the mean over seeds ± the half-width of its {level}% t-interval.",
        "",
        "| model | fine-tuning | " + " | ".join(TABLE.values()) + " |",
        "|---|---|" + "---|" * len(TABLE),
    ]
    for name, m in report["models"].items():
        for r in m["rows"].values():
            cells = [_cell(r["mean"].get(k), 3 if k.startswith("nll") else 4) for k in TABLE]
            lines.append(f"| {name} | {r['label']} | " + " | ".join(cells) + " |")
    base = report["baseline"]
    for name, m in report["models"].items():
        for row, diffs in m["minus_baseline"].items():
            label = m["rows"][row]["label"]
            lines += ["", f"## {name}: {label} minus {m['rows'][base]['label']} "
                      f"(mean over seeds, {level}% t-interval)", "",
                      "| metric | overall | mild | moderate | critical |", "|---|---|---|---|---|"]  # fmt: skip
            for metric, label_m in DIFFS.items():
                cells = [_signed(diffs[metric][s]) for s in SUBSETS]
                lines.append(f"| {label_m} | " + " | ".join(cells) + " |")
            lines += ["", f"Per seed, paired bootstrap over test examples ({level}% CI, "
                      f"{report['bootstrap']['n_resamples']} resamples):", "",
                      "| seed | metric | overall | mild | moderate | critical |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for seed in seeds:
                for metric in ("bertscore_f1", "chrf_sentence"):
                    per = [diffs[metric][s].get("per_seed", {}).get(seed) for s in SUBSETS]
                    per = [_signed(c) for c in per]
                    lines.append(f"| {seed} | {DIFFS[metric]} | " + " | ".join(per) + " |")
    return "\n".join(lines) + "\n"


def report_plot(report: dict[str, Any], path: Path) -> None:
    """BERTScore F1 per row (mean, CI over seeds) and row - baseline per severity with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    rows = list(report["models"][names[0]]["rows"])
    x, width = np.arange(len(names)), 0.8 / len(rows)
    for k, row in enumerate(rows):
        cells = [report["models"][n]["rows"][row]["mean"]["bertscore_f1"] for n in names]
        _bars(axes[0], x + (k - (len(rows) - 1) / 2) * width, cells, width,
              report["models"][names[0]]["rows"][row]["label"])  # fmt: skip
    axes[0].set_xticks(x, names)
    axes[0].set(ylabel="BERTScore F1", title="BERTScore F1 (test split), mean over seeds")
    axes[0].margins(y=0.3)
    for ax, metric in zip(axes[1:], ("nll", "bertscore_f1")):
        x = np.arange(len(SUBSETS))
        series = [
            (n, r, d) for n in names for r, d in report["models"][n]["minus_baseline"].items()
        ]
        width = 0.8 / max(len(series), 1)
        for k, (n, r, d) in enumerate(series):
            cells = [d[metric][s] for s in SUBSETS]
            _bars(ax, x + (k - (len(series) - 1) / 2) * width, cells, width, f"{n}: {r}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, SUBSETS)
        ax.set(ylabel=f"row - {report['baseline']}", title=f"{DIFFS[metric]}: row - baseline")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax: Any, x: np.ndarray, cells: list[dict | None], width: float, label: str) -> None:
    mean = np.array([np.nan if not c or c["mean"] is None else c["mean"] for c in cells])
    err = np.array([[0.0, 0.0] if not c or c.get("lo") is None
                    else [c["mean"] - c["lo"], c["hi"] - c["mean"]] for c in cells])  # fmt: skip
    ax.bar(x, mean, width, yerr=err.T, capsize=3, label=label)
