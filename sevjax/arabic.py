"""Arabic text normalization and a rule-based severity labeler for medical complaints.

:func:`normalize` is the one normalization used everywhere (the labeler, the classifier's
tokenizer, duplicate checks). :func:`rule_severity` scores a complaint with a weighted lexicon of
red flags and symptoms, written from clinical triage knowledge (chest pain, breathing
difficulty, loss of consciousness, heavy bleeding, stroke signs, suicidal thoughts, seizures,
fever in an infant, ...), and maps the score to mild / moderate / critical.

Typical use::

    normalize("أُعَانِي مِنْ أَلَمٍ شَدِيــــدٍ")  # -> "اعاني من الم شديد"
    rule_severity("ألم شديد في الصدر يمتد إلى الذراع")  # -> ("critical", 6.0)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Harakat, tanween, shadda, sukun, superscript alef and Quranic marks.
_DIACRITICS = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed]")
_TATWEEL = "\u0640"
_ALEF = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي"})
_DIGITS = str.maketrans(
    {**{chr(0x0660 + i): str(i) for i in range(10)}, **{chr(0x06F0 + i): str(i) for i in range(10)}}
    | {"\u066b": ".", "\u066c": ","}  # Arabic decimal and thousands separators
)
# A non-digit character repeated 3+ times is elongation ("جداااا", "!!!"); Arabic spelling
# never triples a letter, and digits are left alone ("1000").
_REPEATS = re.compile(r"([^\d\s])\1{2,}")
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_SPACES = re.compile(r"\s+")


def normalize(
    text: str,
    *,
    diacritics: bool = True,
    tatweel: bool = True,
    alef: bool = True,
    digits: bool = True,
    repeats: bool = True,
    whitespace: bool = True,
) -> str:
    """Normalizes Arabic text for matching and tokenization.

    Args:
        text: input string.
        diacritics: remove harakat, tanween, shadda, sukun and superscript alef.
        tatweel: remove the elongation character U+0640.
        alef: unify أ إ آ ٱ to bare alef ا, and alef maqsura ى to ي (the usual spelling
            variation in informal Arabic; ta marbuta and hamza on waw/ya are kept).
        digits: map Arabic-Indic and Eastern Arabic-Indic digits (and the Arabic decimal
            separator) to ASCII.
        repeats: collapse a non-digit character repeated three or more times to one.
        whitespace: drop zero-width and bidi control characters, collapse whitespace runs to one
            space and strip the ends.

    Returns:
        The normalized string.

    Raises:
        TypeError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize expects str, got {type(text).__name__}")
    if diacritics:
        text = _DIACRITICS.sub("", text)
    if tatweel:
        text = text.replace(_TATWEEL, "")
    if alef:
        text = text.translate(_ALEF)
    if digits:
        text = text.translate(_DIGITS)
    if repeats:
        text = _REPEATS.sub(r"\1", text)
    if whitespace:
        text = _SPACES.sub(" ", _INVISIBLE.sub("", text)).strip()
    return text


def tokenizer_normalizer():
    """:func:`normalize` as a ``tokenizers`` normalizer, built from the same tables.

    Exported tokenizers (the classifier's WordPiece) carry it, so they work on raw text. It does
    every default step of :func:`normalize` except collapsing repeated characters, which a
    ``tokenizers`` regex cannot express (no backreferences).

    Returns:
        A ``tokenizers.normalizers.Sequence``.
    """
    from tokenizers import Regex, normalizers

    steps = [normalizers.Replace(Regex(_DIACRITICS.pattern), ""), normalizers.Replace(_TATWEEL, "")]
    for table in (_ALEF, _DIGITS):
        steps += [normalizers.Replace(chr(k), v) for k, v in sorted(table.items())]
    steps += [
        normalizers.Replace(Regex(_INVISIBLE.pattern), ""),
        normalizers.Replace(Regex(_SPACES.pattern), " "),
        normalizers.Strip(),
    ]
    return normalizers.Sequence(steps)


# ----------------------------------------------------------------------------------------------
# Rule labeler
# ----------------------------------------------------------------------------------------------

# Score thresholds: a single red flag (weight 4) is critical; a moderate finding (2), or a
# symptom plus an aggravating feature, is moderate.
CRITICAL_AT = 4.0
MODERATE_AT = 2.0
# A negation cue cancels a term starting at most this many tokens after it, in the same clause.
NEGATION_WINDOW = 5

