"""sevjax.data: the embedded set, local formats with column mapping, validation errors, splits."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sevjax.data import (
    EMBEDDED_PATH,
    assign_splits,
    load_examples,
    save_examples,
    split_examples,
)
from sevjax.loss import SEVERITIES, validate_severity_probs
from sevjax.tokenizer import train_wordpiece

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"question": "أعاني من صداع خفيف منذ يومين", "answer": "اشرب الماء وارتح", "category": "mild"},
    {"question": "ألم شديد في الصدر", "answer": "اتصل بالإسعاف فورا", "category": "critical"},
    {"question": "حمى منذ ثلاثة أيام", "answer": "راجع الطبيب", "category": "moderate"},
]
MAPPING = {"complaint": "question", "response": "answer", "severity": "category"}


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "build_dataset", ROOT / "scripts/build_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ embedded set


@pytest.fixture(scope="module")
def embedded():
    return load_examples()


def test_embedded_set_meets_the_card(embedded):
    assert EMBEDDED_PATH.is_file()
    assert len(embedded) >= 600
    assert len({ex["complaint"] for ex in embedded}) == len(embedded)
    counts = Counter(ex["severity"] for ex in embedded)
    assert all(counts[s] >= 0.25 * len(embedded) for s in SEVERITIES)
    assert len({ex["specialty"] for ex in embedded}) >= 12
    splits = Counter(ex["split"] for ex in embedded)
    assert abs(splits["validation"] / len(embedded) - 0.1) < 0.01
    assert abs(splits["test"] / len(embedded) - 0.1) < 0.01
    for ex in embedded:
        assert set(ex) == {"id", "complaint", "response", "specialty", "severity", "split"}


def test_embedded_set_is_the_deterministic_build(embedded):
    build = _build_module()
    examples, _ = build.build()
    assert build.dumps(examples) == EMBEDDED_PATH.read_text(encoding="utf-8")


def test_split_examples_groups_by_split(embedded):
    parts = split_examples(embedded)
    assert sum(len(v) for v in parts.values()) == len(embedded)
    for name, rows in parts.items():
        assert all(ex["split"] == name for ex in rows)
    with pytest.raises(ValueError, match="split"):
        split_examples([{"id": "a", "split": "dev2"}])


# ----------------------------------------------------------------------------------- formats


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    elif fmt == "csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_formats_with_column_mapping(tmp_path, fmt):
    path = _write(tmp_path / f"maqa.{fmt}", ROWS, fmt)
    rows = load_examples(path, columns=MAPPING)
    assert [r["complaint"] for r in rows] == [r["question"] for r in ROWS]
    assert [r["severity"] for r in rows] == ["mild", "critical", "moderate"]
    assert [r["id"] for r in rows] == ["row-000001", "row-000002", "row-000003"]
    assert {r["split"] for r in rows} <= {"train", "validation", "test"}


def test_probability_columns_pass_through(tmp_path):
    rows = [dict(r, p_mild=0.2, p_moderate=0.3, p_critical=0.5) for r in ROWS]
    for fmt in ("jsonl", "csv"):
        out = load_examples(_write(tmp_path / f"p.{fmt}", rows, fmt), columns=MAPPING)
        assert [(r["p_mild"], r["p_moderate"], r["p_critical"]) for r in out] == [
            (0.2, 0.3, 0.5)
        ] * 3


def test_missing_split_gives_deterministic_stratified_split(tmp_path):
    rows = [
        {"complaint": f"شكوى رقم {i}", "response": "رد", "severity": SEVERITIES[i % 3]}
        for i in range(300)
    ]
    path = _write(tmp_path / "nosplit.jsonl", rows, "jsonl")
    a, b = load_examples(path), load_examples(path)
    assert [r["split"] for r in a] == [r["split"] for r in b]
    c = Counter((r["split"], r["severity"]) for r in a)
    for sev in SEVERITIES:
        assert (c["train", sev], c["validation", sev], c["test", sev]) == (80, 10, 10)
    assert [r["split"] for r in load_examples(path, seed=1)] != [r["split"] for r in a]
    assert assign_splits(a, seed=0) == a


# ------------------------------------------------------------------------------------ errors

GOOD = {"id": "x1", "complaint": "ألم في الصدر", "response": "اذهب للطوارئ", "severity": "critical"}


@pytest.mark.parametrize(
    "bad, column, message",
    [
        ({"complaint": "   "}, "complaint", "empty or whitespace-only"),
        ({"complaint": ""}, "complaint", "empty or whitespace-only"),
        ({"response": 42}, "response", "expected a string, got int"),
        ({"complaint": ["ألم"]}, "complaint", "expected a string, got list"),
        ({"severity": "severe"}, "severity", "unknown severity label 'severe'"),
        ({"complaint": None}, "complaint", "missing value"),
        ({"split": "holdout"}, "split", "unknown split 'holdout'"),
    ],
)
def test_bad_value_names_file_row_and_column(tmp_path, bad, column, message):
    rows = [GOOD | {"id": "a", "split": "train"}, GOOD | {"id": "b", "split": "train"} | bad]
    path = _write(tmp_path / "bad.jsonl", rows, "jsonl")
    with pytest.raises(ValueError) as err:
        load_examples(path)
    text = str(err.value)
    assert str(path) in text and "row 2 (line 2)" in text and f"column {column!r}" in text
    assert message in text


def test_missing_column_names_file_and_column(tmp_path):
    path = _write(tmp_path / "maqa.csv", ROWS, "csv")
    with pytest.raises(ValueError, match=r"maqa\.csv: missing column 'complaint'.*question"):
        load_examples(path)
    with pytest.raises(ValueError, match="missing column 'response' \\(field 'response'\\)"):
        load_examples(path, columns={"complaint": "question"})
    with pytest.raises(ValueError, match="missing column 'level' \\(field 'severity'\\)"):
        load_examples(path, columns={**MAPPING, "severity": "level"}, require=("severity",))
    with pytest.raises(ValueError, match="require: unknown fields"):
        load_examples(path, columns=MAPPING, require=("answer",))


def test_csv_row_and_line_numbers(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text(
        'complaint,response\n"سطر\nثان",رد\nشكوى,"  "\n', encoding="utf-8"
    )  # row 1 spans lines 2-3; row 2 is line 4
    with pytest.raises(ValueError, match=r"row 2 \(line 4\), column 'response': empty"):
        load_examples(path)


def test_duplicate_ids(tmp_path):
    path = _write(tmp_path / "dup.json", [GOOD, GOOD | {"complaint": "آخر"}], "json")
    with pytest.raises(ValueError, match=r"dup\.json, row 2, column 'id': duplicate id 'x1'"):
        load_examples(path)


def test_undecodable_bytes_are_reported_with_row_and_column(tmp_path):
    good = json.dumps(GOOD, ensure_ascii=False).encode()
    bad = (
        json.dumps(GOOD | {"id": "x2"}, ensure_ascii=False)
        .encode()
        .replace("ألم".encode(), b"\xff\xfe")
    )
    path = tmp_path / "latin.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 2\), column 'complaint': undecodable"):
        load_examples(path)
    csv_path = tmp_path / "latin.csv"
    csv_path.write_bytes("complaint,response\nشكوى,رد\n".encode() + b"ok,\xe9t\xe9\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\), column 'response': undecodable"):
        load_examples(csv_path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl, row 2 \(line 2\): invalid JSON"):
        load_examples(path)


def test_drop_bad_drops_and_counts(tmp_path, capsys):
    rows = [GOOD | {"id": str(i), "complaint": f"شكوى {i}"} for i in range(6)]
    rows[1]["complaint"] = " "
    rows[3]["severity"] = "unknown"
    rows[4]["id"] = "0"  # duplicate of row 1
    path = _write(tmp_path / "some_bad.jsonl", rows, "jsonl")
    out = load_examples(path, drop_bad=True)
    assert [r["id"] for r in out] == ["0", "2", "5"]
    printed = capsys.readouterr().out
    assert "dropped 3 bad row(s)" in printed and "some_bad.jsonl" in printed


def test_unknown_field_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown field 'question'"):
        load_examples(columns={"question": "complaint"})
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_examples(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_examples(_write(tmp_path / "x.txt", ROWS, "jsonl"))


# ------------------------------------------------------------------------- bad files, located


def _digest(path: Path) -> str:
    """Hash of a file, or of a directory's names and contents, to prove loading changed nothing."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(
            str(f.relative_to(path.parent)).encode() + (f.read_bytes() if f.is_file() else b"")
        )
    return h.hexdigest()


