"""BERTScore in JAX on our Flax BERT, computing what the ``bert-score`` package (0.3.13) computes.

:func:`bertscore` gives the numbers of ``bert_score.score(cands, refs, model_type=model_path,
num_layers=layer, idf=idf, batch_size=batch_size)`` (and with ``baseline_path``, of
``rescale_with_baseline=True, baseline_path=...``), to float32 rounding. Step by step, as the
package does it (``bert_score/utils.py``):

1. Tokens: each text is stripped; an empty one becomes ``[CLS] [SEP]``, any other is encoded
   with its special tokens and truncated to ``tokenizer.model_max_length`` (``sent_encode``).
2. Embeddings: ``hidden_states[layer]`` of the model (``0`` = embedding output, ``i`` = output
   of layer ``i``, what bert-score gets by keeping ``num_layers`` layers), L2-normalized.
3. Greedy matching over the full similarity matrix, [CLS] and [SEP] included, padding
   excluded: each candidate token takes its best cosine over the reference tokens (P), each
   reference token its best over the candidate tokens (R). One quirk is kept: bert-score
   multiplies padded similarities by 0 instead of masking them, so when the other text is
   shorter than the longest one on its side among the ``batch_size`` consecutive pairs of its
   batch, a token's best cosine is ``max(best, 0)``. Pretrained BERT embeddings are
   anisotropic (token cosines typically well above 0), so this should not move their scores;
   on tiny random models it does.
4. Weights: without IDF, 1 for every token but [CLS] and [SEP] (0). With ``idf=True``,
   ``log((M + 1) / (df + 1))`` over the M references' token sets ([CLS] / [SEP] get 0 since
   every reference holds them), ``log(M + 1)`` for tokens no reference has. P and R are the
   weighted means of the best cosines.
5. ``F = 2PR / (P + R)``, with NaN set to 0 (an empty side or weights summing to 0).
   A candidate or reference of exactly 2 tokens (``[CLS] [SEP]``, an empty text) then gets
   ``P = R = 0``, with a warning. A non-empty text whose IDF weights are all 0 (every token is
   in every reference, e.g. every reference when M = 1) keeps bert-score's NaN P or R, also
   with a warning.
6. Baseline rescaling: ``(s - b) / (1 - b)`` on each of P, R and F with ``(b_P, b_R, b_F)`` of
   ``layer`` from a bert-score ``rescale_baseline`` file (:func:`read_baseline`).

Where bert-score would fail or silently do something else, this module differs: it raises
for a missing baseline file (bert-score warns and skips rescaling) and for a baseline file
whose data row ``layer`` is not labelled ``layer`` (bert-score reads the row by position); it
truncates to ``max_position_embeddings`` a text that the tokenizer does not cap (bert-score
crashes in the model). Multiple references per candidate (bert-score's lists of lists, scored
as the best over them) are not supported.

Typical use::

    s = bertscore(gens, refs, model_path="models/bert-base-multilingual-cased", layer=9)
    s["f1"]  # list of N floats
"""

from __future__ import annotations

import csv
import functools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Padded lengths of the scorer's inputs; one compile per (layer, batch_size, length) used.
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)

_SCORERS: dict[str, _Scorer] = {}


class _Scorer:
    """A loaded BERT (split into graphdef/state) and its tokenizer; cached per path."""

    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        from sevjax.hf import load_pretrained

        model, config = load_pretrained(model_path)
        if not hasattr(model, "hidden_states"):
            raise ValueError(
                f"{model_path}: BERTScore needs a BERT encoder checkpoint (model_type 'bert'), "
                f"got {type(model).__name__}"
            )
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        # bert-score's default (use_fast_tokenizer=False); transformers 5 has one kind only.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
        self.cls_id, self.sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if self.cls_id is None or self.sep_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no [CLS] / [SEP] token")
        self.num_layers = config.num_hidden_layers
        limit = getattr(self.tokenizer, "model_max_length", None) or config.max_position_embeddings
        self.max_length = int(min(config.max_position_embeddings, limit))

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """bert-score's ``sent_encode`` per text: ``[L] int32`` ids, specials included."""
        stripped = [t.strip() for t in texts]
        todo = [t for t in stripped if t]
        kw = dict(add_special_tokens=True, max_length=self.max_length, truncation=True)
        encoded = iter(self.tokenizer(todo, **kw)["input_ids"] if todo else [])
        empty = np.array([self.cls_id, self.sep_id], np.int32)
        return [np.asarray(next(encoded), np.int32) if t else empty for t in stripped]