_CLITICS = ("وبال", "فبال", "وال", "فال", "بال", "كال", "ولل", "فلل", "لل", "ال", "و", "ف", "ب", "ل", "ك")  # fmt: skip
_SUFFIXES = ("", "ي", "ه", "ها", "ك", "نا", "هم", "هما", "ان", "ين", "ات", "ا")
_NEGATIONS = {"لا", "لم", "لن", "ليس", "ليست", "لست", "لسنا", "ما", "بدون", "دون", "بلا", "عدم", "ينفي", "تنفي", "نفي"}  # fmt: skip
# After a negation cue these words turn it into a finding, not a denial: "لا أستطيع التنفس",
# "لا يتوقف النزيف", "لم يعد يستجيب", "ما زال", "عدم القدرة على ...".
_NOT_NEGATING = {
    "استطيع", "يستطيع", "تستطيع", "نستطيع", "اقدر", "يقدر", "تقدر", "يمكنني", "يمكنه", "يمكنها",
    "اتمكن", "يتمكن", "تتمكن", "اعد", "يعد", "تعد", "يتوقف", "تتوقف", "يتحسن", "تتحسن", "يخف",
    "تخف", "يزول", "تزول", "يهدا", "تهدا", "يستجيب", "تستجيب", "ينقطع", "زال", "زالت", "زلت",
    "يزال", "تزال", "القدرة", "قدرة", "انتظام", "يرضع", "ترضع", "يتبول", "تتبول", "يفيق", "تفيق",
}  # fmt: skip
# NegEx-style post-negation: "X طبيعي" (X is normal) denies X.
_POST_NEGATIONS = {"طبيعي", "طبيعية", "طبيعيه", "طبيعيا", "سليم", "سليمة", "سليما"}
_POST_WINDOW = 2
_CONTRAST = {"لكن", "ولكن", "لكنني", "لكنه", "لكنها", "بل", "الا", "سوي", "بينما"}
_TOKEN = re.compile(r"\d+(?:[.,]\d+)?|\w+|[^\w\s]")
_BOUNDARY = set(".!?؟؛،,:;")


@dataclass(frozen=True)
class _Concept:
    """A lexicon entry: every slot must match a token, the matches within ``window`` tokens.

    A slot is ``(exact_forms, prefixes)``, compiled from stems: ``"word*"`` matches any token
    starting with ``word`` (after clitic stripping), ``"word="`` only the word itself, and
    ``"word"`` the word with an optional pronoun/plural suffix. ``window=None`` lets the slots
    match anywhere in the text (e.g. "infant" and "fever" in different sentences).
    """

    name: str
    weight: float
    slots: tuple[tuple[frozenset[str], tuple[str, ...]], ...]
    window: int | None = 5


def _compile_slot(stems: str) -> tuple[frozenset[str], tuple[str, ...]]:
    exact, prefixes = set(), []
    for stem in normalize(stems).split():
        if stem.endswith("ة*"):  # ta marbuta becomes ta/ha before a suffix: حرارة -> حرارته
            prefixes += [stem[:-1], stem[:-2] + "ت", stem[:-2] + "ه"]
        elif stem.endswith("*"):
            prefixes.append(stem[:-1])
        elif stem.endswith("="):
            exact.add(stem[:-1])
        else:
            exact |= {stem + s for s in _SUFFIXES}
            if stem.endswith("ة"):  # ta marbuta becomes ta before a suffix: معدة -> معدتي
                exact |= {stem[:-1] + "ت" + s for s in _SUFFIXES if s}
    return frozenset(exact), tuple(prefixes)


def _c(name: str, weight: float, *slots: str, window: int | None = 5) -> _Concept:
    return _Concept(name, weight, tuple(_compile_slot(s) for s in slots), window)


