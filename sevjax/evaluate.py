"""Generation-based evaluation of one LM, and the paper's comparison table over several LMs.

``evaluate``: the training prompts (:func:`sevjax.lm_data.format_example`) of a test split,
greedy generation (:func:`sevjax.generate.generate`, left-padded bucketed batches), and
BERTScore / chrF / BLEU / emergency referral per example (:mod:`sevjax.metrics`); writes
``generations.jsonl`` and ``summary.json`` (overall and per severity) and prints a table.

``compare``: for each model of a :class:`CompareConfig`, three rows with the same seed and step
budget: no fine-tuning (the starting checkpoint, or the random init for a model trained from
scratch), plain cross-entropy (``loss.mode=ce``) and severity-weighted fine-tuning
(``loss.mode=severity``); writes ``compare.md``, ``compare.json`` and ``compare.png`` with
paired-bootstrap 95% CIs of the severity - CE difference.

Scorer: ``scorer.model_path`` names a local BERT (bert-base-multilingual-cased with
``scorer.layer=9`` is the bert-score default for Arabic; AraBERT also works). Left unset, the tiny
severity classifier's exported BERT is used (trained on the embedded set if needed): those
BERTScore numbers are a pipeline check only, not comparable to the paper.

Usage::

    python train.py evaluate --run runs/tiny
    python train.py evaluate --run models/aragpt2-base --set scorer.model_path=... \\
        --set scorer.layer=9
    python train.py compare --config configs/compare-tiny.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sevjax import metrics
from sevjax.config import DataSection, Section, TrainConfig, from_dict, load, positive
from sevjax.loss import SEVERITIES

ROWS = {"none": "none", "ce": "CE", "severity": "severity-weighted"}
DIFF_METRICS = {"bertscore_f1": "BERTScore F1", "chrf": "chrF (sentence)"}
PIPELINE_CHECK_NOTE = (
    "BERTScore uses the tiny severity classifier's BERT (no pretrained scorer configured): "
    "a pipeline check, not comparable to the paper; set scorer.model_path to a local "
    "bert-base-multilingual-cased (scorer.layer=9) or AraBERT."
)


@dataclasses.dataclass(frozen=True)
class GenerationSection(Section):
    """Decoding settings (greedy by default)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 16
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256)  # left-padded prompt lengths
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0

    def validate(self) -> None:
        positive("generation.max_new_tokens", self.max_new_tokens)
        positive("generation.temperature", self.temperature, allow_zero=True)
        positive("generation.batch_size", self.batch_size)
        if not self.prompt_buckets or min(self.prompt_buckets) < 1:
            raise ValueError(f"generation.prompt_buckets: lengths >= 1, got {self.prompt_buckets}")


@dataclasses.dataclass(frozen=True)
class ScorerSection(Section):
    """BERTScore model; ``layer`` is required with ``model_path`` (bert-score: mBERT cased, 9)."""

    model_path: str | None = None  # local HF BERT dir; None = the tiny classifier (pipeline check)
    layer: int | None = None  # hidden_states index; None only without model_path (= top - 1)
    idf: bool = False
    baseline_path: str | None = None  # bert-score rescale file (LAYER,P,R,F)
    batch_size: int = 32

    def validate(self) -> None:
        if self.model_path is not None and self.layer is None:
            raise ValueError(
                "scorer.layer is required with scorer.model_path (bert-score's default for "
                "Arabic is bert-base-multilingual-cased with layer 9)"
            )
        if self.layer is not None:
            positive("scorer.layer", self.layer, allow_zero=True)
        positive("scorer.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class BootstrapSection(Section):
    """Paired percentile bootstrap of severity - CE."""

    n_resamples: int = 1000
    seed: int = 0
    alpha: float = 0.05

    def validate(self) -> None:
        positive("bootstrap.n_resamples", self.n_resamples)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"bootstrap.alpha must be in (0, 1), got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Generate and score one model (``python train.py evaluate --run DIR``)."""

    run: str | None = None  # a train run dir, an HF causal-LM dir or a Hub id
    out_dir: str | None = None  # default <run>/eval (train run) or runs/eval/<model name>
    split: Literal["train", "validation", "test"] = "test"
    max_examples: int | None = None
    data: DataSection = dataclasses.field(default_factory=DataSection)  # when run is no train run
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    scorer: ScorerSection = dataclasses.field(default_factory=ScorerSection)


@dataclasses.dataclass(frozen=True)
class CompareModel(Section):
    """One compared LM, trained from its train config (random init when it names no model)."""

    name: str = "tiny-gpt2"
    name_or_path: str | None = None  # None = model.name_or_path of the train config
    train_config: str | None = None  # this model's TrainConfig YAML; None = the shared one
    overrides: tuple[str, ...] = ()  # extra train --set lines for this model (e.g. optim.lr=5e-5)


@dataclasses.dataclass(frozen=True)
class CompareConfig(Section):
    """No fine-tuning vs CE vs severity-weighted, per model (``... compare --config X``)."""

    out_dir: str = "runs/compare-tiny"
    train_config: str | None = None  # TrainConfig YAML overlay shared by every run
    train_overrides: tuple[str, ...] = ()  # train --set lines shared by every run
    seed: int = 0
    steps: int = 300
    models: tuple[CompareModel, ...] = (CompareModel(),)
    split: Literal["validation", "test"] = "test"
    max_examples: int | None = None
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    scorer: ScorerSection = dataclasses.field(default_factory=ScorerSection)
    bootstrap: BootstrapSection = dataclasses.field(default_factory=BootstrapSection)

    def validate(self) -> None:
        positive("steps", self.steps)
        names = [m.name for m in self.models]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"models must be a non-empty list with distinct names, got {names}")


