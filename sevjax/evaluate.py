"""Generation-based evaluation of one LM: prompts, greedy generation, scores, summary.

The training prompts (:func:`sevjax.lm_data.format_example`) of a test split, greedy generation
(:func:`sevjax.generate.generate`, left-padded bucketed batches), and BERTScore / chrF / BLEU /
emergency referral per example (:mod:`sevjax.metrics`); writes ``generations.jsonl`` and
``summary.json`` (overall and per severity) and prints a table. The scorer is given by the caller
(:func:`sevjax.pipeline.evaluate` resolves the default one); nothing here trains a model.

Usage::

    python train.py evaluate --run runs/tiny
    python train.py evaluate --run models/aragpt2-base --set scorer.model_path=... \\
        --set scorer.layer=9
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sevjax import metrics, models
from sevjax.config import from_dict
from sevjax.distributed import is_main
from sevjax.schema import (
    CompareConfig,
    DataSection,
    EvalConfig,
    GenerationSection,
    ScorerSection,
    TrainConfig,
)

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PIPELINE_CHECK_NOTE = (
    "BERTScore uses the tiny severity classifier's BERT (no pretrained scorer configured): "
    "a pipeline check, not comparable to the paper; set scorer.model_path to a local "
    "bert-base-multilingual-cased (scorer.layer=9) or AraBERT."
)


def eos_ids(tokenizer: Any, source: str | Path | None) -> tuple[int, ...]:
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
    positions = models.max_positions(model.config)
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
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"\n[eval] {name} ({len(rows)} examples) -> {out}\n{format_table(summary)}")
    if note:
        print(f"NOTE: {note}")
    return summary, rows


def dtype_of(cfg: EvalConfig | CompareConfig) -> Any:
    import jax.numpy as jnp

    return jnp.bfloat16 if cfg.generation.dtype == "bfloat16" else jnp.float32


def _train_config_of(run: Path) -> TrainConfig | None:
    """The resolved TrainConfig of a train run dir (its ``config.json``), else None."""
    path = run / "config.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text(encoding="utf-8"))
    return from_dict(TrainConfig, d) if "loss" in d and "model" in d else None


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """What ``evaluate --run`` points at, resolved before anything is loaded or written."""

    source: str  # an HF model directory or a Hub id
    data: DataSection  # the data (and prompt format) to evaluate on
    out_dir: Path
    name: str
    anchor: Path  # where a default (pipeline-check) scorer lives: the run dir, else out_dir


def resolve_run(cfg: EvalConfig) -> RunTarget:
    """Checks ``cfg.run`` (a train run dir, an HF causal-LM dir or a Hub id) and its outputs.

    Raises:
        FileNotFoundError: no such directory (and no Hub model of that id: its ``config.json`` is
            fetched), or a train run without ``hf/``.
    """
    if cfg.run is None:
        raise ValueError("evaluate needs a model: --run DIR (train run, HF dir or Hub id)")
    run = Path(cfg.run)
    train_cfg = _train_config_of(run)
    if train_cfg is not None:
        if not (run / "hf" / "config.json").is_file():
            raise FileNotFoundError(
                f"--run {run}: the train run has no hf/ export yet (finish it, or set export_hf=true)"
            )
        out_dir = Path(cfg.out_dir) if cfg.out_dir else run / "eval"
        return RunTarget(str(run / "hf"), train_cfg.data, out_dir, run.name, run)
    if run.is_dir() and not (run / "config.json").is_file():
        raise FileNotFoundError(
            f"--run {run}: neither a train run dir (config.json + hf/) nor an HF model dir "
            "(config.json + weights)"
        )
    if not run.exists() and not _HUB_ID.fullmatch(cfg.run):
        raise FileNotFoundError(
            f"--run {cfg.run}: no such directory (expected a train run dir, an HF model dir or "
            "a Hub id like owner/name)"
        )
    if not run.exists():  # "runs/tiny" looks like a Hub id too: its config.json must be there
        from sevjax.hf import read_config

        try:
            read_config(cfg.run)
        except FileNotFoundError as e:
            why = str(e.__cause__ or e).strip().splitlines()[0][:200]
            raise FileNotFoundError(
                f"--run {cfg.run}: no such directory, and not a model on the Hub ({why})"
            ) from None
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs/eval") / run.name
    return RunTarget(str(cfg.run), cfg.data, out_dir, str(cfg.run), out_dir)


def evaluate(
    cfg: EvalConfig, target: RunTarget, *, scorer_path: str, layer: int, note: str | None
) -> dict[str, Any]:
    """Generates for and scores ``target``'s split; see the module docstring."""
    from transformers import AutoTokenizer

    from sevjax.hf import load_pretrained

    model, _ = load_pretrained(target.source, dtype=dtype_of(cfg))
    tokenizer = AutoTokenizer.from_pretrained(target.source)
    local = Path(target.source) if Path(target.source).exists() else None
    return evaluate_model(
        model,
        tokenizer,
        eval_examples(target.data, cfg.split, cfg.max_examples),
        data=target.data,
        generation=cfg.generation,
        scorer=cfg.scorer,
        scorer_path=scorer_path,
        layer=layer,
        out_dir=target.out_dir,
        name=target.name,
        eos_ids=eos_ids(tokenizer, local),
        note=note,
    )[0]