_PAIN = "الم الام وجع اوجاع يؤلم* تؤلم* يوجع* توجع* اتالم* يتالم* مؤلم*"
_BREATH = "تنفس* التنفس النفس= نفس= انفاس* يتنفس* تتنفس* اتنفس*"
_FEVER = "حمي حراره* حرارة* سخونة* سخونه*"
_VOMIT = "قيء قيئ* تقيؤ* تقيا* استفراغ* يتقيا* تتقيا* اتقيا* يستفرغ* تستفرغ*"
_BLOOD = "دم دماء دموي* دما"
_REDUCED = "قلت قل* توقف* توقفت انعدام* اقل قليل* ضعيف* ضعف* تراجع*"
_SWELL = "تورم* انتفاخ* منتفخ* متورم* تتورم* يتورم* انتفخ*"
_EYE = "عين* العين عيني عيون* نظر* النظر رؤي* الرؤية بصر* البصر"
_SIDE = "نصف* جانب* جهة* الجهة الايمن اليمين الايسر اليسار اليسري اليمني"

# fmt: off
# Weighted lexicon, from clinical triage red flags (NICE/ESI style), not fitted to the data.
CONCEPTS: tuple[_Concept, ...] = (
    # --- red flags and their strong modifiers -------------------------------------------------
    _c("chest_pain", 3, _PAIN + " ضغط ثقل عصر* ضيق", "صدر صدري"),
    _c("pain_radiating", 2, "ينتشر* يمتد* تنتشر* تمتد* ينتقل*", "ذراع* فك* الفك كتف* ظهر"),
    _c("sweating", 1, "تعرق* عرق يتعرق* تتعرق*", window=None),
    _c("breathing_difficulty", 3, "ضيق صعوبة صعوبه اختناق* لهاث* انقطاع", _BREATH),
    _c("panting", 2, "الهث* يلهث* تلهث* لهاث*"),
    _c("rapid_breathing", 2, _BREATH, "بسرعة سريع*", window=3),
    _c("wheeze", 1, "صفير*"),
    _c("oxygen", 1, "الاكسجين اكسجين* تشبع*"),
    _c("choking", 4, "اختناق* يختنق* تختنق* اختنق* غرق* يغرق* الغرق"),
    _c("cyanosis", 4, "ازرقاق* ازرق* زرق*", "شفت* شفاه* الشفتين وجه* الوجه اطراف* اظافر* لون* لونه لونها لسان*", window=4),
    _c("loss_of_consciousness", 4, "فقد* فقدان فقدت غاب* غياب", "وعي* الوعي"),
    _c("fainting", 4, "اغماء* اغمي* مغمي* غشي* غيبوبة* غيبوبه*"),
    _c("drowsy", 2, "نعسان* نعس* نعاس* خامل* خمول*"),
    _c("heavy_bleeding", 4, "نزيف* نزف*", "غزير* شديد* حاد* كثيف* كبير* كثير*"),
    _c("bleeding", 2, "نزيف* نزف* ينزف* تنزف*"),
    _c("vomiting_blood", 4, _VOMIT, _BLOOD, window=4),
    _c("bilious_vomiting", 3, _VOMIT, "اخضر* خضراء", window=5),
    _c("coughing_blood", 3, "سعال* كحة كحه يسعل* اسعل* تسعل* ابصق* يبصق* بصق*", _BLOOD, window=4),
    _c("black_stool", 3, "براز* خروج*", "اسود* سوداء* قطراني*", window=3),
    _c("blood_in_urine_or_stool", 2, "بول* البول بولي براز* البراز تبرز*", _BLOOD, window=4),
    _c("dark_urine", 2, "بول* البول بولي", "داكن* كولا اسود*", window=4),
    _c("stroke_weakness", 4, "ضعف* ضعيف* خدر* تنميل* شلل* ثقل", _SIDE, window=6),
    _c("facial_droop", 4, "ميلان* ميل* مائل* تدلي* متدلي* ارتخاء* اعوجاج* انحراف*", "فم* وجه* الفم الوجه فمي فمه"),
    _c("speech_difficulty", 4, "صعوبة صعوبه تلعثم* ثقل تداخل* تعثر*", "كلام* الكلام نطق* النطق تكلم*"),
    _c("paralysis", 4, "شلل* مشلول*"),
    _c("confusion", 3, "ارتباك* هذيان* تخليط* يهذي* تهذي* مرتبك*"),
    _c("sudden_vision_loss", 4, "فقد* فقدان فقدت اختف* اختفت", _EYE, window=3),
    _c("visual_curtain", 3, "ستار* ستارة* ظل*", _EYE),
    _c("double_vision", 3, "صورتين ازدواج* مزدوج*"),
    _c("eye_injury", 2, "ضرب* اصاب* اصابة* طار* دخل* ارتطم*", "عين* عيني عينه عينها", window=4),
    _c("hallucinated_voices", 3, "اسمع* تسمع* يسمع*", "اصوات* اصواتا صوت* صوتا يامرني* تامرني*", window=3),
    _c("suicidal", 5, "انتحار* انتحر* الانتحار"),
    _c("self_harm", 5, "ايذاء* اؤذي* اذيت* اذي", "نفسي= نفسها= نفسه="),
    _c("wish_to_die", 5, "اريد ارغب افكر* تراودني* اتمني تمنيت", "اموت الموت", window=3),
    _c("end_life", 5, "انهاء* انهي* اضع", "حياتي= حياتها= حياته= لحياتي لحياته", window=3),
    _c("overdose", 4, "جرعة* جرعه*", "زائدة* زائده* كبيرة* كبيره*", window=2),
    _c("empty_packs", 4, "شريط* شريطان* علبة* علب*", "فارغ* فارغة* فارغان*", window=4),
    _c("ingestion", 3, "ابتلع* بلع* يبلع* تبلع* ابلع* مفقود*", "بطاري* البطارية حبة* حبات* حبوب* مبيد* منظف* كلور* كاز* بنزين*", window=None),
    _c("poisoning", 4, "تسمم* سموم* مسموم*"),
    _c("seizure", 3, "تشنج* اختلاج* صرع*"),
    _c("seizure_active", 2, "تشنج* اختلاج* صرع* نوبة* نوبه*", "دقائق دقيقة* يرتعش* ترتعش* ارتعاش* رعشة* جسم* جسده* جسمه* الزبد رغوة* عينيه عيناه", window=6),
    _c("muscle_cramp", -3, "تشنج* شد=", "عضل* عضلي* ساق* الساق قدم* ربلة* بطة* رقبة* الرقبة ظهر", window=3),
    _c("infant_fever", 4, "رضيع* مولود* الوليد الرضاعة", _FEVER, window=None),
    _c("neck_stiffness", 4, "تيبس* تصلب* صلابة*", "رقبة* الرقبة رقبه* فك* فكي"),
    _c("nonblanching_rash", 4, "طفح* بقع* نقاط* نقط*", "يختف* تختف* بنفسجي* ارجواني*"),
    _c("airway_swelling", 4, _SWELL, "لسان* اللسان لساني حلق* الحلق شفاه* شفت* الشفتين"),
    _c("anaphylaxis", 3, "تحسسي* حساسية* حساسيه* ادرينالين* ابينفرين*", "تنفس* بلع* صفير* تورم* دوخة* حلق* الحلق"),
    _c("head_injury", 2, "ضربة* ضربه* ضرب* ارتطام* ارتطم* اصطدام* سقط* سقوط* وقع* اصابة* اصابه*", "راس* الراس راسي راسه"),
    _c("trauma", 2, "حادث* سقوط* سقط* سقطت"),
    _c("fracture", 2, "كسر* مكسور*"),
    _c("open_fracture", 4, "عظم* العظم", "بارز* ظاهر* خارج* يخرج*", "جلد* الجلد جرح* الجرح", window=5),
    _c("severe_burn", 4, "حرق* حروق* احترق* محروق* مغلي*", "واسع* كبير* كبيرة* شديد* عميق* الثالثة كامل* كلها فقاعات* ابيض*"),
    _c("worst_headache", 4, "اسوا اشد", "صداع*", window=3),
    _c("thunderclap", 2, "صداع*", "مفاجئ* فجاة فجاه كالصاعقة", window=4),
    _c("hypoglycemia", 3, "هبوط* انخفاض*", "سكر* السكر", window=4),
    _c("dka", 3, "كيتون* حماض*"),
    _c("priapism", 4, "انتصاب*", "مؤلم* ساعات مستمر*"),
    _c("reduced_fetal_movement", 3, "حركة* حركات* حركه*", "جنين* الجنين", _REDUCED),
    _c("pregnancy_bleeding", 2, "حامل* حمل* الحمل", "نزيف* نزف* دم", window=None),
    _c("testicular_torsion", 3, "خصية* خصيه* الخصية", _PAIN + " تورم*"),
    _c("rigid_abdomen", 3, "بطن* البطن", "متصلب* صلب* متخشب*", window=3),
    _c("dehydration", 2, "جفاف* الجفاف", "شديد* علامات طفل* طفلي رضيع*"),
    # --- moderate findings --------------------------------------------------------------------
    _c("high_fever", 1, "39 39.5 39.8 40 40.5 41", _FEVER + " درجة* درجه*", window=5),
    _c("fever", 1, _FEVER),
    _c("vomiting", 1, _VOMIT),
    _c("diarrhea", 1, "اسهال* الاسهال"),
    _c("abdominal_pain", 1, _PAIN + " مغص*", "بطن* البطن معدة* معده* المعدة بطني"),
    _c("kidney_stone", 2, "حصوة* حصي* حصوات*"),
    _c("flank_pain", 1, _PAIN + " مغص*", "خاصرة* الخاصرة جنب* كلي* الكلي كلية*"),
    _c("urinary_burning", 1, "حرقة* حرقان* حرقه*", "بول* البول تبول* التبول"),
    _c("palpitations", 2, "خفقان* تسارع* تسرع* اضطراب*", "قلب* القلب نبض* ضربات* خفقان*"),
    _c("blood_pressure_high", 2, "ضغط* الضغط", "مرتفع* ارتفاع* عالي* 160 170 180 190 200"),
    _c("leg_swelling", 2, _SWELL, "ساق* الساق ربلة* سمانة* السمانة قدم* القدم رجل* الرجل كاحل*"),
    _c("weight_loss", 2, "فقدان* نقص* نزول* خسارة* فقدت خسرت", "وزن* الوزن وزني كيلو*"),
    _c("lump", 2, "كتلة* كتله* ورم* اورام* عقدة* عقده*"),
    _c("jaundice", 2, "اصفرار* يرقان* صفار* صفراو*"),
    _c("blurred_vision", 2, "تشوش* مشوش* ضبابية* ضباب* زغللة* غباش*", _EYE),
    _c("eye_pain", 1, _PAIN + " احمرار* حمراء", "عين* العين عيني عيون*"),
    _c("dizziness", 1, "دوخة* دوخه* دوار* الدوار"),
    _c("pus", 1, "صديد* قيح*"),
    _c("swelling_redness", 1, _SWELL + " احمرار*"),
    _c("joint_pain", 1, _PAIN + " تورم*", "مفصل* مفاصل* ركبة* ركبتي الركبة"),
    _c("back_pain", 1, _PAIN, "ظهر الظهر ظهري"),
    _c("headache", 1, "صداع*"),
    _c("persistent_cough", 1, "سعال* كحة كحه", "مستمر* اسابيع اسبوعين شهر*"),
    _c("depression", 2, "اكتئاب* الاكتئاب ياس* الياس"),
    # --- aggravating modifiers ----------------------------------------------------------------
    _c("intense", 1, "شديد* حاد حادة حاده مبرح* قوي* قوية يطاق بشدة"),
    _c("sudden", 1, "مفاجئ* مفاجي* فجاة فجاه"),
    _c("worsening", 1, "يزداد* تزداد* تفاقم* يسوء* تسوء* ازداد* ازدادت سوءا تدهور*"),
    _c("persistent", 1, "مستمر* متواصل*"),
    # --- reassuring features ------------------------------------------------------------------
    _c("mild_words", -1, "خفيف* بسيط* بسيطة طفيف* خفيفة"),
    _c("occasional", -1, "احيانا احيان* متقطع*"),
    _c("minor_complaint", -1, "الشباب= قشرة* قشره* تساقط* جفاف* بشرة* بشرتي رائحة* حكة* حكه* عطاس* سيلان* زكام* لثة* اللثة"),
)