def _fails(path: Path, exc: type, *fragments: str, **kwargs) -> str:
    """Loads ``path`` expecting ``exc`` whose message names the file and holds ``fragments``."""
    before = _digest(path)
    with pytest.raises(exc) as err:
        load_examples(path, **kwargs)
    assert type(err.value) is exc
    text = str(err.value)
    assert text.startswith(str(path)), text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert _digest(path) == before
    return text


def _pretty_json_trailing_comma() -> bytes:
    text = json.dumps([GOOD, GOOD | {"id": "x2"}], ensure_ascii=False, indent=2)
    assert text.endswith("}\n]")
    text = text[:-2] + ",\n]"  # a trailing comma before the closing "]"
    assert text.splitlines()[13] == "]"  # on line 14, where json reports the error
    return text.encode()


UTF16_TEXT = "complaint,response\nصداع منذ يومين,راجع الطبيب\nألم في الصدر,اتصل بالإسعاف\n"
BAD_FILES = {
    # name: (bytes, exception, message fragments)
    "empty.csv": (b"", ValueError, ": the file is empty (0 bytes)"),
    "blank.jsonl": (b"\n  \n\n", ValueError, ": the file is empty (only whitespace"),
    "bom_only.csv": (b"\xff\xfe", ValueError, ": the file is empty (only whitespace"),
    "header_only.csv": (
        b"complaint,response\n\n",
        ValueError,
        ": has a header but no data rows (columns: complaint, response)",
    ),
    "utf16_no_bom.csv": (
        UTF16_TEXT.encode("utf-16-le"),
        ValueError,
        ": not UTF-8 text, it looks like UTF-16 LE text without a byte-order mark; save it as UTF-8",
    ),
    "binary.jsonl": (
        b'{"complaint": "a"}\n\x00\x01\x02\x03\xff\n',
        ValueError,
        ": not UTF-8 text, it looks like a binary file (NUL byte at offset 19)",
    ),
    "workbook.csv": (b"PK\x03\x04\x14\x00\x06\x00", ValueError, "a ZIP archive (an Excel .xlsx"),
    "truncated_utf16.csv": (
        b"\xff\xfe" + UTF16_TEXT.encode("utf-16-le") + b"A",
        ValueError,
        ", line 4: not valid UTF-16-LE (truncated data)",
    ),
    "corrupt.parquet": (
        b"PAR1 this is not a parquet body",
        ValueError,
        ": not a readable Parquet file (Parquet magic bytes not found",
    ),
    "rows_key.json": (
        json.dumps({"rows": [GOOD]}).encode(),
        ValueError,
        ": the top level is a JSON object with keys ['rows']; expected an array of objects",
    ),
    "data_dict.json": (
        json.dumps({"data": {"x1": GOOD}}).encode(),
        ValueError,
        ": 'data' is a JSON object with keys ['x1']; expected an array",
    ),
    "scalar.json": (b"42\n", ValueError, ": the top level is a JSON value 42; expected an array"),
    "empty_array.json": (b"[]", ValueError, ": no data rows (the JSON array is empty)"),
    "trailing_comma.json": (
        _pretty_json_trailing_comma(),
        ValueError,
        ", line 14, column 1: invalid JSON (Expecting value)",
    ),
    "list_row.jsonl": (
        (json.dumps(GOOD) + "\n" + json.dumps(["ألم", "رد"]) + "\n").encode(),
        ValueError,
        ", row 2 (line 2): expected an object/record, got list",
    ),
    "only_lists.jsonl": (
        b"\n" + json.dumps(["a", "b"]).encode() + b"\n[1]\n",
        ValueError,
        ", row 1 (line 2): expected an object/record, got list",
    ),
    "unclosed_quote.csv": (
        b'complaint,response\na,b\nc,"no closing quote\n' + b"x" * 140_000 + b"\n",
        ValueError,
        ", row 2 (line 3): bad CSV (field larger than field limit",
    ),
    "cp1256_header.csv": (
        "الشكوى,الرد\nشكوى,رد\n".encode("cp1256"),
        ValueError,
        ": missing column 'complaint' (field 'complaint'); columns found: [",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_named_with_its_problem(tmp_path, name):
    data, exc, fragment = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    text = _fails(path, exc, fragment)
    if "missing column" in text:  # only where it is one, and then saying why
        assert text.endswith("(the header has bytes that are not UTF-8)")


def test_empty_parquet_has_no_data_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"complaint": pa.array([], pa.string())}), path)
    _fails(path, ValueError, ": no data rows (the Parquet file has 0 rows)")