# ------------------------------------------------------------------------------------ generation


def _eos_ids(tokenizer: Any, source: str | Path | None) -> tuple[int, ...]:
    """EOS ids: the tokenizer's plus ``generation_config.json``'s (chat models list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = Path(source) / "generation_config.json" if source is not None else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(ids))


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    gen: GenerationSection,
    *,
    max_positions: int,
    eos_ids: Sequence[int] = (),
) -> list[str]:
    """Decodes one response per prompt with :func:`sevjax.generate.generate`.

    Prompts are sorted by length and left-padded to ``gen.prompt_buckets`` in batches of
    ``gen.batch_size`` rows (the last batch padded with copies), so decoding compiles once per
    bucket. A prompt longer than ``max_positions - max_new_tokens`` keeps its last tokens.

    Args: a decoder ``model`` and its ``tokenizer``; ``prompts`` token ids per example; ``gen``
    settings; the model's ``max_positions``; ``eos_ids`` that end a response.

    Returns:
        The decoded responses (special tokens skipped, stripped), in input order.
    """
    import jax
    from tqdm.auto import tqdm

    from sevjax.generate import generate

    room = max_positions - gen.max_new_tokens
    if room < 1:
        raise ValueError(
            f"generation.max_new_tokens={gen.max_new_tokens} leaves no room for a prompt within "
            f"the model's {max_positions} positions"
        )
    cut = sum(len(p) > room for p in prompts)
    if cut:
        print(f"[eval] {cut} prompt(s) longer than {room} tokens keep their last {room} tokens")
    prompts = [list(p)[-room:] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or (0,))[0]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    rng = jax.random.key(gen.seed)
    b = gen.batch_size
    for k, start in enumerate(tqdm(range(0, len(order), b), desc="generate", leave=False)):
        idx = order[start : start + b]
        rows = [prompts[i] for i in idx] + [prompts[idx[0]]] * (b - len(idx))
        longest = max(len(r) for r in rows)
        t = next((x for x in sorted(gen.prompt_buckets) if x >= longest), -(-longest // 64) * 64)
        t = max(min(t, room), longest)
        ids, mask = np.full((b, t), pad, np.int32), np.zeros((b, t), np.int32)
        for r, row in enumerate(rows):
            ids[r, t - len(row) :], mask[r, t - len(row) :] = row, 1
        new = generate(
            model,
            ids,
            mask,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            eos_token_id=tuple(eos_ids),
            pad_token_id=int(pad),
            rng=jax.random.fold_in(rng, k),
        )
        for r, i in enumerate(idx):
            tokens = np.asarray(new[r]).tolist()
            stop = next((j for j, x in enumerate(tokens) if x in eos_ids), len(tokens))
            out[i] = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
    return out


# ------------------------------------------------------------------------------- one evaluation


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table of one model's summary: overall and per severity."""
    lines = [
        "| subset | n | BERTScore P | R | F1 | chrF | BLEU | emergency referral (ref) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = [("overall", summary["overall"])] + list(summary["by_severity"].items())
    for name, g in groups:
        if not g.get("n"):
            lines.append(f"| {name} | 0 | | | | | | |")
            continue
        lines.append(
            f"| {name} | {g['n']} | {g['bertscore_p']:.4f} | {g['bertscore_r']:.4f} | "
            f"{g['bertscore_f1']:.4f} | {g['chrf']:.2f} | {g['bleu']:.2f} | "
            f"{g['emergency_referral']:.2f} ({g['reference_emergency_referral']:.2f}) |"
        )
    return "\n".join(lines)


def resolve_scorer(scorer: ScorerSection, anchor: str | Path) -> tuple[str, int, str | None]:
    """``(model_path, layer, note)``; with no ``model_path``, the tiny classifier's BERT.

    The tiny classifier is trained by :func:`sevjax.classify.ensure_annotated` under ``anchor``
    when it does not exist yet; ``note`` then says these numbers are a pipeline check.
    """
    if scorer.model_path is not None:
        return scorer.model_path, int(scorer.layer), None
    from sevjax import classify

    classify.ensure_annotated(anchor)
    path = Path(anchor) / "severity_classifier" / "hf"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no exported classifier BERT at {path}")
    # The layer below the top: the top layer of a classifier is specialised to its classes.
    layer = max(json.loads((path / "config.json").read_text())["num_hidden_layers"] - 1, 0)
    print(f"[eval] NOTE: {PIPELINE_CHECK_NOTE}")
    return str(path), layer if scorer.layer is None else scorer.layer, PIPELINE_CHECK_NOTE


def eval_examples(data: DataSection, split: str, limit: int | None) -> list[dict[str, Any]]:
    """The ``split`` examples of ``data`` (first ``limit``), with their gold severity if any."""
    from sevjax.data import load_examples, split_examples

    rows = split_examples(load_examples(data.path, columns=data.columns))[split]
    if not rows:
        raise ValueError(f"data {data.path or 'embedded set'} has no {split!r} examples")
    return rows[:limit] if limit is not None else rows


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    data: DataSection,
    generation: GenerationSection,
    scorer: ScorerSection,
    scorer_path: str | Path,
    layer: int,
    out_dir: str | Path,
    name: str,
    eos_ids: Sequence[int] = (),
    note: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generates, scores and writes ``generations.jsonl`` + ``summary.json`` under ``out_dir``.

    Returns:
        ``(summary, records)``: the summary (also printed as a table) and per-example records.
    """
    from sevjax.lm_data import format_example

    kw = dict(template=data.template, chat_template=data.chat_template)
    prompts = [format_example(tokenizer, x["complaint"], x["response"], **kw)[0] for x in examples]
    hf = model.config.to_hf_config()
    positions = hf.get("n_positions") or hf.get("max_position_embeddings")
    gens = generate_texts(
        model, tokenizer, prompts, generation, max_positions=positions, eos_ids=eos_ids
    )
    scores = metrics.score_all(
        gens,
        [ex["response"] for ex in examples],
        model_path=scorer_path,
        layer=layer,
        idf=scorer.idf,
        batch_size=scorer.batch_size,
        baseline_path=scorer.baseline_path,
    )
    rows = [
        dict(id=ex.get("id"), complaint=ex["complaint"], reference=ex["response"], generation=g,
             severity=metrics.severity_of(ex), scores=sc)
        for ex, g, sc in zip(examples, gens, scores)
    ]  # fmt: skip
    summary = {
        "model": name,
        "n": len(rows),
        "scorer": {**dataclasses.asdict(scorer), "model_path": str(scorer_path), "layer": layer},
        "note": note,
        "generation": dataclasses.asdict(generation),
        **metrics.summarize(rows),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"\n[eval] {name} ({len(rows)} examples) -> {out}\n{format_table(summary)}")
    if note:
        print(f"NOTE: {note}")
    return summary, rows


def _dtype(cfg: EvalConfig | CompareConfig) -> Any:
    import jax.numpy as jnp

    return jnp.bfloat16 if cfg.generation.dtype == "bfloat16" else jnp.float32


def _train_config_of(run: Path) -> TrainConfig | None:
    """The resolved TrainConfig of a train run dir (``config.json`` + ``hf/``), else None."""
    path = run / "config.json"
    if not (path.is_file() and (run / "hf" / "config.json").is_file()):
        return None
    d = json.loads(path.read_text(encoding="utf-8"))
    return from_dict(TrainConfig, d) if "loss" in d and "model" in d else None


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluates ``cfg.run`` (train run dir, HF causal-LM dir or Hub id); see the module doc.

    A train run dir uses its own data section (source, template, chat template) and its
    ``hf/`` export; anything else uses ``cfg.data``.
    """
    from transformers import AutoTokenizer

    from sevjax.models import load_pretrained

    if cfg.run is None:
        raise ValueError("evaluate needs a model: --run DIR (train run, HF dir or Hub id)")
    run = Path(cfg.run)
    train_cfg = _train_config_of(run)
    source = run / "hf" if train_cfg is not None else cfg.run
    data = train_cfg.data if train_cfg is not None else cfg.data
    default = run / "eval" if train_cfg is not None else Path("runs/eval") / run.name
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default
    scorer_path, layer, note = resolve_scorer(cfg.scorer, run if train_cfg else out_dir)
    model, _ = load_pretrained(str(source), dtype=_dtype(cfg))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return evaluate_model(
        model,
        tokenizer,
        eval_examples(data, cfg.split, cfg.max_examples),
        data=data,
        generation=cfg.generation,
        scorer=cfg.scorer,
        scorer_path=scorer_path,
        layer=layer,
        out_dir=out_dir,
        name=run.name if train_cfg is not None else str(cfg.run),
        eos_ids=_eos_ids(tokenizer, source if Path(source).exists() else None),
        note=note,
    )[0]


# ------------------------------------------------------------------------------------- compare


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Trains and evaluates no-FT / CE / severity rows per model; writes the report files.

    Each model's runs live in ``<out_dir>/<name>/{ce,severity}`` (rerunning resumes them) and
    every row's evaluation in ``<out_dir>/<name>/<row>/eval``. On the embedded data the set is
    annotated once by the tiny classifier under ``out_dir`` and every run trains on that file,
    so the classifier is trained once and also serves as the default (pipeline-check) scorer.

    Returns:
        The report dict written to ``compare.json``.
    """
    from transformers import AutoTokenizer

    from sevjax import train
    from sevjax.models import load_pretrained

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer_path, layer, note = resolve_scorer(cfg.scorer, out)
    results: dict[str, dict[str, Any]] = {}
    for m in cfg.models:
        rows: dict[str, Any] = {}
        train_cfgs = {}
        yaml, sets = m.train_config or cfg.train_config, [*cfg.train_overrides, *m.overrides]
        sets += [f"model.name_or_path={m.name_or_path}"] if m.name_or_path else []
        if load(TrainConfig, yaml, sets).data.path is None:  # annotate the embedded set once
            from sevjax.classify import ensure_annotated

            sets.append(f"data.path={ensure_annotated(out)}")
        for mode in ("ce", "severity"):
            own = [f"run_dir={out / m.name / mode}", f"seed={cfg.seed}", f"steps={cfg.steps}"]
            train_cfgs[mode] = load(TrainConfig, yaml, [*sets, *own, f"loss.mode={mode}"])
            print(f"\n[compare] {m.name} / {mode}: training {cfg.steps} steps")
            train.run(train_cfgs[mode])
        ce_cfg = train_cfgs["ce"]
        data = ce_cfg.data
        examples = eval_examples(data, cfg.split, cfg.max_examples)
        ce_dir = out / m.name / "ce" / "hf"
        tokenizer = AutoTokenizer.from_pretrained(str(ce_dir))
        kw = dict(data=data, generation=cfg.generation, scorer=cfg.scorer, note=note)
        kw.update(scorer_path=scorer_path, layer=layer, eos_ids=_eos_ids(tokenizer, ce_dir))
        for row in ROWS:
            if row == "none":  # the starting point of both runs: same checkpoint / same init
                model, _ = train.build_model(ce_cfg, tokenizer, None)
            else:
                model, _ = load_pretrained(str(out / m.name / row / "hf"), dtype=_dtype(cfg))
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


def main(argv: Sequence[str] | None = None) -> int:
    """``evaluate --run DIR`` or ``compare --config YAML``, each with repeated ``--set k=v``."""
    parser = argparse.ArgumentParser(description="sevjax evaluation")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("evaluate", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--config", default=None, help="YAML overlay on the defaults")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "evaluate":
            p.add_argument("--run", default=None, help="train run dir, HF model dir or Hub id")
    args = parser.parse_args(argv)
    try:
        if args.command == "evaluate":
            sets = args.overrides + ([f"run={args.run}"] if args.run else [])
            cfg = load(EvalConfig, args.config, sets)
        else:
            cfg = load(CompareConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.command == "evaluate":
        evaluate(cfg)
    else:
        compare(cfg)
    return 0
