"""Evaluation metrics: chrF / BLEU, an emergency-referral proxy, paired bootstrap, summaries.

BERTScore lives in :mod:`sevjax.bertscore` (identical to the ``bert-score`` package);
:func:`score_all` combines it with the scores here into one record per example, and
:func:`summarize` / :func:`paired_differences` aggregate those records overall and per severity.

Typical use::

    scores = score_all(gens, refs, model_path="models/bert-base-multilingual-cased", layer=9)
    summary = summarize([dict(generation=g, reference=r, severity=s, scores=sc) for ...])
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sevjax.bertscore import bertscore as _bertscore
from sevjax.loss import SEVERITIES

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


def mean_ci(values: Sequence[float | None], *, alpha: float = 0.05) -> dict[str, Any]:
    """Mean and two-sided ``1 - alpha`` Student-t interval of the non-missing ``values``.

    Used over seeds (a handful of independent runs), where a t-interval is the honest choice.

    Returns:
        ``{"mean", "lo", "hi", "n"}``; ``lo``/``hi`` are None with fewer than two values and
        ``mean`` is None with none.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], np.float64)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    if x.size == 1:
        return {"mean": float(x[0]), "lo": None, "hi": None, "n": 1}
    half = float(stats.t.ppf(1 - alpha / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    m = float(x.mean())
    return {"mean": m, "lo": m - half, "hi": m + half, "n": int(x.size)}


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
    batch_size: int = 64,
    baseline_path: str | Path | None = None,
) -> list[dict[str, float]]:
    """Every per-example score (:data:`SCORE_KEYS`) of N candidate / reference pairs.

    BERTScore P/R/F1 from :func:`sevjax.bertscore.bertscore` (the keyword arguments are its
    own), sentence chrF and BLEU (0-100) and the emergency referral of the candidate (0/1).

    Returns:
        N dicts keyed by :data:`SCORE_KEYS`, Python floats.
    """
    bs = _bertscore(
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
