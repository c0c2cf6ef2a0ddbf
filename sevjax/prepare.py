"""Preparing an LM run's inputs (the tokenize stage): splits, tokenizer, weights, encoded sets.

:func:`prepare` is stage 2 of :mod:`sevjax.pipeline`: the train / validation examples (which
must carry severity probabilities for the severity-weighted loss), the tokenizer (pretrained, or
a byte-level BPE trained on the training texts and written to ``<run_dir>/tokenizer``), the
per-example weights ``sum_k p_k * class_weight_k`` (:func:`sevjax.loss.severity_weights`), and
the examples encoded by :func:`sevjax.lm_data.encode_examples` with the truncation policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sevjax import data as data_lib
from sevjax import loss as sevloss
from sevjax.distributed import is_main
from sevjax.lm_data import Encoded, encode_examples
from sevjax.schema import TrainConfig
from sevjax.tokenizer import train_bpe_tokenizer


def _probs_of(examples: list[dict[str, Any]]) -> np.ndarray | None:
    if not has_probabilities(examples):
        return None
    rows = [[ex[k] for k in data_lib.PROB_FIELDS] for ex in examples]
    return sevloss.validate_severity_probs(np.array(rows))


def _severity_of(examples: list[dict[str, Any]], probs: np.ndarray | None) -> np.ndarray:
    """Class index per example: gold ``severity`` when every example has one, else argmax(p)."""
    if all(ex.get("severity") in sevloss.SEVERITIES for ex in examples):
        return np.array([sevloss.SEVERITIES.index(ex["severity"]) for ex in examples], np.int32)
    if probs is not None:
        return probs.argmax(axis=1).astype(np.int32)
    return np.full(len(examples), -1, np.int32)


def has_probabilities(examples: list[dict[str, Any]]) -> bool:
    """Whether every example carries p_mild, p_moderate and p_critical."""
    fields = data_lib.PROB_FIELDS
    return bool(examples) and all(ex.get(k) is not None for ex in examples for k in fields)


def training_splits(cfg: TrainConfig, examples: list[dict[str, Any]]) -> dict[str, list]:
    """Train / validation examples (``data.max_*_examples`` applied).

    Raises:
        ValueError: the severity-weighted loss is asked for but the examples have no severity
            probabilities (the message says how to annotate them), or a split is empty.
    """
    if cfg.loss.mode == "severity" and not has_probabilities(examples):
        source = cfg.data.path or "the embedded data set"
        raise ValueError(
            f"{source} has no severity probabilities (p_mild, p_moderate, p_critical). "
            "Annotate it with the severity classifier first:\n"
            "  python classify.py train\n"
            f"  python classify.py annotate --set data.path={cfg.data.path} "
            "--set output=annotated.jsonl\n"
            "then train with --set data.path=annotated.jsonl (or use --set loss.mode=ce)"
        )
    splits = data_lib.split_examples(examples)
    out = {"train": splits["train"], "validation": splits["validation"]}
    for name, limit in (
        ("train", cfg.data.max_train_examples),
        ("validation", cfg.data.max_eval_examples),
    ):
        if not out[name]:
            raise ValueError(f"{cfg.data.path or 'the data'} has no {name!r} split (field 'split')")
        out[name] = out[name][:limit] if limit is not None else out[name]
    return out


def load_tokenizer(cfg: TrainConfig, run_dir: Path, train_examples: list[dict[str, Any]]) -> Any:
    """The pretrained tokenizer, ``<run_dir>/tokenizer`` (a resumed run), or (random init) a new
    BPE trained on the training texts, not yet saved (:func:`prepare` saves it).

    Raises:
        FileNotFoundError: the configured tokenizer is a path that does not exist.
        ValueError: the configured tokenizer cannot be loaded (the message names the key and
            path) or has no eos token.
    """
    if cfg.model.tokenizer is not None or cfg.model.name_or_path is not None:
        from transformers import AutoTokenizer

        key = "model.tokenizer" if cfg.model.tokenizer is not None else "model.name_or_path"
        source = cfg.model.tokenizer or cfg.model.name_or_path
        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
            raise FileNotFoundError(f"{key}={source}: no such directory")
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as e:  # transformers raises many types (KeyError for a bad JSON file)
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            raise ValueError(
                f"{key}={source}: could not load a tokenizer from it ({type(e).__name__}: "
                f"{reason}); expected an HF model or tokenizer directory, or a Hub id"
            ) from e
        if tok.eos_token_id is None:
            raise ValueError(f"{key}={source}: the tokenizer has no eos token; the loss needs one")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    texts = [cfg.data.template.format(complaint=ex["complaint"]) for ex in train_examples]
    texts += [ex["response"] for ex in train_examples]
    # deterministic, so every process trains the same one; only process 0 writes it (prepare)
    tok = train_bpe_tokenizer(texts, cfg.model.vocab_size)
    print(f"[data] trained a {len(tok)}-token byte-level BPE tokenizer -> {tok_dir}")
    return tok


def check_batch_sizes(cfg: TrainConfig, rows: int) -> None:
    """Raises ``ValueError`` unless the train and eval batch sizes divide over ``rows`` devices
    (``data x fsdp`` of the mesh): checked before anything is tokenized or written."""
    sizes = {"data.batch_size": cfg.data.batch_size, "eval.batch_size": cfg.eval.batch_size}
    for key, size in sizes.items():
        if size % rows:
            raise ValueError(f"{key}={size} must divide over data x fsdp = {rows} devices")


def example_weights(cfg: TrainConfig, train: list, probs: np.ndarray | None) -> np.ndarray:
    """Per-example severity weights (all ones for ``loss.mode=ce``)."""
    if cfg.loss.mode == "ce":
        return np.ones(len(train), np.float32)
    freq = probs.sum(axis=0) if cfg.loss.weighting == "balanced" else None
    cw = sevloss.class_weights(cfg.loss.weighting, class_frequencies=freq)
    print(
        f"[loss] severity class weights {dict(zip(sevloss.SEVERITIES, np.round(cw, 3).tolist()))}"
    )
    return np.asarray(sevloss.severity_weights(probs, cw), np.float32)


def encode(cfg: TrainConfig, splits: dict, tokenizer: Any) -> dict[str, Encoded]:
    """Tokenized train and validation sets."""
    out = {}
    for name, examples in splits.items():
        probs = _probs_of(examples)
        weights = example_weights(cfg, examples, probs) if name == "train" else None
        out[name] = encode_examples(
            examples,
            tokenizer,
            weights if weights is not None else np.ones(len(examples), np.float32),
            _severity_of(examples, probs),
            template=cfg.data.template,
            chat_template=cfg.data.chat_template,
            max_length=max(cfg.data.buckets),
            min_prompt=cfg.data.min_prompt_tokens,
            long_responses=cfg.data.long_responses,
            name=name,
        )
    return out


def prepare(
    cfg: TrainConfig, run_dir: Path, examples: list[dict[str, Any]]
) -> tuple[Any, dict[str, Encoded]]:
    """The tokenize stage: ``(tokenizer, {"train": Encoded, "validation": Encoded})``.

    Writes ``<run_dir>/tokenizer`` when it trains a tokenizer (random-init models only), after
    the train and validation sets encoded.
    """
    splits = training_splits(cfg, examples)
    tok_dir = Path(run_dir) / "tokenizer"
    trains = cfg.model.tokenizer is None and cfg.model.name_or_path is None
    trains = trains and not (tok_dir / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(cfg, run_dir, splits["train"])
    data = encode(cfg, splits, tokenizer)
    if trains and is_main():  # written once the data is known to encode
        tokenizer.save_pretrained(str(tok_dir))
    return tokenizer, data
