"""Metrics: BERTScore against a NumPy reference on torch hidden states, lexicon, bootstrap."""

import math

import numpy as np
import pytest
import torch
import transformers

from sevjax import metrics

SENTENCES = [
    "أشعر بألم شديد في الصدر منذ ساعة",
    "ألم في الصدر مع ضيق في التنفس",
    "the patient has a high fever and a cough",
    "حرارة مرتفعة وسعال منذ يومين",
    "اذهب إلى الطوارئ فوراً",
    "راجع الطبيب إذا استمر الألم",
    "a mild headache after a long day",
    "صداع خفيف بعد يوم طويل",
]
CANDS = [
    "ألم شديد في الصدر",
    "the patient has a cough",
    "حرارة مرتفعة منذ يومين وسعال",
    "اذهب إلى المستشفى",
    "صداع خفيف",
    "",  # an empty generation scores 0
]
REFS = [
    "أشعر بألم شديد في الصدر منذ ساعة",
    "the patient has a high fever and a cough",
    "حرارة مرتفعة وسعال منذ يومين",
    "اذهب إلى الطوارئ فوراً",
    "a mild headache after a long day",
    "راجع الطبيب إذا استمر الألم",
]
LAYER = 1
TOL = 1e-4


def make_tiny_bert(out, texts, *, hidden=32, layers=2):
    """Saves a tiny random BertModel and a WordPiece tokenizer trained on ``texts`` to ``out``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(
        vocab_size=160, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.decoder = decoders.WordPiece()
    fast = transformers.BertTokenizerFast(
        tokenizer_object=tok, do_lower_case=False, strip_accents=False, tokenize_chinese_chars=True
    )
    fast.save_pretrained(str(out))
    cfg = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A tiny random BertModel + WordPiece tokenizer trained on SENTENCES."""
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), SENTENCES)


