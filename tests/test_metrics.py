"""Metrics: chrF / BLEU, the emergency-referral lexicon, the paired bootstrap.

BERTScore is tested in tests/test_bertscore.py.
"""

import numpy as np
import pytest

from sevjax import metrics


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