_ABLE = r"(اعد |يعد |تعد )?(استطيع|يستطيع|تستطيع|اقدر|يقدر|تقدر|يمكنه|يمكنها|يمكنني)( على| ان)?"
# Multi-word findings, many phrased with a negation word ("I cannot breathe", "does not stop",
# "no longer responds"), and the onset / duration of the complaint (triage acuity): matched as
# regexes on the normalized text, never negated themselves.
PHRASES: tuple[tuple[str, float, re.Pattern[str]], ...] = tuple(
    (name, weight, re.compile(normalize(pattern)))
    for name, weight, pattern in (
        ("cannot_breathe", 4, rf"(لا|لم|ما) {_ABLE} (ال)?(تنفس|التقاط|اتنفس|يتنفس|تتنفس)"),
        ("cannot_speak_or_move", 4, rf"(لا|لم) {_ABLE} (ال)?(كلام|تكلم|نطق|تحريك|الوقوف|المشي|اكمال|تكمل|يكمل)"),
        ("cannot_swallow", 3, rf"(لا|لم) {_ABLE} (ال)?(بلع|ابلع|يبلع|تبلع)"),
        ("cannot_urinate", 3, rf"(لا|لم) {_ABLE} (ال)?(تبول|اتبول|يتبول|تتبول)"),
        ("unresponsive", 4, r"(لا|لم) (يعد |تعد )?(يستجيب|تستجيب|يفيق|تفيق|يصحو|تصحو)"),
        ("hard_to_wake", 3, r"((يستيقظ|تستيقظ|يصحو|تصحو) (الا )?بصعوبة|(لا|لم) (يعد |تعد )?(يرد|ترد)(?! علي الهاتف))"),
        ("abnormal_speech", 3, r"(كلام|كلاما|يتكلم|تتكلم|اتكلم)\S*( \S+)?( بشكل)? (غريب|غير مترابط|غير مفهوم)"),
        ("disoriented", 3, r"(لم|لا) (يعرف|تعرف|يتعرف|تتعرف|يعرفني|تعرفني)"),
        ("bleeding_not_stopping", 4, r"(نزيف|نزف|الدم|الجرح)\S*( \S+){0,3} (لا|لم) (يتوقف|تتوقف|ينقطع)"),
        ("no_urine_or_feeding", 3, r"(لم|لا) (يتبول|تتبول|يرضع|ترضع|يبلل)"),
        ("no_stool_or_gas", 3, r"(لم|لا) (اخرج|يخرج|تخرج|اتبرز|يتبرز) (غاز|ريح)"),
        ("no_fetal_movement", 4, r"(لا|لم) (اعد )?(اشعر|احس|نشعر) (ب)?حرك"),
        ("young_infant", 1, r"(عمره|عمرها|بعمر)( \S+)? (يوم|ايام|اسبوع|اسابيع|اسبوعين|شهر|شهرين|شهران)(?!\S)"),
        ("acute_onset", 1, r"(منذ|قبل) (\S+ )?(ساعة|ساعتين|ساعات|دقائق|دقيقة|ربع ساعة|نصف ساعة)"),
        ("weeks_duration", 1, r"منذ (\S+ )?(اسبوعين|اسابيع|شهر|شهرين|اشهر)"),
        ("not_improving", 1, r"(لم|لا) (يتحسن|تتحسن|يخف|تخف|يزول|تزول)"),
        ("inability", 2, r"عدم القدرة على"),
        ("minor_impact", -1, r"(لا|لم) (يؤثر|تؤثر|يمنعني|تمنعني)"),
    )
)
# Findings that only add up together: (name, weight, (required names...)).
COMBOS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("young_infant_fever", 3, ("young_infant", "fever")),
)
# fmt: on


