"""sevjax.arabic: normalization switches and the rule severity labeler."""

import numpy as np
import pytest

from sevjax.arabic import normalize, rule_matches, rule_severity

ALL_OFF = dict(
    diacritics=False, tatweel=False, alef=False, digits=False, repeats=False, whitespace=False
)


@pytest.mark.parametrize(
    "switch, text, expected",
    [
        ("diacritics", "أَلَمٌ شَدِيدٌ", "ألم شديد"),
        ("diacritics", "مُسْتَشْفَىً", "مستشفى"),
        ("tatweel", "شديــــد", "شديد"),
        ("alef", "أإآٱ", "اااا"),
        ("alef", "حمى مستشفى", "حمي مستشفي"),
        ("digits", "٣٨٫٥ و ۴۰", "38.5 و 40"),
        ("repeats", "جداااا!!!", "جدا!"),
        ("repeats", "1000 مم", "1000 مم"),  # digits and doubled letters stay
        ("whitespace", "  ألم\t\n في\u200f  الصدر ", "ألم في الصدر"),
    ],
)
def test_each_switch_alone(switch, text, expected):
    assert normalize(text, **{**ALL_OFF, switch: True}) == expected


def test_switches_off_leave_text_unchanged():
    text = "  أَلَمٌ شديــــد جداااا ٣٨ \u200f"
    assert normalize(text, **ALL_OFF) == text


def test_defaults_compose_and_are_idempotent():
    text = " أُعَانِي  مِنْ أَلَمٍ شَدِيــــدٍ جداااا منذ ٣ أيام "
    out = normalize(text)
    assert out == "اعاني من الم شديد جدا منذ 3 ايام"
    assert normalize(out) == out


def test_normalize_rejects_non_strings():
    with pytest.raises(TypeError, match="expects str"):
        normalize(None)


@pytest.mark.parametrize(
    "text, label",
    [
        ("أشعر بألم شديد في الصدر يمتد إلى الذراع الأيسر مع تعرق بارد منذ نصف ساعة", "critical"),
        ("لا أستطيع التنفس وشفتاي لونهما أزرق", "critical"),
        ("والدي فقد الوعي فجأة وسقط على الأرض", "critical"),
        ("أمي لا تستطيع الكلام ووجهها مائل إلى جهة واحدة منذ ساعة", "critical"),
        ("لدي أفكار انتحارية ولا أرى فائدة من الحياة", "critical"),
        ("ابني أصيب بتشنجات في كل جسمه استمرت خمس دقائق", "critical"),
        ("طفلي الرضيع عمره شهر وحرارته مرتفعة جدا", "critical"),
        ("جرحت يدي بسكين والنزيف لا يتوقف رغم الضغط عليه", "critical"),
        ("أعاني من حمى وسعال منذ أربعة أيام ولم تتحسن الحرارة", "moderate"),
        ("ألم في أسفل البطن مع حرقة عند التبول منذ يومين", "moderate"),
        ("عندي صداع خفيف بعد يوم طويل أمام الشاشة", "mild"),
        ("عندي قشرة في فروة الرأس وحكة بسيطة", "mild"),
        ("سيلان في الأنف وعطاس منذ يوم", "mild"),
    ],
)
def test_labeler_on_hand_picked_complaints(text, label):
    assert rule_severity(text)[0] == label, rule_matches(text)


@pytest.mark.parametrize(
    "negated, affirmed",
    [
        ("لا أعاني من ألم في الصدر", "أعاني من ألم في الصدر"),
        ("لم أفقد الوعي في أي لحظة", "فقدت الوعي لعدة دقائق"),
        ("ليس لدي ضيق في التنفس", "لدي ضيق في التنفس"),
        ("بدون نزيف غزير", "مع نزيف غزير"),
    ],
)
def test_negation_cancels_the_term(negated, affirmed):
    assert rule_severity(negated)[1] < rule_severity(affirmed)[1]
    assert rule_severity(negated)[0] == "mild"


def test_negation_is_local_to_its_clause():
    # The negation covers the chest pain only; the breathing difficulty after "لكن" counts.
    label, _ = rule_severity("لا أشعر بألم في الصدر، لكن عندي ضيق شديد في التنفس")
    assert label == "critical"
    assert "chest_pain" not in dict(rule_matches("لا أشعر بألم في الصدر"))


def test_negated_inability_is_a_finding():
    # "لا أستطيع" / "لا يتوقف" / "لا يستجيب" are symptoms, not denials.
    for text in ("لا أستطيع التنفس", "النزيف لا يتوقف", "والدي لا يستجيب عند مناداته"):
        assert rule_severity(text)[0] == "critical", text


def test_labeler_sees_through_spelling_variants():
    plain = rule_severity("الم شديد في الصدر")
    assert rule_severity("أَلَمٌ شَدِيــــدٌ فِي الصَّدْرِ") == plain


def test_labeler_score_is_deterministic_float():
    label, score = rule_severity("صداع")
    assert label == "mild" and isinstance(score, float)
    assert rule_severity("") == ("mild", 0.0)


@pytest.fixture(scope="module")
def embedded():
    from sevjax.data import load_examples

    return load_examples()


def _agreement(examples):
    from sevjax.calibration import label_metrics
    from sevjax.loss import SEVERITIES

    gold = np.array([SEVERITIES.index(ex["severity"]) for ex in examples])
    pred = np.array([SEVERITIES.index(rule_severity(ex["complaint"])[0]) for ex in examples])
    return label_metrics(gold, pred)


def test_labeler_agreement_with_gold(embedded):
    # Measured on the shipped set (DATA.md): accuracy 0.616, macro-F1 0.603 on all 648 pairs;
    # macro-F1 0.611 / 0.572 / 0.567 on train / validation / test. Majority baseline: 0.167.
    m = _agreement(embedded)
    assert m["accuracy"] >= 0.56
    assert m["macro_f1"] >= 0.55
    for split in ("train", "validation", "test"):
        sub = [ex for ex in embedded if ex["split"] == split]
        assert _agreement(sub)["macro_f1"] >= 0.5, split