@pytest.mark.parametrize(
    "encoding, bom",
    [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"), ("utf-8", b"\xef\xbb\xbf")],
    ids=["utf16le-bom", "utf16be-bom", "utf8-bom"],
)
def test_byte_order_marked_files_decode_and_keep_line_numbers(tmp_path, encoding, bom):
    path = tmp_path / f"excel_{encoding}.csv"
    path.write_bytes(bom + UTF16_TEXT.encode(encoding))
    rows = load_examples(path)
    assert [r["complaint"] for r in rows] == ["صداع منذ يومين", "ألم في الصدر"]
    assert [r["response"] for r in rows] == ["راجع الطبيب", "اتصل بالإسعاف"]
    bad = tmp_path / f"bad_{encoding}.csv"
    bad.write_bytes(bom + UTF16_TEXT.replace("اتصل بالإسعاف", "  ").encode(encoding))
    _fails(bad, ValueError, ", row 2 (line 3), column 'response': empty or whitespace-only")


def test_directory_is_not_a_data_file(tmp_path):
    folder = tmp_path / "maqa"
    folder.mkdir()
    _write(folder / "train.jsonl", [GOOD], "jsonl")
    _write(folder / "test.csv", ROWS, "csv")
    (folder / "README.md").write_text("notes", "utf-8")
    text = _fails(
        folder,
        FileNotFoundError,
        " is a directory; expected a data file (.csv, .json, .jsonl, .parquet)",
        "data files in it: test.csv, train.jsonl",
    )
    assert "not found" not in text and "README" not in text
    named_like_a_file = tmp_path / "data.csv"
    named_like_a_file.mkdir()
    _fails(named_like_a_file, FileNotFoundError, " is a directory", "it holds no data files")


PROB_GOOD = GOOD | {"p_mild": 0.2, "p_moderate": 0.3, "p_critical": 0.5}


@pytest.mark.parametrize("fmt, line", [("jsonl", 2), ("csv", 3)])
@pytest.mark.parametrize(
    "bad, column, message",
    [
        ({"p_critical": 1.0}, "columns p_mild/p_moderate/p_critical", "sum to 1.5, expected 1"),
        ({"p_critical": 0.4}, "columns p_mild/p_moderate/p_critical", "sum to 0.9, expected 1"),
        ({"p_mild": float("nan")}, "column 'p_mild'", "finite and in [0, 1], got nan"),
        ({"p_moderate": float("inf")}, "column 'p_moderate'", "finite and in [0, 1], got inf"),
        ({"p_critical": 1.5}, "column 'p_critical'", "finite and in [0, 1], got 1.5"),
        ({"p_mild": -0.1, "p_moderate": 0.6}, "column 'p_mild'", "in [0, 1], got -0.1"),
    ],
)
def test_bad_probabilities_name_file_row_line_and_columns(
    tmp_path, fmt, line, bad, column, message
):
    rows = [PROB_GOOD, PROB_GOOD | {"id": "x2"} | bad]
    path = _write(tmp_path / f"probs.{fmt}", rows, fmt)
    _fails(path, ValueError, f", row 2 (line {line}), {column}: ", message)


def test_probability_sum_uses_mapped_columns_and_drop_bad(tmp_path, capsys):
    names = {"p_mild": "mild", "p_moderate": "moderate", "p_critical": "critical"}
    rows = [
        {"id": str(i), "complaint": f"شكوى {i}", "response": "رد", "mild": 0.2, "moderate": 0.3}
        | {"critical": 0.5 if i != 2 else 0.6}
        for i in range(4)
    ]
    path = _write(tmp_path / "mapped.jsonl", rows, "jsonl")
    _fails(
        path,
        ValueError,
        ", row 3 (line 3), columns mild/moderate/critical: probabilities sum to 1.1, expected 1 "
        "(within 1e-3)",
        columns=names,
    )
    out = load_examples(path, columns=names, drop_bad=True)
    assert [r["id"] for r in out] == ["0", "1", "3"]
    printed = capsys.readouterr().out
    assert "dropped 1 bad row(s)" in printed and "row 3 (line 3), columns mild/" in printed


def test_probability_sum_tolerance_matches_the_loss_check(tmp_path):
    # load time and sevjax.loss.validate_severity_probs must accept and reject the same rows
    outcomes = []
    for delta in (-1.1e-3, -0.9e-3, 0.0, 0.9e-3, 1.1e-3):
        probs = (0.25, 0.25, 0.5 + delta)
        try:
            validate_severity_probs(np.array([probs]))
            loss_ok = True
        except ValueError:
            loss_ok = False
        row = GOOD | dict(zip(("p_mild", "p_moderate", "p_critical"), probs))
        path = _write(tmp_path / f"tol_{delta}.jsonl", [row], "jsonl")
        try:
            load_examples(path)
            data_ok = True
        except ValueError as e:
            assert "columns p_mild/p_moderate/p_critical: probabilities sum to" in str(e)
            data_ok = False
        outcomes.append((delta, loss_ok, data_ok))
    assert all(loss_ok == data_ok for _, loss_ok, data_ok in outcomes), outcomes
    assert [data_ok for _, _, data_ok in outcomes] == [False, True, True, True, False]


# --------------------------------------------------------------------------- output, tokenizer


def test_save_examples_refuses_overwrite(tmp_path):
    path = save_examples([GOOD], tmp_path / "out.jsonl")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_examples([GOOD, GOOD], path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    save_examples([GOOD, GOOD], path, overwrite=True)
    assert len(path.read_text("utf-8").splitlines()) == 2
    pq = save_examples([GOOD], tmp_path / "out.parquet")
    assert load_examples(pq)[0]["complaint"] == GOOD["complaint"]
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        save_examples([GOOD], tmp_path / "out.csv")


def test_wordpiece_is_deterministic_and_normalizes(embedded):
    texts = [ex["complaint"] for ex in embedded[:200]]
    a, b = train_wordpiece(texts, 400), train_wordpiece(texts, 400)
    assert a.get_vocab() == b.get_vocab() and len(a) <= 400
    assert a("أَلَمٌ شديــد")["input_ids"] == a("الم شديد")["input_ids"]
    assert a.convert_ids_to_tokens(a("صداع")["input_ids"])[0] == "[CLS]"
    assert a.pad_token_id == 0


def test_wordpiece_is_identical_across_processes():
    # tokenizers' own trainer breaks ties by hash order, which differs between processes.
    code = (
        "import hashlib, json; from sevjax.data import load_examples; from sevjax.tokenizer import train_wordpiece; "
        "t = train_wordpiece([e['complaint'] for e in load_examples()[:150]], 300); "
        "print(hashlib.md5(json.dumps(sorted(t.get_vocab().items())).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    here = train_wordpiece([e["complaint"] for e in load_examples()[:150]], 300)
    digest = hashlib.md5(json.dumps(sorted(here.get_vocab().items())).encode()).hexdigest()
    assert run.stdout.split()[-1] == digest