def _index_slots() -> tuple[dict, dict]:
    """Inverted index of every slot: exact form -> slot set, prefix -> slot set."""
    exact: dict[str, set] = {}
    prefix: dict[str, set] = {}
    for concept in CONCEPTS:
        for slot in concept.slots:
            for form in slot[0]:
                exact.setdefault(form, set()).add(slot)
            for pre in slot[1]:
                prefix.setdefault(pre, set()).add(slot)
    return exact, prefix


_EXACT, _PREFIX = _index_slots()


@functools.lru_cache(maxsize=1 << 16)
def _token_slots(token: str) -> frozenset:
    """The slots a token matches, trying the token and its clitic-stripped forms."""
    cands = (token,) + tuple(
        token[len(p) :] for p in _CLITICS if token.startswith(p) and len(token) - len(p) >= 2
    )
    hits: set = set()
    for c in cands:
        hits |= _EXACT.get(c, set())
        for k in range(1, len(c) + 1):
            hits |= _PREFIX.get(c[:k], set())
    return frozenset(hits)


def _clause_ids(tokens: list[str]) -> list[int]:
    ids, clause = [], 0
    for tok in tokens:
        if tok in _BOUNDARY or tok in _CONTRAST:
            clause += 1
        ids.append(clause)
    return ids


