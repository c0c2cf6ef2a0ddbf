"""The stage order, written once: annotate -> tokenize -> fine-tune -> export -> evaluate.

Each stage takes paths and plain arguments and writes its artifacts; nothing below this module
trains a model as a side effect:

1. **annotate** (:func:`annotate_embedded`): only when the severity-weighted loss needs
   probabilities that the data lacks and the data is the embedded set: the tiny severity
   classifier is trained under ``<run_dir>/severity_classifier`` (:mod:`sevjax.classify`) with
   its fold models, and ``<run_dir>/annotated.jsonl`` gets out-of-fold probabilities for the
   training examples (:mod:`sevjax.annotate`). Any other data must be annotated by
   the user first (``classify.py annotate``), and the error says so.
2. **tokenize** (:func:`sevjax.prepare.prepare`): the tokenizer (pretrained, or a BPE trained and
   written to ``<run_dir>/tokenizer``) and the encoded train / validation sets.
3. **fine-tune** (:func:`sevjax.train.finetune`): :func:`sevjax.loop.fit` on the LM task;
   ``<run_dir>/checkpoints``, ``metrics.jsonl``, ``tb/``, ``loss_curve.png``.
4. **export** (:func:`sevjax.train.export`): ``<run_dir>/hf``, loadable by ``transformers``
   (and ``<run_dir>/adapter``, a PEFT adapter, for a LoRA run).
5. **evaluate** (:func:`evaluate`, a separate command): generations and scores under
   ``<run>/eval``.

:func:`train` is what ``python train.py`` runs. It locks ``run_dir`` for its whole life
(:class:`sevjax.rundir.RunDir`), validates every input it can before writing anything, and
``<run_dir>/config.json`` is written (by :func:`sevjax.loop.fit`) only once the inputs have loaded
and the checkpoints already in ``run_dir`` are known to fit the configuration.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from sevjax import annotate, classify, prepare
from sevjax import train as lm
from sevjax.data import load_examples
from sevjax.distributed import is_main
from sevjax.rundir import RunDir
from sevjax.schema import ClassifyConfig, EvalConfig, ScorerSection, TrainConfig
from sevjax.trainer import make_mesh


def annotate_embedded(run_dir: Path, cfg: ClassifyConfig | None = None) -> Path:
    """Stage 1: the embedded set annotated by the tiny classifier, trained here if needed.

    Args:
        run_dir: the LM run's directory; the classifier lives in ``<run_dir>/severity_classifier``
            and the annotated set is ``<run_dir>/annotated.jsonl`` (reused when it exists).
        cfg: classifier config (default: the tiny defaults); its run_dir and output are replaced.

    Returns:
        The annotated JSONL's path.
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
        classify.run(cfg)
    return annotate.annotate(cfg)


def _with_annotations(cfg: TrainConfig, examples: list[dict]) -> tuple[TrainConfig, list[dict]]:
    """Stage 1 when needed: the config and examples the fine-tune stage should use."""
    if cfg.loss.mode != "severity" or prepare.has_probabilities(examples):
        return cfg, examples
    if cfg.data.path is not None:  # the user's data: lm_data says how to annotate it
        return cfg, examples
    path = annotate_embedded(Path(cfg.run_dir))
    print(f"[data] using severity-annotated examples {path}")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path)))
    return cfg, load_examples(str(path), columns=cfg.data.columns)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """``python train.py``: annotate if needed -> tokenize -> fine-tune -> export.

    Rerunning the same command resumes from the newest checkpoint in ``run_dir``.

    Returns:
        The summary of :func:`sevjax.train.summary` (paths of every output included).
    """
    t_begin = time.time()
    main = is_main()
    with RunDir(cfg.run_dir, lock=main) as run_dir:
        examples = load_examples(cfg.data.path, columns=cfg.data.columns)
        config = lm.model_config(cfg, None) if cfg.model.name_or_path else None
        mesh = make_mesh(cfg.mesh)
        prepare.check_batch_sizes(cfg, mesh.shape["data"] * mesh.shape["fsdp"])
        cfg, examples = _with_annotations(cfg, examples)  # 1. annotate
        tokenizer, data = prepare.prepare(cfg, run_dir.path, examples)  # 2. tokenize
        config = config or lm.model_config(cfg, tokenizer)
        result = lm.finetune(cfg, config, data, mesh)  # 3. fine-tune (writes config.json)
        outputs = {
            "checkpoints": str(result.checkpoints),
            "metrics": str(run_dir.path / "metrics.jsonl"),
        }
        if cfg.log.tensorboard:
            outputs["tensorboard"] = str(run_dir.path / "tb")
        if cfg.log.plot and (run_dir.path / "loss_curve.png").exists():
            outputs["loss_curve"] = str(run_dir.path / "loss_curve.png")
        if cfg.export_hf:  # 4. export (every process takes part; process 0 writes)
            outputs.update(lm.export(result, config, tokenizer, run_dir.path))
    summary = lm.summary(cfg, result, t_begin, outputs)
    if main:
        print(f"[done] {result.steps} steps in {summary['wall_s']:.0f}s; outputs:")
        for k, v in outputs.items():
            print(f"  {k:12s} {v}")
    return summary


# ------------------------------------------------------------------------------------ evaluate


def default_scorer(anchor: Path, scorer: ScorerSection) -> tuple[str, int, str | None]:
    """``(model_path, layer, note)`` of the BERTScore model.

    With ``scorer.model_path`` set, that model. Otherwise the tiny severity classifier's exported
    BERT under ``anchor`` (trained here by :func:`annotate_embedded` if missing): a pipeline
    check whose numbers are not comparable to the paper's (``note`` says so).
    """
    from sevjax.evaluate import PIPELINE_CHECK_NOTE

    if scorer.model_path is not None:
        return scorer.model_path, int(scorer.layer), None
    annotate_embedded(anchor)
    path = Path(anchor) / "severity_classifier" / "hf"
    # The layer below the top: the top layer of a classifier is specialised to its classes.
    layer = max(json.loads((path / "config.json").read_text())["num_hidden_layers"] - 1, 0)
    print(f"[eval] NOTE: {PIPELINE_CHECK_NOTE}")
    return str(path), layer if scorer.layer is None else scorer.layer, PIPELINE_CHECK_NOTE


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """``python train.py evaluate --run DIR``: stage 5 on a train run dir, HF dir or Hub id."""
    from sevjax import evaluate as ev

    target = ev.resolve_run(cfg)  # validates --run before anything is trained or written
    scorer_path, layer, note = default_scorer(target.anchor, cfg.scorer)
    return ev.evaluate(cfg, target, scorer_path=scorer_path, layer=layer, note=note)