def _torch_embeddings(path, texts, layer):
    """Per text: (unit vectors [L, D], content mask [L], ids [L]) from transformers' BertModel."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.BertModel.from_pretrained(str(path)).eval()
    out = []
    for t in texts:
        enc = tok(t, return_special_tokens_mask=True, return_tensors="pt")
        special = enc.pop("special_tokens_mask")[0].numpy()
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[layer][0].double().numpy()
        h = h / np.linalg.norm(h, axis=-1, keepdims=True)
        out.append((h, special == 0, enc["input_ids"][0].numpy()))
    return out


def _numpy_bertscore(path, cands, refs, layer, idf):
    """The BERTScore formula in NumPy, one pair at a time, no padding."""
    ce, re_ = _torch_embeddings(path, cands, layer), _torch_embeddings(path, refs, layer)
    m = len(refs)
    df = {}
    for _, _, ids in re_:
        for w in set(ids.tolist()):
            df[w] = df.get(w, 0) + 1

    def weights(ids, ok):
        if not idf:
            return ok.astype(np.float64)
        return np.array([math.log((m + 1) / (df.get(int(w), 0) + 1)) for w in ids]) * ok

    p, r = [], []
    for (hc, okc, idc), (hr, okr, idr) in zip(ce, re_):
        hc, hr = hc[okc], hr[okr]
        wc, wr = weights(idc, okc)[okc], weights(idr, okr)[okr]
        if len(hc) == 0 or len(hr) == 0:
            p.append(0.0), r.append(0.0)
            continue
        sim = hc @ hr.T
        p.append(float((sim.max(1) * wc).sum() / wc.sum()))
        r.append(float((sim.max(0) * wr).sum() / wr.sum()))
    p, r = np.array(p), np.array(r)
    f = np.where((p > 0) & (r > 0), 2 * p * r / np.maximum(p + r, 1e-30), 0.0)
    return p, r, f


@pytest.fixture(scope="module")
def plain(scorer_dir):
    return metrics.bertscore(CANDS, REFS, model_path=scorer_dir, layer=LAYER, batch_size=4)


@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_matches_numpy_reference(scorer_dir, plain, idf):
    got = (
        metrics.bertscore(CANDS, REFS, model_path=scorer_dir, layer=LAYER, idf=True, batch_size=4)
        if idf
        else plain
    )
    p, r, f = _numpy_bertscore(scorer_dir, CANDS, REFS, LAYER, idf)
    np.testing.assert_allclose(got["precision"], p, atol=TOL)
    np.testing.assert_allclose(got["recall"], r, atol=TOL)
    np.testing.assert_allclose(got["f1"], f, atol=TOL)
    assert all(isinstance(x, float) for x in got["f1"])
    assert got["f1"][-1] == 0.0  # the empty candidate


def test_idf_changes_scores(scorer_dir, plain):
    weighted = metrics.bertscore(CANDS, REFS, model_path=scorer_dir, layer=LAYER, idf=True)
    assert np.max(np.abs(np.subtract(weighted["f1"], plain["f1"]))) > 1e-3


def test_self_match_is_one(scorer_dir):
    s = metrics.bertscore(SENTENCES, SENTENCES, model_path=scorer_dir, layer=2, batch_size=3)
    for k in ("precision", "recall", "f1"):
        np.testing.assert_allclose(s[k], 1.0, atol=1e-5)


def test_swap_swaps_precision_and_recall(scorer_dir, plain):
    swapped = metrics.bertscore(REFS, CANDS, model_path=scorer_dir, layer=LAYER, batch_size=4)
    np.testing.assert_allclose(swapped["precision"], plain["recall"], atol=1e-6)
    np.testing.assert_allclose(swapped["recall"], plain["precision"], atol=1e-6)
    np.testing.assert_allclose(swapped["f1"], plain["f1"], atol=1e-6)


def test_batch_size_and_order_do_not_matter(scorer_dir, plain):
    one = metrics.bertscore(CANDS, REFS, model_path=scorer_dir, layer=LAYER, batch_size=32)
    np.testing.assert_allclose(one["f1"], plain["f1"], atol=1e-5)


def test_baseline_rescaling(scorer_dir, plain, tmp_path):
    path = tmp_path / "baseline.tsv"
    path.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.5,0.4,0.3\n2,0.9,0.9,0.9\n")
    assert metrics.read_baseline(path, 1) == (0.5, 0.4, 0.3)
    got = metrics.bertscore(
        CANDS, REFS, model_path=scorer_dir, layer=LAYER, batch_size=4, baseline_path=path
    )
    for key, b in (("precision", 0.5), ("recall", 0.4), ("f1", 0.3)):
        np.testing.assert_allclose(got[key], (np.array(plain[key]) - b) / (1 - b), atol=1e-6)
    with pytest.raises(ValueError, match="no row for layer 5"):
        metrics.read_baseline(path, 5)


def test_bertscore_input_errors(scorer_dir):
    with pytest.raises(ValueError, match="layer must be in 0..2"):
        metrics.bertscore(["a"], ["a"], model_path=scorer_dir, layer=3)
    with pytest.raises(ValueError, match="1 candidates but 2 references"):
        metrics.bertscore(["a"], ["a", "b"], model_path=scorer_dir, layer=1)


def test_chrf_and_bleu():
    c = metrics.chrf(["ألم في الصدر", "abc"], ["ألم في الصدر", "xyz"])
    assert c["sentence"][0] == pytest.approx(100.0) and c["sentence"][1] < 10
    b = metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert b["corpus"] == pytest.approx(100.0) and b["sentence"] == [pytest.approx(100.0)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("اذهب إلى الطوارئ فوراً", True),
        ("اتصلي بالإسعاف الآن", True),
        ("توجه إلى أقرب مستشفى على الفور", True),
        ("اتصل بالرقم 997 حالاً", True),
        ("لا داعي للقلق، لكن راجع قسم الطوارئ", True),
        ("Call an ambulance or go to the emergency room.", True),
        ("لا داعي للذهاب إلى الطوارئ", False),
        ("ليست حالة طارئة ولا تحتاج إلى الإسعاف", False),
        ("تعلم الإسعافات الأولية مفيد", False),
        ("مستوى السكر 123 ملغ", False),
        ("راجع المستشفى بعد الانتظار", False),  # no urgency word ("الانتظار" is not "الآن")
        ("خذ قسطاً من الراحة واشرب السوائل", False),
        ("You have a mild fever; rest at home.", False),
    ],
)
def test_refers_to_emergency(text, expected):
    assert metrics.refers_to_emergency(text) is expected


def test_bootstrap_contains_truth_and_is_deterministic():
    rng = np.random.default_rng(1)
    a = rng.normal(0.6, 0.1, 400)
    b = a + 0.05 + rng.normal(0, 0.05, 400)
    mean, lo, hi = metrics.paired_bootstrap_ci(a, b, n_resamples=2000, seed=3)
    assert lo < 0.05 < hi and lo < mean < hi
    assert mean == pytest.approx(float(np.mean(b - a)))
    assert metrics.paired_bootstrap_ci(a, b, n_resamples=2000, seed=3) == (mean, lo, hi)
    assert metrics.paired_bootstrap_ci(a, b, n_resamples=2000, seed=4) != (mean, lo, hi)
    # Pairing matters: the paired interval is much narrower than the spread of a alone.
    assert hi - lo < 0.05
    with pytest.raises(ValueError, match="equal non-empty"):
        metrics.paired_bootstrap_ci(a, b[:-1])
