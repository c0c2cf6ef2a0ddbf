"""A tiny annotated data set and the overrides of a tiny LM run, shared by the LM tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sevjax import data as data_lib
from sevjax import tokenizer


def _short(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def make_annotated(root: Path) -> tuple[Path, Path]:
    """A small annotated JSONL (random severity probabilities) and a 300-token BPE for it."""
    splits = data_lib.split_examples(data_lib.load_examples())
    rng = np.random.default_rng(0)
    rows = []
    for ex in splits["train"][:48] + splits["validation"][:16]:
        p = rng.dirichlet([1.0, 1.0, 1.0])
        rows.append(
            {
                "id": ex["id"],
                "complaint": _short(ex["complaint"], 4),
                "response": _short(ex["response"], 8),
                "split": ex["split"],
                "severity": ex["severity"],
                **dict(zip(("p_mild", "p_moderate", "p_critical"), map(float, p / p.sum()))),
            }
        )
    path = root / "annotated.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    texts = [r["complaint"] for r in rows] + [r["response"] for r in rows]
    tokenizer.train_bpe_tokenizer(texts, 300, root / "tokenizer")
    return path, root / "tokenizer"


TINY_LM = [  # the tiny LM and the quiet, single-device run every LM test uses
    "model.layers=2",
    "model.width=32",
    "model.heads=2",
    "model.vocab_size=300",
    "model.max_positions=64",
    "data.buckets=[64]",
    "data.batch_size=8",
    "eval.batch_size=8",
    "log.tensorboard=false",
    "log.plot=false",
    "log.progress=false",
    "checkpoint.every=2",
    "mesh.data=1",
]


def overrides(fixture_data, run_dir, *extra):
    path, tok = fixture_data
    return [
        f"run_dir={run_dir}",
        f"data.path={path}",
        f"model.tokenizer={tok}",
        *TINY_LM,
        "eval.every=100",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "log.every=1",
        "export_hf=false",
        "steps=6",
        *extra,
    ]
