"""Evaluation metrics: BERTScore in JAX, chrF / BLEU, an emergency-referral proxy, paired bootstrap.

BERTScore (Zhang et al., 2020) runs on our Flax BERT loaded from any local HF BERT checkpoint
directory (``sevjax.models.load_pretrained``), with the tokenizer from the same directory. Token
embeddings are ``hidden_states[layer]`` (``0`` = embedding output, ``i`` = output of layer ``i``),
L2-normalized; every candidate token is greedily matched to its most similar reference token
(precision) and vice versa (recall). ``layer`` is required: the ``bert-score`` package's default
for Arabic (``lang="ar"``) is ``bert-base-multilingual-cased`` with ``layer=9``; AraBERT has no
official default layer.

Differences from the ``bert-score`` package, on purpose: the special tokens the tokenizer adds
([CLS], [SEP]) and padding are excluded from the matching itself, not only given weight 0 (so a
content token can never be matched to [SEP]); a pair whose weights sum to zero (an empty text,
or with ``idf=True`` a text made only of tokens found in every reference) scores 0 instead of NaN;
and F1 is 0 unless P > 0 and R > 0 (bert-score's ``2PR / (P + R)`` explodes when P + R is near 0,
which only happens with embedding spaces where cosines go negative, e.g. a tiny classifier).
IDF follows ``bert-score``: ``idf(w) = log((M + 1) / (df(w) + 1))`` over the M references, for
candidate and reference tokens alike, special tokens weight 0. Baseline files use ``bert-score``'s
``rescale_baseline`` format, so its published files work unchanged (see :func:`read_baseline`).

Typical use::

    s = bertscore(gens, refs, model_path="models/bert-base-multilingual-cased", layer=9)
    s["f1"]  # list of N floats
"""

from __future__ import annotations

import csv
import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sevjax.loss import SEVERITIES

# Padded lengths of the scorer's inputs; one compile per length used (capped at the model's max).
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)

_SCORERS: dict[str, _Scorer] = {}


