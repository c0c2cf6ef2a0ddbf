"""BERTScore: sevjax.bertscore against the bert-score package on a tiny random BERT."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from sevjax import bertscore as bs
from sevjax.data import load_examples
from sevjax.tokenizer import train_wordpiece

TOL = 1e-4
MAX_LEN = 64  # the tiny BERT's max_position_embeddings and its tokenizer's model_max_length
KEYS = ("precision", "recall", "f1")
BASELINE = "LAYER,P,R,F\n0,0.31,0.32,0.30\n1,0.52,0.41,0.47\n2,0.83,0.79,0.80\n"


def _words(text: str, k: int) -> str:
    return " ".join(text.split()[:k])


def _pairs() -> tuple[list[str], list[str]]:
    """16 pairs from the shipped data: short and long, identical, empty and blank, truncated."""
    ex = load_examples()[:16]
    c, r = [e["complaint"] for e in ex], [e["response"] for e in ex]
    pairs = [
        (_words(c[0], 6), _words(r[0], 10)),
        ("", _words(r[1], 4)),  # empty candidate
        (_words(r[1], 12), _words(r[1], 15)),
        ("ـــ", _words(r[3], 7)),  # tatweel only: normalized to nothing, so [CLS] [SEP] too
        (_words(r[2], 20), _words(r[2], 20)),  # identical
        (f"  {_words(c[3], 3)} ", "   "),  # surrounding spaces; a blank reference
        (r[4], _words(r[4], 40)),  # both over 64 tokens: truncated
        (_words(r[5], 2), _words(r[5], 1)),
        (_words(c[6], 9), _words(r[6], 3)),
        (_words(r[7], 30), _words(r[7], 25)),
        (_words(c[8], 1), _words(r[8], 12)),
        (_words(r[9], 5), _words(r[9], 1)),
        (_words(c[10], 4), _words(r[10], 2)),
        (_words(r[11], 8), _words(r[11], 30)),
        (r[12], _words(r[12], 2)),
        (_words(c[13], 2), r[13]),
    ]
    return [a for a, _ in pairs], [b for _, b in pairs]


CANDS, REFS = _pairs()


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights, biases and LayerNorm affines (HF's zero biases and unit norms hide bugs).

    Position and token-type embeddings stay small, so cosines between tokens of different texts
    go negative and bert-score's padding quirk (sevjax.bertscore docstring, step 3) matters.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "position_embeddings" in name or "token_type_embeddings" in name:
                p.copy_(0.02 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def make_tiny_bert(out, texts, *, hidden=32, layers=2):
    """Saves a tiny random BertForMaskedLM and a WordPiece tokenizer trained on ``texts``."""
    tok = train_wordpiece(list(texts), 400)
    tok.model_max_length = MAX_LEN  # as real checkpoints (512); bert-score truncates to it
    tok.save_pretrained(str(out))
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=MAX_LEN,
    )
    torch.manual_seed(0)
    _randomize(transformers.BertForMaskedLM(cfg)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    ex = load_examples()
    texts = [e["complaint"] for e in ex] + [e["response"] for e in ex]
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), texts)


@pytest.fixture(scope="module")
def baseline_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("baseline") / "baseline.tsv"
    path.write_text(BASELINE)
    return path


@pytest.fixture(scope="module")
def reference():
    """``bert_score.score`` as a function returning float64 arrays.

    bert-score 0.3.13 encodes an empty text with ``tokenizer.build_inputs_with_special_tokens
    ([])``, which transformers 5's tokenizers no longer have; the shim adds transformers 4's BERT
    definition (``[CLS] ids [SEP]``). ``nthreads=0`` computes IDF without a process pool.
    """
    import bert_score

    module = sys.modules["bert_score.score"]
    original = module.get_tokenizer

    def get_tokenizer(*args, **kwargs):
        tok = original(*args, **kwargs)
        if not hasattr(tok, "build_inputs_with_special_tokens"):
            tok.build_inputs_with_special_tokens = lambda ids: [
                tok.cls_token_id,
                *ids,
                tok.sep_token_id,
            ]
        return tok

    def run(path, cands, refs, *, layer, idf, batch_size, baseline=None):
        out = bert_score.score(
            cands,
            refs,
            model_type=str(path),
            num_layers=layer,
            idf=idf,
            batch_size=batch_size,
            nthreads=0,
            device="cpu",
            lang="ar",
            rescale_with_baseline=baseline is not None,
            baseline_path=None if baseline is None else str(baseline),
        )
        return {k: v.numpy().astype(np.float64) for k, v in zip(KEYS, out)}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "get_tokenizer", get_tokenizer)
        yield run


def _assert_same(got, want):
    for k in KEYS:
        g = np.asarray(got[k])
        assert all(isinstance(x, float) for x in got[k])
        np.testing.assert_array_equal(np.isnan(g), np.isnan(want[k]), err_msg=k)
        ok = ~np.isnan(g)
        err = np.max(np.abs(g[ok] - want[k][ok]), initial=0.0)
        assert err <= TOL, (k, err)


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_matches_bert_score(scorer_dir, baseline_file, reference, layer, idf, batch_size):
    # Rescaling on in half the cases, with and without IDF and at both batch sizes.
    baseline = baseline_file if idf != (batch_size == 7) else None
    kw = dict(layer=layer, idf=idf, batch_size=batch_size)
    with pytest.warns(UserWarning, match="empty candidate") as record:
        got = bs.bertscore(CANDS, REFS, model_path=scorer_dir, baseline_path=baseline, **kw)
    assert any("empty reference" in str(w.message) for w in record)
    _assert_same(got, reference(scorer_dir, CANDS, REFS, baseline=baseline, **kw))


def test_padding_quirk_is_exercised(scorer_dir):
    """Batches of 7 pad short texts, whose best cosines bert-score then floors at 0: on this
    model that changes scores, so the batch-7 cases above check the emulation, not a no-op."""
    kw = dict(model_path=scorer_dir, layer=2)
    with pytest.warns(UserWarning):
        one = bs.bertscore(CANDS, REFS, batch_size=1, **kw)
        seven = bs.bertscore(CANDS, REFS, batch_size=7, **kw)
    assert np.max(np.abs(np.subtract(one["recall"], seven["recall"]))) > 1e-3


def test_tokens_like_sent_encode(scorer_dir, reference):  # reference: the shim is on
    from bert_score.utils import sent_encode

    scorer = bs._scorer(scorer_dir)
    tok = sys.modules["bert_score.score"].get_tokenizer(str(scorer_dir))  # with the shim
    texts = CANDS + REFS
    ours = scorer.encode(texts)
    assert [x.tolist() for x in ours] == [sent_encode(tok, t) for t in texts]
    empty = [scorer.cls_id, scorer.sep_id]
    assert [x.tolist() for x in scorer.encode(["", "   ", "ـــ"])] == [empty] * 3
    long = ours[6]  # a whole response
    assert len(long) == MAX_LEN and long[-1] == scorer.sep_id  # truncated, [SEP] kept


def test_empty_texts_score_zero(scorer_dir, baseline_file):
    kw = dict(model_path=scorer_dir, layer=1, batch_size=7)
    with pytest.warns(UserWarning, match="1 empty candidate"):
        got = bs.bertscore(["", "ألم"], ["ألم في الصدر", "  "], **kw)
    assert got == {k: [0.0, 0.0] for k in KEYS}
    with pytest.warns(UserWarning, match="empty"):
        got = bs.bertscore([""], ["ألم"], baseline_path=baseline_file, **kw)
    b = dict(zip(KEYS, (0.52, 0.41, 0.47)))
    for k in KEYS:
        assert got[k][0] == pytest.approx(-b[k] / (1 - b[k]))


def test_idf_with_one_reference_gives_nan_like_bert_score(scorer_dir, reference):
    """With M = 1 every reference token has IDF log(2 / 2) = 0, so R is 0 / 0."""
    cands, refs = [CANDS[0]], [REFS[0]]  # the candidate has tokens the reference lacks
    kw = dict(layer=1, idf=True, batch_size=1)
    with pytest.warns(UserWarning, match="0 precision and 1 recall values are NaN"):
        got = bs.bertscore(cands, refs, model_path=scorer_dir, **kw)
    assert np.isnan(got["recall"][0]) and got["f1"][0] == 0.0 and np.isfinite(got["precision"][0])
    _assert_same(got, reference(scorer_dir, cands, refs, **kw))


def test_self_match_is_one(scorer_dir):
    texts = [t for t in REFS if t.strip()]
    s = bs.bertscore(texts, texts, model_path=scorer_dir, layer=2, batch_size=7)
    for k in KEYS:
        np.testing.assert_allclose(s[k], 1.0, atol=1e-5)


def test_swap_swaps_precision_and_recall(scorer_dir):
    kw = dict(model_path=scorer_dir, layer=1, batch_size=7)
    with pytest.warns(UserWarning):
        a = bs.bertscore(CANDS, REFS, **kw)
        b = bs.bertscore(REFS, CANDS, **kw)
    np.testing.assert_allclose(b["precision"], a["recall"], atol=1e-6)
    np.testing.assert_allclose(b["recall"], a["precision"], atol=1e-6)
    np.testing.assert_allclose(b["f1"], a["f1"], atol=1e-6)


def test_input_errors(scorer_dir):
    kw = dict(model_path=scorer_dir)
    with pytest.raises(ValueError, match="layer must be in 0..2"):
        bs.bertscore(["a"], ["a"], layer=3, **kw)
    with pytest.raises(ValueError, match="1 candidates but 2 references"):
        bs.bertscore(["a"], ["a", "b"], layer=1, **kw)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        bs.bertscore(["a"], ["a"], layer=1, batch_size=0, **kw)
    with pytest.raises(ValueError, match="one reference per pair"):
        bs.bertscore(["a"], [["a", "b"]], layer=1, **kw)
    assert bs.bertscore([], [], layer=1, **kw) == {k: [] for k in KEYS}


def test_read_baseline(tmp_path):
    import bert_score

    # A published file reads as bert-score reads it: data row `layer`, columns P, R, F.
    published = (
        Path(bert_score.__file__).parent / "rescale_baseline/de/bert-base-multilingual-cased.tsv"
    )
    want = pd.read_csv(published).iloc[9].to_numpy()[1:]
    np.testing.assert_array_equal(bs.read_baseline(published, 9), want)

    path = tmp_path / "b.tsv"
    path.write_text(BASELINE)
    assert bs.read_baseline(path, 1) == (0.52, 0.41, 0.47)
    with pytest.raises(ValueError, match="no row for layer 3"):
        bs.read_baseline(path, 3)
    path.write_text("LAYER,P,R,F\n1,0.5,0.4,0.3\n")  # layer 0 missing: row 0 is layer 1
    with pytest.raises(ValueError, match="data row 0 is labelled layer 1"):
        bs.read_baseline(path, 0)
    path.write_text("LAYER,F,R,P\n0,0.5,0.4,0.3\n")
    with pytest.raises(ValueError, match="header must be LAYER,P,R,F"):
        bs.read_baseline(path, 0)
    with pytest.raises(FileNotFoundError):
        bs.read_baseline(tmp_path / "missing.tsv", 0)