def _negated(pos: int, tokens: list[str], clauses: list[int]) -> bool:
    """A negation cue up to NEGATION_WINDOW tokens before ``pos`` (each "او"/"ولا" of a
    coordinated list extends the reach: "لا ألم ولا ضيق نفس أو تعرق"), or a "normal" word just
    after it ("حرارته طبيعية"), in the same clause."""
    budget, j = NEGATION_WINDOW, pos - 1
    while j >= 0 and budget > 0 and clauses[j] == clauses[pos]:
        tok = tokens[j]
        base = tok[1:] if tok[:1] in ("و", "ف") and tok[1:] in _NEGATIONS else tok
        if base in _NEGATIONS and tokens[j + 1] not in _NOT_NEGATING:
            return True
        budget += NEGATION_WINDOW if tok in ("او", "ولا", "ولم", "وليس") else 0
        budget, j = budget - 1, j - 1
    after = tokens[pos + 1 : pos + 1 + _POST_WINDOW]
    return any(t in _POST_NEGATIONS for t, c in zip(after, clauses[pos + 1 :]) if c == clauses[pos])


def _concept_matched(concept: _Concept, tokens, hits, clauses) -> bool:
    positions = [hits.get(slot, ()) for slot in concept.slots]
    if any(not p for p in positions):
        return False
    if concept.window is None:
        return all(any(not _negated(i, tokens, clauses) for i in p) for p in positions)
    first, rest = positions[0], positions[1:]
    for i in first:
        span = [i]
        for p in rest:  # each slot on its own token, near the first, in the same clause
            near = [j for j in p if j not in span and abs(j - i) <= concept.window]
            near = [j for j in near if clauses[j] == clauses[i]]
            if not near:
                break
            span.append(min(near, key=lambda j: abs(j - i)))
        else:
            if not any(_negated(j, tokens, clauses) for j in span):
                return True
    return False