class _Scorer:
    """A loaded BERT (split into graphdef/state) and its tokenizer; cached per path."""

    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        from sevjax.models import load_pretrained

        model, config = load_pretrained(model_path)
        if not hasattr(model, "hidden_states"):
            raise ValueError(
                f"{model_path}: BERTScore needs a BERT encoder checkpoint (model_type 'bert'), "
                f"got {type(model).__name__}"
            )
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.num_layers = config.num_hidden_layers
        limit = getattr(self.tokenizer, "model_max_length", None) or config.max_position_embeddings
        self.max_length = int(min(config.max_position_embeddings, limit))

    def tokenize(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: ``(ids [L] int32, content [L] bool)`` (content = not an added special)."""
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
        )
        return [
            (np.asarray(ids, np.int32), np.asarray(special, np.int32) == 0)
            for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"])
        ]


def _scorer(model_path: str | Path) -> _Scorer:
    path = Path(model_path)
    key = str(path.resolve()) if path.exists() else str(model_path)
    if key not in _SCORERS:
        _SCORERS[key] = _Scorer(str(model_path))
    return _SCORERS[key]


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _embed(graphdef, state, ids, mask, *, layer):
    model = nnx.merge(graphdef, state)
    h = model.hidden_states(ids, mask)[layer].astype(jnp.float32)  # (B, T, D)
    return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)


@jax.jit
def _greedy_match(cand, cand_w, cand_ok, ref, ref_w, ref_ok):
    """Weighted greedy-matching P and R per row; an empty side or zero weights score 0.

    Args: cand [B, Tc, D] and ref [B, Tr, D] unit vectors; ``*_w`` [B, T] f32 weights (0 off
    content); ``*_ok`` [B, T] bool content tokens (the only ones that can be matched).
    """
    sim = jnp.einsum("bid,bjd->bij", cand, ref)  # (B, Tc, Tr)
    sim = jnp.where(cand_ok[:, :, None] & ref_ok[:, None, :], sim, -2.0)  # cosines are >= -1

    both = cand_ok.any(-1) & ref_ok.any(-1)  # (B,) an empty side leaves nothing to match

    def mean(best, w):
        total = w.sum(-1)
        ok = both & (total > 0)
        return jnp.where(ok, (best * w).sum(-1) / jnp.where(ok, total, 1.0), 0.0)

    return mean(sim.max(axis=2), cand_w), mean(sim.max(axis=1), ref_w)  # (B,), (B,)


def _bucket(n: int, cap: int) -> int:
    return min([b for b in LENGTH_BUCKETS if b >= n] + [cap])


def _pad(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], b: int, cap: int):
    """Right-pads ``(ids, content, weights)`` rows into ``[b, T]`` arrays (extra rows empty)."""
    t = _bucket(max(len(r[0]) for r in rows), cap)
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    ok, w = np.zeros((b, t), bool), np.zeros((b, t), np.float32)
    for i, (x, c, wt) in enumerate(rows):
        n = len(x)
        ids[i, :n], mask[i, :n], ok[i, :n], w[i, :n] = x, 1, c, wt
    return ids, mask, ok, w


def idf_weights(references_ids: Sequence[np.ndarray]) -> tuple[dict[int, float], float]:
    """``bert-score``'s IDF over tokenized references.

    Args:
        references_ids: M arrays of token ids (special tokens may be included; callers zero them).

    Returns:
        ``(idf, default)``: ``idf[w] = log((M + 1) / (df(w) + 1))`` for every token id seen, and
        ``default = log(M + 1)`` for unseen ids.
    """
    m = len(references_ids)
    df = Counter(int(w) for ids in references_ids for w in set(ids.tolist()))
    return {w: math.log((m + 1) / (c + 1)) for w, c in df.items()}, math.log(m + 1)


def read_baseline(path: str | Path, layer: int) -> tuple[float, float, float]:
    """Reads ``(b_P, b_R, b_F)`` for ``layer`` from a ``bert-score`` rescale-baseline file.

    Format: comma-separated text with a header ``LAYER,P,R,F`` (case-insensitive) and one row
    per layer (``0`` = embeddings), e.g. ``bert_score/rescale_baseline/ar/
    bert-base-multilingual-cased.tsv`` from the ``bert-score`` repository. Rescaled scores are
    ``(s - b) / (1 - b)`` per P / R / F.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a bad header, or no row for ``layer``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BERTScore baseline file {path} not found")
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    header = [h.strip().upper() for h in rows[0]] if rows else []
    if not {"LAYER", "P", "R", "F"} <= set(header):
        raise ValueError(f"{path}: header must hold LAYER,P,R,F; got {rows[0] if rows else None}")
    col = {h: header.index(h) for h in ("LAYER", "P", "R", "F")}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            values = [float(row[col[k]]) for k in ("LAYER", "P", "R", "F")]
        except (ValueError, IndexError):
            raise ValueError(f"{path} line {line}: expected 4 numbers, got {row}") from None
        if values[0] == layer:
            return values[1], values[2], values[3]
    raise ValueError(f"{path}: no row for layer {layer}")


def bertscore(
    candidates: Sequence[str],
    references: Sequence[str],
    *,
    model_path: str | Path,
    layer: int,
    idf: bool = False,
    batch_size: int = 32,
    baseline_path: str | Path | None = None,
) -> dict[str, list[float]]:
    """BERTScore precision, recall and F1 of each candidate against its reference.

    Args:
        candidates: N generated texts.
        references: N reference texts.
        model_path: local HF BERT checkpoint directory (or Hub id) with its tokenizer; loaded
            once per process and cached.
        layer: which ``hidden_states`` entry to use, ``0..num_hidden_layers`` (required; the
            ``bert-score`` default for Arabic is ``bert-base-multilingual-cased`` layer 9).
        idf: weight tokens by IDF over ``references`` instead of uniformly.
        batch_size: pairs per batch (the last batch is padded, so each length compiles once).
        baseline_path: optional ``bert-score`` baseline file; scores become ``(s - b) / (1 - b)``.

    Returns:
        ``{"precision": [N], "recall": [N], "f1": [N]}`` Python floats.

    Raises:
        ValueError: different lengths, a bad ``layer`` or ``batch_size``, or a non-BERT model.
    """
    from tqdm.auto import tqdm

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scorer = _scorer(model_path)
    if not 0 <= layer <= scorer.num_layers:
        raise ValueError(f"layer must be in 0..{scorer.num_layers} for {model_path}, got {layer}")
    baseline = read_baseline(baseline_path, layer) if baseline_path is not None else None
    n = len(candidates)
    if n == 0:
        return {"precision": [], "recall": [], "f1": []}
    cands, refs = scorer.tokenize(candidates), scorer.tokenize(references)
    if idf:
        table, default = idf_weights([ids for ids, _ in refs])
    else:
        table, default = {}, 1.0

    def weighted(ids: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = np.array([table.get(int(i), default) for i in ids], np.float32)
        return ids, ok, np.where(ok, w, 0.0).astype(np.float32)

    # Longest pairs first so that each batch pads little (bert-score sorts the same way).
    order = sorted(range(n), key=lambda i: -max(len(cands[i][0]), len(refs[i][0])))
    p, r = np.zeros(n), np.zeros(n)
    cap = scorer.max_length
    bar = tqdm(range(0, n, batch_size), desc="bertscore", unit="batch", leave=False)
    for start in bar:
        idx = order[start : start + batch_size]
        c_ids, c_mask, c_ok, c_w = _pad([weighted(*cands[i]) for i in idx], batch_size, cap)
        r_ids, r_mask, r_ok, r_w = _pad([weighted(*refs[i]) for i in idx], batch_size, cap)
        ec = _embed(scorer.graphdef, scorer.state, c_ids, c_mask, layer=layer)
        er = _embed(scorer.graphdef, scorer.state, r_ids, r_mask, layer=layer)
        bp, br = _greedy_match(ec, c_w, c_ok, er, r_w, r_ok)
        p[idx], r[idx] = np.asarray(bp)[: len(idx)], np.asarray(br)[: len(idx)]
    pos = (p > 0) & (r > 0)  # the harmonic mean is only defined for positive P and R
    f = np.where(pos, 2 * p * r / np.where(pos, p + r, 1.0), 0.0)
    if baseline is not None:
        p, r, f = ((s - b) / (1 - b) for s, b in zip((p, r, f), baseline))
    return {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist()}


# ---------------------------------------------------------------------------------- chrF, BLEU


def _check_pairs(candidates: Sequence[str], references: Sequence[str]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")


def _sacrebleu_scores(sentence_fn, corpus_fn, candidates, references) -> dict[str, Any]:
    _check_pairs(candidates, references)
    sentence = [float(sentence_fn(c, [r]).score) for c, r in zip(candidates, references)]
    corpus = corpus_fn(list(candidates), [list(references)]).score if candidates else 0.0
    return {"corpus": float(corpus), "sentence": sentence}


def chrf(candidates: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacrebleu chrF (character n-gram F-score, 0-100), corpus-level and per sentence.

    Returns:
        ``{"corpus": float, "sentence": [N] floats}``.
    """
    import sacrebleu

    return _sacrebleu_scores(sacrebleu.sentence_chrf, sacrebleu.corpus_chrf, candidates, references)


def bleu(candidates: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacrebleu BLEU (0-100, tokenizer ``13a``), corpus-level and smoothed per sentence.

    Returns:
        ``{"corpus": float, "sentence": [N] floats}``.
    """
    import sacrebleu

    return _sacrebleu_scores(sacrebleu.sentence_bleu, sacrebleu.corpus_bleu, candidates, references)


# ---------------------------------------------------------------------- emergency-referral proxy


def _norm(text: str) -> str:
    from sevjax.arabic import normalize

    return normalize(text).lower()


# Each group is a list of phrases (Arabic written naturally, normalized like the text).
# A referral is (a) an emergency-care term, (b) a call to an emergency number, or (c) an urgency
# word and a care place in the same sentence; (a) and (c) do not count inside a clause that
# says there is no need ("لا داعي", "ليست حالة طارئة", ...). Conditional advice ("go to the ER
# if ...") counts: this is a lexicon proxy for the share of critical cases sent to urgent care,
# not a judgement of the advice.
EMERGENCY_TERMS = (
    "طوارئ", "طوارىء", "إسعاف", "قسم الحوادث", "emergency", "ambulance", "urgent care", "er",
)  # fmt: skip
EMERGENCY_NUMBERS = ("911", "112", "997", "999", "123")
CALL_WORDS = ("اتصل", "الاتصال", "اطلب", "call", "dial")
URGENCY_WORDS = (
    "فوراً", "فوري", "فورية", "على الفور", "حالاً", "الآن", "دون تأخير", "بدون تأخير",
    "بلا تأخير", "عاجل", "عاجلة", "بشكل عاجل", "بأسرع وقت", "مباشرة", "immediately", "right away", "at once",
    "urgently", "without delay", "now",
)  # fmt: skip
CARE_PLACES = ("مستشفى", "مستشفيات", "hospital")
NO_NEED = (
    "لا داعي", "لا حاجة", "لا تحتاج", "لا يحتاج", "لا تستدعي", "لا يستدعي", "لا يستلزم",
    "ليست حالة طارئة", "ليس حالة طارئة", "ليست طارئة", "غير طارئ", "دون الحاجة", "بدون الحاجة",
    "no need", "not need", "not an emergency", "don't need", "does not require",
)  # fmt: skip
_SENTENCE = re.compile(r"[.!?؟؛;\n]+")
_CLAUSE = re.compile(r"[,،]|\bلكن\b|\bولكن\b|\bbut\b")


def _phrases(words: Sequence[str], *, whole: bool) -> str:
    """Regex alternation of normalized phrases; English (and ``whole``) ones as whole words.

    Arabic terms match inside words on purpose (clitics: للطوارئ، بالإسعاف); "إسعاف" not when
    followed by "ات" ("إسعافات أولية" is first aid). ``whole`` Arabic words may take a و/ف prefix.
    """
    out = []
    for w in words:
        e = re.escape(_norm(w))
        if w.isascii():
            out.append(rf"\b{e}\b")
        elif whole:
            out.append(rf"(?<!\w)[وف]?{e}(?!\w)")
        else:
            out.append(e + ("(?!ات)" if "سعاف" in w else ""))
    return "|".join(out)


@functools.cache
def _lexicon() -> dict[str, re.Pattern]:
    numbers = "|".join(EMERGENCY_NUMBERS)
    return {
        "terms": re.compile(_phrases(EMERGENCY_TERMS, whole=False)),
        "number": re.compile(
            f"(?:{_phrases(CALL_WORDS, whole=False)})\\D{{0,25}}(?<!\\d)(?:{numbers})(?!\\d)"
        ),
        "urgent": re.compile(_phrases(URGENCY_WORDS, whole=True)),
        "place": re.compile(_phrases(CARE_PLACES, whole=False)),
        "no_need": re.compile(_phrases(NO_NEED, whole=False)),
    }


def refers_to_emergency(text: str) -> bool:
    """Whether ``text`` sends the reader to emergency / urgent care (a documented lexicon proxy).

    The text is normalized with :func:`sevjax.arabic.normalize` (hamza forms, diacritics,
    tatweel) and lower-cased. It counts as a referral when a sentence holds an emergency-care
    term (:data:`EMERGENCY_TERMS`: طوارئ, إسعاف but not إسعافات, قسم الحوادث, emergency, ...)
    outside a "no need" clause (:data:`NO_NEED`), a call to an emergency number (997, 123, 911,
    ...), or an urgency word (:data:`URGENCY_WORDS`: فوراً, على الفور, الآن, ...) together with a
    hospital (:data:`CARE_PLACES`) outside a "no need" clause.

    Args:
        text: one generation (Arabic or English).

    Returns:
        True for a referral.
    """
    lex = _lexicon()
    for sentence in _SENTENCE.split(f" {_norm(text)} "):
        sentence = f" {sentence} "
        if lex["number"].search(sentence):
            return True
        clauses = [c for c in _CLAUSE.split(sentence) if not lex["no_need"].search(c)]
        if any(lex["terms"].search(f" {c} ") for c in clauses):
            return True
        kept = " ".join(clauses)
        if lex["urgent"].search(kept) and lex["place"].search(kept):
            return True
    return False


# ---------------------------------------------------------------------------- paired bootstrap


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Paired percentile bootstrap of ``mean(b - a)`` over examples.

    Each resample draws N example indices with replacement (the same indices for ``a`` and
    ``b``, keeping the pairing) and takes the mean difference; the interval is the
    ``alpha / 2`` and ``1 - alpha / 2`` quantiles of those means.

    Args:
        a: [N] per-example scores of the baseline system.
        b: [N] per-example scores of the compared system (same examples, same order).
        n_resamples: bootstrap resamples.
        seed: NumPy ``default_rng`` seed (same seed, same interval).
        alpha: 1 - confidence level.

    Returns:
        ``(mean_diff, lo, hi)`` Python floats; ``mean_diff`` is the observed ``mean(b - a)``.

    Raises:
        ValueError: empty or unequal inputs, non-finite values, or bad ``alpha`` / ``n_resamples``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"a and b must be equal non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a and b must be finite")
    if not 0.0 < alpha < 1.0 or n_resamples < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_resamples >= 1, got {alpha}, {n_resamples}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2**22 // d.size)  # bounded memory for large N
    for s in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - s)
        means[s : s + k] = d[rng.integers(0, d.size, (k, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(d.mean()), float(lo), float(hi)


# ------------------------------------------------------------- per-example scores and summaries

SCORE_KEYS = ("bertscore_p", "bertscore_r", "bertscore_f1", "chrf", "bleu", "emergency_referral")


def score_all(
    candidates: Sequence[str],
    references: Sequence[str],
    *,
    model_path: str | Path,
    layer: int,
    idf: bool = False,
    batch_size: int = 32,
    baseline_path: str | Path | None = None,
) -> list[dict[str, float]]:
    """Every per-example score (:data:`SCORE_KEYS`): BERTScore P/R/F1 (see :func:`bertscore`),
    sentence chrF and BLEU (0-100) and the emergency referral of the candidate (0/1).
    """
    bs = bertscore(
        candidates,
        references,
        model_path=model_path,
        layer=layer,
        idf=idf,
        batch_size=batch_size,
        baseline_path=baseline_path,
    )
    ch, bl = chrf(candidates, references)["sentence"], bleu(candidates, references)["sentence"]
    return [
        dict(zip(SCORE_KEYS, (p, r, f, c, b, float(refers_to_emergency(g)))))
        for p, r, f, c, b, g in zip(bs["precision"], bs["recall"], bs["f1"], ch, bl, candidates)
    ]


def severity_of(example: dict[str, Any]) -> str | None:
    """Gold ``severity`` when present, else the argmax of ``p_mild/p_moderate/p_critical``."""
    if example.get("severity") in SEVERITIES:
        return example["severity"]
    probs = [example.get(f"p_{s}") for s in SEVERITIES]
    return SEVERITIES[int(np.argmax(probs))] if all(p is not None for p in probs) else None


def _group(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {"n": 0}
    gens, refs = [r["generation"] for r in records], [r["reference"] for r in records]
    out: dict[str, Any] = {"n": len(records)}
    out.update({k: float(np.mean([r["scores"][k] for r in records])) for k in SCORE_KEYS})
    out["chrf_sentence"] = out.pop("chrf")
    out["bleu_sentence"] = out.pop("bleu")
    out["chrf"], out["bleu"] = chrf(gens, refs)["corpus"], bleu(gens, refs)["corpus"]
    out["reference_emergency_referral"] = float(np.mean([refers_to_emergency(x) for x in refs]))
    return out


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-severity means of the per-example scores, plus corpus chrF / BLEU.

    Args:
        records: dicts with ``generation``, ``reference``, ``severity`` (or None) and
            ``scores`` (the :data:`SCORE_KEYS`).

    Returns:
        ``{"overall": group, "by_severity": {"mild": group, ...}}``; a group holds ``n``, the
        mean of each score (``chrf_sentence`` / ``bleu_sentence`` for the sentence-level ones),
        corpus ``chrf`` / ``bleu`` and ``reference_emergency_referral`` (the rate on the
        references, for scale); an empty group is ``{"n": 0}``.
    """
    by = {s: _group([r for r in records if r["severity"] == s]) for s in SEVERITIES}
    return {"overall": _group(records), "by_severity": by}


def paired_differences(
    a: Sequence[dict[str, Any]],
    b: Sequence[dict[str, Any]],
    keys: Sequence[str],
    **bootstrap: Any,
) -> dict[str, dict[str, dict[str, float]]]:
    """Paired-bootstrap CIs of ``b - a`` per score key, overall and per severity.

    Args:
        a, b: records (as for :func:`summarize`) of two systems on the same examples, in the
            same order (checked through ``id``).
        keys: score keys, e.g. ``("bertscore_f1", "chrf")``.
        **bootstrap: ``n_resamples``, ``seed``, ``alpha`` for :func:`paired_bootstrap_ci`.

    Returns:
        ``{key: {subset: {"diff", "lo", "hi", "n"}}}``; subsets without examples are left out.
    """
    if [r.get("id") for r in a] != [r.get("id") for r in b]:
        raise ValueError("paired_differences: the two record lists cover different examples")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key in keys:
        out[key] = {}
        for subset in ("overall", *SEVERITIES):
            pick = [i for i, r in enumerate(a) if subset in ("overall", r["severity"])]
            if pick:
                d, lo, hi = paired_bootstrap_ci(
                    [a[i]["scores"][key] for i in pick],
                    [b[i]["scores"][key] for i in pick],
                    **bootstrap,
                )
                out[key][subset] = {"diff": d, "lo": lo, "hi": hi, "n": len(pick)}
    return out