def _scorer(model_path: str | Path) -> _Scorer:
    path = Path(model_path)
    key = str(path.resolve()) if path.exists() else str(model_path)
    if key not in _SCORERS:
        _SCORERS[key] = _Scorer(str(model_path))
    return _SCORERS[key]


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _score_batch(graphdef, state, cand, ref, *, layer):
    """Greedy-matching P and R of B padded pairs (float32; NaN where a side's weights sum to 0).

    Args:
        cand, ref: dicts of ``ids`` [B, T] int32, ``len`` [B] int32 (tokens, specials included),
            ``w`` [B, T] f32 weights (0 past ``len``) and ``floor`` [B] f32 (0 where bert-score's
            batch pads this text, else -inf; it bounds the other side's best cosines).
    """
    model = nnx.merge(graphdef, state)
    b, t = cand["ids"].shape
    pos = jnp.arange(t)
    c_ok = pos[None, :] < cand["len"][:, None]  # (B, T)
    r_ok = pos[None, :] < ref["len"][:, None]  # (B, T)
    ids = jnp.concatenate([cand["ids"], ref["ids"]])  # (2B, T)
    mask = jnp.concatenate([c_ok, r_ok]).astype(jnp.int32)  # (2B, T)
    h = model.hidden_states(ids, mask)[layer].astype(jnp.float32)  # (2B, T, D)
    h = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
    sim = jnp.einsum("bid,bjd->bij", h[:b], h[b:])  # (B, T, T) candidate x reference
    sim = jnp.where(c_ok[:, :, None] & r_ok[:, None, :], sim, -jnp.inf)
    best_c = jnp.maximum(sim.max(axis=2), ref["floor"][:, None])  # (B, T)
    best_r = jnp.maximum(sim.max(axis=1), cand["floor"][:, None])  # (B, T)
    p = jnp.where(c_ok, best_c * cand["w"], 0.0).sum(-1) / cand["w"].sum(-1)  # (B,)
    r = jnp.where(r_ok, best_r * ref["w"], 0.0).sum(-1) / ref["w"].sum(-1)  # (B,)
    return p, r


def _bucket(n: int, cap: int) -> int:
    return min([b for b in LENGTH_BUCKETS if b >= n] + [cap])


def _pad(ids: list[np.ndarray], w: list[np.ndarray], floor: np.ndarray, b: int, t: int) -> dict:
    """Right-pads one side of a batch into the ``[b, T]`` arrays :func:`_score_batch` takes."""
    out = dict(
        ids=np.zeros((b, t), np.int32),
        len=np.zeros(b, np.int32),
        w=np.zeros((b, t), np.float32),
        floor=np.full(b, -np.inf, np.float32),
    )
    for i, (x, wt) in enumerate(zip(ids, w)):
        out["ids"][i, : len(x)], out["len"][i], out["w"][i, : len(x)] = x, len(x), wt
    out["floor"][: len(floor)] = floor
    return out