def rule_matches(text: str) -> list[tuple[str, float]]:
    """Lists the lexicon concepts and phrases found (not negated) in ``text``.

    Args:
        text: a complaint, raw or normalized.

    Returns:
        ``[(name, weight), ...]`` in lexicon order, each concept at most once.
    """
    norm = normalize(text)
    tokens = _TOKEN.findall(norm)
    hits: dict = {}  # slot -> positions of the tokens it matches
    for i, tok in enumerate(tokens):
        for slot in _token_slots(tok):
            hits.setdefault(slot, []).append(i)
    clauses = _clause_ids(tokens)
    found = [(c.name, c.weight) for c in CONCEPTS if _concept_matched(c, tokens, hits, clauses)]
    found += [(name, w) for name, w, pattern in PHRASES if pattern.search(norm)]
    names = {name for name, _ in found}
    found += [(name, w) for name, w, need in COMBOS if names.issuperset(need)]
    return found


def rule_severity(text: str) -> tuple[str, float]:
    """Labels a complaint mild / moderate / critical with the weighted red-flag lexicon.

    The score is the sum of the weights of the matched concepts (red flags 3-5, moderate
    findings 1-2, aggravating modifiers and onset within hours +1, reassuring words -1). A term
    is cancelled when a negation word ("لا", "لم", "ليس", "بدون", ...) stands at most
    ``NEGATION_WINDOW`` tokens before it in the same clause (further across a coordinated list:
    "لا ألم ولا ضيق نفس أو تعرق"), unless the negation belongs to a finding ("لا أستطيع
    التنفس", "النزيف لا يتوقف"), or when a "normal" word follows it ("حرارته طبيعية").

    Args:
        text: the complaint (Arabic, raw or normalized).

    Returns:
        ``(label, score)``: label is one of ``SEVERITIES``; critical when ``score >= 4``,
        moderate when ``score >= 2``, otherwise mild.
    """
    score = float(sum(w for _, w in rule_matches(text)))
    if score >= CRITICAL_AT:
        return "critical", score
    if score >= MODERATE_AT:
        return "moderate", score
    return "mild", score