def _padding_floors(lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """0 where bert-score's matching batch (consecutive pairs) pads the text, else -inf: [N]."""
    out = np.full(len(lengths), -np.inf, np.float32)
    for s in range(0, len(lengths), batch_size):
        chunk = lengths[s : s + batch_size]
        out[s : s + batch_size] = np.where(chunk < chunk.max(), 0.0, -np.inf)
    return out


def idf_weights(references_ids: Sequence[np.ndarray]) -> tuple[dict[int, float], float]:
    """bert-score's ``get_idf_dict`` over tokenized references.

    Args:
        references_ids: M arrays of token ids, special tokens included (as bert-score does, so
            [CLS] and [SEP], present in every reference, get ``log(1) = 0``).

    Returns:
        ``(idf, default)``: ``idf[w] = log((M + 1) / (df(w) + 1))`` for every token id seen, and
        ``default = log(M + 1)`` for unseen ids.
    """
    m = len(references_ids)
    df = Counter(int(w) for ids in references_ids for w in set(ids.tolist()))
    return {w: math.log((m + 1) / (c + 1)) for w, c in df.items()}, math.log(m + 1)


def read_baseline(path: str | Path, layer: int) -> tuple[float, float, float]:
    """Reads ``(b_P, b_R, b_F)`` for ``layer`` from a bert-score rescale-baseline file.

    Format (bert-score's ``rescale_baseline/<lang>/<model>.tsv``, comma-separated despite the
    name): a header ``LAYER,P,R,F`` and one row per layer from 0 (the embeddings) in order.
    bert-score reads data row number ``layer`` by position and its last three columns as P, R,
    F; this reader checks that the file is laid out so that this is the row and the columns
    the header names, and raises otherwise.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a header other than ``LAYER,P,R,F``, a bad row, or data row ``layer``
            missing or not labelled ``layer``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BERTScore baseline file {path} not found")
    rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines()) if r]
    header = [h.strip().upper() for h in rows[0]] if rows else []
    if header != ["LAYER", "P", "R", "F"]:
        raise ValueError(f"{path}: header must be LAYER,P,R,F; got {rows[0] if rows else None}")
    if not 0 <= layer < len(rows) - 1:
        raise ValueError(f"{path}: no row for layer {layer} ({len(rows) - 1} data rows)")
    row = rows[layer + 1]
    try:
        label, p, r, f = (float(x) for x in row)
    except ValueError:
        raise ValueError(f"{path} data row {layer}: expected 4 numbers, got {row}") from None
    if label != layer:
        raise ValueError(
            f"{path}: data row {layer} is labelled layer {row[0]}; bert-score reads rows by "
            "position, so the file must list layers 0, 1, 2, ... in order"
        )
    return p, r, f


def _finish(p, r, c_len, r_len, baseline) -> dict[str, list[float]]:
    """bert-score's F, empty-text zeros, warnings and rescaling, on [N] float32 P and R."""
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 2 * p * r / (p + r)  # float32, like bert-score
    f = np.where(np.isnan(f), np.float32(0), f)
    for name, empty in (("candidate", c_len == 2), ("reference", r_len == 2)):
        if empty.any():
            warnings.warn(
                f"bertscore: {int(empty.sum())} empty {name}(s) (first at index "
                f"{int(np.argmax(empty))}); their P, R and F are 0 before rescaling, as in "
                "bert-score",
                stacklevel=3,
            )
            p, r = np.where(empty, np.float32(0), p), np.where(empty, np.float32(0), r)
    if np.isnan(p).any() or np.isnan(r).any():
        warnings.warn(
            f"bertscore: {int(np.isnan(p).sum())} precision and {int(np.isnan(r).sum())} recall "
            "values are NaN (F set to 0), as in bert-score: those texts' token weights sum to 0 "
            "(with idf=True, every token occurs in every reference; with a single reference "
            "that holds for the reference itself)",
            stacklevel=3,
        )
    scores = [p.astype(np.float64), r.astype(np.float64), f.astype(np.float64)]
    if baseline is not None:
        scores = [(s - b) / (1 - b) for s, b in zip(scores, baseline)]
    return dict(zip(("precision", "recall", "f1"), (s.tolist() for s in scores)))


def bertscore(
    candidates: Sequence[str],
    references: Sequence[str],
    *,
    model_path: str | Path,
    layer: int,
    idf: bool = False,
    batch_size: int = 64,
    baseline_path: str | Path | None = None,
) -> dict[str, list[float]]:
    """BERTScore precision, recall and F1 of each candidate against its reference.

    The numbers of ``bert_score.score(candidates, references, model_type=model_path,
    num_layers=layer, idf=idf, batch_size=batch_size)``; see the module docstring.

    Args:
        candidates: N generated texts.
        references: N reference texts (one per candidate).
        model_path: local HF BERT checkpoint directory (or Hub id) with its tokenizer; loaded
            once per process and cached.
        layer: which ``hidden_states`` entry to use, ``0..num_hidden_layers`` (bert-score's
            ``num_layers``; its default for Arabic is ``bert-base-multilingual-cased`` layer 9).
        idf: weight tokens by IDF over ``references`` instead of uniformly.
        batch_size: pairs per batch, as bert-score's ``batch_size`` (default 64, like it): it
            sets memory use, and which texts count as padded in the matching quirk (module
            docstring, step 3). The last batch is padded, so each length compiles once.
        baseline_path: optional bert-score rescale-baseline file; P, R and F each become
            ``(s - b) / (1 - b)``.

    Returns:
        ``{"precision": [N], "recall": [N], "f1": [N]}`` Python floats (NaN only where
        bert-score gives NaN, see the module docstring).

    Raises:
        ValueError: different lengths, a non-string text, a bad ``layer`` or ``batch_size``,
            a non-BERT model, or a bad baseline file.
    """
    from tqdm.auto import tqdm

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not all(isinstance(t, str) for t in (*candidates, *references)):
        raise ValueError("candidates and references must be strings (one reference per pair)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scorer = _scorer(model_path)
    if not 0 <= layer <= scorer.num_layers:
        raise ValueError(f"layer must be in 0..{scorer.num_layers} for {model_path}, got {layer}")
    baseline = read_baseline(baseline_path, layer) if baseline_path is not None else None
    n = len(candidates)
    if n == 0:
        return {"precision": [], "recall": [], "f1": []}
    cands, refs = scorer.encode(candidates), scorer.encode(references)
    if idf:
        table, default = idf_weights(refs)
    else:
        table, default = {scorer.cls_id: 0.0, scorer.sep_id: 0.0}, 1.0

    def weights(ids: np.ndarray) -> np.ndarray:
        return np.array([table.get(int(i), default) for i in ids], np.float32)

    c_len = np.array([len(x) for x in cands])
    r_len = np.array([len(x) for x in refs])
    c_floor, r_floor = _padding_floors(c_len, batch_size), _padding_floors(r_len, batch_size)
    # Longest pairs first so that each batch pads little; the result does not depend on it.
    order = np.argsort(-np.maximum(c_len, r_len), kind="stable")
    p, r = np.zeros(n, np.float32), np.zeros(n, np.float32)
    bar = tqdm(range(0, n, batch_size), desc="bertscore", unit="batch", leave=False)
    for start in bar:
        idx = order[start : start + batch_size]
        t = _bucket(int(max(c_len[idx].max(), r_len[idx].max())), scorer.max_length)
        cand = _pad(
            [cands[i] for i in idx], [weights(cands[i]) for i in idx], c_floor[idx], batch_size, t
        )
        ref = _pad(
            [refs[i] for i in idx], [weights(refs[i]) for i in idx], r_floor[idx], batch_size, t
        )
        bp, br = _score_batch(scorer.graphdef, scorer.state, cand, ref, layer=layer)
        p[idx], r[idx] = np.asarray(bp)[: len(idx)], np.asarray(br)[: len(idx)]
    return _finish(p, r, c_len, r_len, baseline)
