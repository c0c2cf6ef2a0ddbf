"""Loading and validating complaint/response data sets: the embedded set, local files, the Hub.

Every source ends up as a list of plain dicts with our field names (``id``, ``complaint``,
``response``, ``split``, and ``severity`` / ``specialty`` / ``p_mild`` / ``p_moderate`` /
``p_critical`` when the source has them). Bad rows raise ``ValueError`` naming the file, the
1-based row (and line, for text formats) and the column; ``drop_bad=True`` drops them instead and
prints how many.

Local CSV / JSON / JSONL files are decoded and parsed here with the standard library so that the
checks see the values as written (``datasets``' CSV and JSON readers coerce ``"123"`` to an int,
empty cells to None, and fail on a mixed-type column without naming the row). Parquet files and
Hub ids go through ``datasets``.

Typical use::

    rows = load_examples()  # the embedded set
    rows = load_examples("maqa.csv", columns={"complaint": "question", "response": "answer"})
    parts = split_examples(rows)  # {"train": [...], "validation": [...], "test": [...]}

Also here: :func:`assign_splits` (the seeded stratified split) and :func:`save_examples` (JSONL or
Parquet, refusing to overwrite).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sevjax.loss import SEVERITIES

EMBEDDED_PATH = Path(__file__).parent / "data" / "medical_qa.jsonl"
SPLITS = ("train", "validation", "test")
PROB_FIELDS = ("p_mild", "p_moderate", "p_critical")
TEXT_FIELDS = ("complaint", "response", "specialty")
FIELDS = ("id", *TEXT_FIELDS, "severity", "split", *PROB_FIELDS)
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}


_Column = str | tuple[str, ...] | None  # a tuple names the columns of a check across columns
_Records = list[tuple[int, int | None, Any]]  # (1-based row, line | None, record | _RowError)


class _RowError(ValueError):
    """A problem with one row; carries the column name(s)."""

    def __init__(self, column: _Column, message: str):
        super().__init__(message)
        self.column = column


def _where(file: str, row: int | None, line: int | None, column: _Column) -> str:
    parts = [file]
    if row is not None:
        parts.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
    if isinstance(column, tuple):
        parts.append("columns " + "/".join(column))
    elif column is not None:
        parts.append(f"column {column!r}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# Readers: each yields (row_number, line_number | None, record | _RowError)
# ------------------------------------------------------------------------------------------

_BOMS = {b"\xef\xbb\xbf": "utf-8", b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}
_SIGNATURES = {b"PK\x03\x04": "a ZIP archive (an Excel .xlsx workbook?)", b"PAR1": "a Parquet file"}


def _binary_message(file: str, data: bytes) -> str:
    """Why ``data`` (no BOM, holding NUL bytes or a binary signature) is not UTF-8 text."""
    sample = data[:400]
    even, odd = sample[0::2].count(0), sample[1::2].count(0)  # UTF-16 puts ASCII's NULs on one
    what = next((w for sig, w in _SIGNATURES.items() if data.startswith(sig)), None)
    if what is None and min(even, odd) == 0 and max(even, odd) >= len(sample) / 20:
        what = f"UTF-16 {'LE' if odd else 'BE'} text without a byte-order mark"
    what = what or f"a binary file (NUL byte at offset {data.find(0)})"
    fix = "save it as UTF-8 ('CSV UTF-8' in Excel) or as UTF-16 with a byte-order mark"
    return f"{file}: not UTF-8 text, it looks like {what}; {fix}"


def _decode(path: Path, file: str) -> str:
    """Decodes UTF-8, or UTF-16 after its byte-order mark (as Excel and Notepad write it).
    Bytes that are not UTF-8 become lone surrogates that the row checks locate; NULs refuse."""
    data = path.read_bytes()
    encoding = "utf-8"
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            data, encoding = data[len(bom) :], name
            break
    if encoding == "utf-8" and 0 in data:  # no UTF-8 text holds NUL; binary formats do
        raise ValueError(_binary_message(file, data))
    try:
        text = data.decode(encoding, errors="surrogateescape" if encoding == "utf-8" else "strict")
    except UnicodeDecodeError as e:
        where = f"{file}, line {data[: e.start].decode(encoding).count(chr(10)) + 1}"
        raise ValueError(f"{where}: not valid {encoding.upper()} ({e.reason})") from None
    if not text.strip():
        raise ValueError(f"{file}: the file is empty (only whitespace or a byte-order mark)")
    return text


def _read_jsonl(text: str, file: str) -> Iterable[tuple[int, int | None, Any]]:
    row = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = _RowError(None, f"invalid JSON ({e.msg} at char {e.pos})")
        yield row, line_no, record


def _read_json(text: str, file: str) -> Iterable[tuple[int, int | None, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = next(line for line in text.splitlines() if line.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:  # not JSON Lines either: point at the document's error
            where = f"{file}, line {e.lineno}, column {e.colno}"
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        yield from _read_jsonl(text, file)  # a .json file holding JSON Lines, as datasets allows
        return
    top = "the top level"
    if isinstance(data, dict) and "data" in data:
        data, top = data["data"], "'data'"
    if not isinstance(data, list):
        kind = {dict: "object", str: "string"}.get(type(data), f"value {json.dumps(data)}")
        keys = list(data)[:8] if isinstance(data, dict) else None
        top += f" is a JSON {kind}" + (f" with keys {keys}" if keys else "")
        expected = "an array of objects [{...}, ...] or an object {'data': [...]}"
        raise ValueError(f"{file}: {top}; expected {expected}")
    if not data:
        raise ValueError(f"{file}: no data rows (the JSON array is empty)")
    for row, record in enumerate(data, start=1):
        yield row, None, record


def _read_csv(text: str, file: str) -> Iterable[tuple[int, int | None, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next((h for h in reader if h), None)  # _decode refused a file with no text
    header = [h.strip() for h in header]
    row, line = 0, reader.line_num + 1
    try:
        for values in reader:
            start, line = line, reader.line_num + 1
            if not values:
                continue
            row += 1
            if len(values) != len(header):
                err = _RowError(None, f"{len(values)} fields, header has {len(header)}")
                yield row, start, err
            else:
                yield row, start, dict(zip(header, values))
    except csv.Error as e:  # e.g. an unclosed quote running past the field size limit
        raise ValueError(f"{file}, row {row + 1} (line {line}): bad CSV ({e})") from None
    if not row:
        raise ValueError(f"{file}: has a header but no data rows (columns: {', '.join(header)})")


def _read_parquet(path: Path, file: str) -> _Records:
    import pyarrow.parquet as pq

    try:  # the footer check is fast and names the file; datasets would log a traceback first
        meta = pq.read_metadata(path)
    except Exception as e:  # pyarrow raises several types; the message matters
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
    if meta.num_rows == 0:
        raise ValueError(f"{file}: no data rows (the Parquet file has 0 rows)")
    return list(_read_datasets(file, path))


def _read_datasets(source: str, path: Path | None) -> Iterable[tuple[int, int | None, Any]]:
    import datasets  # lazy: slow import, only needed for Parquet and the Hub

    try:
        if path is not None:
            loaded = {"": datasets.load_dataset("parquet", data_files=str(path), split="train")}
        else:
            loaded = datasets.load_dataset(source)
    except Exception as e:  # datasets raises many types; the message matters
        raise ValueError(f"{source}: could not load it with datasets: {e}") from e
    row = 0
    for split_name, ds in loaded.items():
        for record in ds:
            row += 1
            split = _SPLIT_ALIASES.get(split_name, split_name)
            if split in SPLITS and "split" not in record:
                record = {**record, "split": split}
            yield row, None, record


def _directory_message(path: Path) -> str:
    found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _FORMATS)
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    inside = f"data files in it: {shown}" if found else "it holds no data files"
    return f"{path} is a directory; expected a data file ({', '.join(_FORMATS)}); {inside}"


def _read_source(source: str | Path) -> _Records:
    """Reads a local file or a Hub dataset into (row, line, record | _RowError) triples."""
    path, file = Path(source), str(source)
    if not (path.suffix.lower() in _FORMATS or path.exists()):
        if isinstance(source, str) and _HUB_ID.match(source):
            return list(_read_datasets(source, None))
        raise FileNotFoundError(f"{source!r} is neither a local data file nor a Hub dataset id")
    if path.is_dir():  # FileNotFoundError, not IsADirectoryError: what the entry scripts catch
        raise FileNotFoundError(_directory_message(path))
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported extension; expected one of {sorted(_FORMATS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{file}: the file is empty (0 bytes)")
    if fmt == "parquet":
        return _read_parquet(path, file)
    text = _decode(path, file)
    reader = {"csv": _read_csv, "json": _read_json, "jsonl": _read_jsonl}[fmt]
    return list(reader(text, file))


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

# The row-sum tolerance of sevjax.loss.validate_severity_probs, applied here per row so that the
# error names the file, row and line (tests/test_data.py checks the two agree).
PROB_SUM_TOL = 1e-3


def _check_text(value: Any, column: str, *, allow_int: bool = False) -> str:
    if value is None:
        raise _RowError(column, "missing value")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _RowError(column, "undecodable bytes (not UTF-8)") from None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _RowError(column, f"expected a string, got {type(value).__name__} {value!r}")
    if re.search("[\udc80-\udcff]", value):
        raise _RowError(column, "undecodable bytes (not UTF-8)")
    if not value.strip():
        raise _RowError(column, "empty or whitespace-only text")
    return value.strip()


def _check_prob(value: Any, column: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _RowError(column, f"expected a probability, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RowError(column, f"expected a probability, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise _RowError(column, f"probability must be finite and in [0, 1], got {value!r}")
    return float(value)


def _convert(record: Any, mapping: Mapping[str, str], present: Sequence[str]) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise _RowError(None, f"expected an object/record, got {type(record).__name__}")
    out: dict[str, Any] = {}
    for field in present:
        column = mapping[field]
        value = record.get(column)
        if field in TEXT_FIELDS:
            out[field] = _check_text(value, column)
        elif field == "id":
            out[field] = _check_text(value, column, allow_int=True)
        elif field == "severity":
            label = _check_text(value, column).lower()
            if label not in SEVERITIES:
                raise _RowError(column, f"unknown severity label {value!r}; expected {SEVERITIES}")
            out[field] = label
        elif field == "split":
            split = _check_text(value, column).lower()
            split = _SPLIT_ALIASES.get(split, split)
            if split not in SPLITS:
                raise _RowError(column, f"unknown split {value!r}; expected one of {SPLITS}")
            out[field] = split
        else:
            out[field] = _check_prob(value, column)
    if PROB_FIELDS[0] in out:  # _present_fields ensured all three or none
        total = sum(out[f] for f in PROB_FIELDS)
        if abs(total - 1.0) > PROB_SUM_TOL:
            message = f"probabilities sum to {total:.6g}, expected 1 (within 1e-3)"
            raise _RowError(tuple(mapping[f] for f in PROB_FIELDS), message)
    return out


def _column_mapping(columns: Mapping[str, str] | None, require: Sequence[str]) -> dict[str, str]:
    mapping = {f: f for f in FIELDS}
    for field, column in (columns or {}).items():
        if field not in FIELDS:
            raise ValueError(f"columns: unknown field {field!r}; our fields are {FIELDS}")
        mapping[field] = column
    unknown = [f for f in require if f not in FIELDS]
    if unknown:
        raise ValueError(f"require: unknown fields {unknown}; our fields are {FIELDS}")
    return mapping


def _present_fields(
    file: str, records: _Records, mapping: Mapping[str, str], require: Sequence[str]
) -> list[str]:
    """Our fields whose columns the file has; raises if a required or probability column is
    missing, or if no row is an object at all (then the first row's problem is the story)."""
    if not any(isinstance(record, dict) for _, _, record in records):
        _validate_rows(file, records[:1], mapping, (), drop_bad=False)  # raises row 1's problem
    seen_columns = {c for _, _, record in records if isinstance(record, dict) for c in record}
    for field in require:
        if mapping[field] not in seen_columns:
            undecodable = any(re.search("[\udc80-\udcff]", str(c)) for c in seen_columns)
            hint = " (the header has bytes that are not UTF-8)" if undecodable else ""
            raise ValueError(
                f"{file}: missing column {mapping[field]!r} (field {field!r}); "
                f"columns found: {sorted(seen_columns)}{hint}"
            )
    present = [f for f in FIELDS if mapping[f] in seen_columns]
    probs = [f for f in PROB_FIELDS if f in present]
    if probs and len(probs) != len(PROB_FIELDS):
        missing = [mapping[f] for f in PROB_FIELDS if f not in probs]
        raise ValueError(f"{file}: probability columns incomplete, missing {missing}")
    return present


def _validate_rows(
    file: str, records: _Records, mapping: Mapping[str, str], present: Sequence[str], drop_bad: bool
) -> list[dict[str, Any]]:
    """Converts each record, raising (or, with ``drop_bad``, collecting) located row errors."""
    examples, bad, first_ids = [], [], {}
    for row, line, record in records:
        try:
            if isinstance(record, _RowError):
                raise record
            example = _convert(record, mapping, present)
            if "id" in example:
                if example["id"] in first_ids:
                    first = first_ids[example["id"]]
                    message = f"duplicate id {example['id']!r} (first seen at row {first})"
                    raise _RowError(mapping["id"], message)
                first_ids[example["id"]] = row
            else:
                example = {"id": f"row-{row:06d}", **example}
        except _RowError as e:
            message = f"{_where(file, row, line, e.column)}: {e}"
            if not drop_bad:
                raise ValueError(message) from None
            bad.append(message)
            continue
        examples.append(example)
    if bad:
        print(f"load_examples: dropped {len(bad)} bad row(s) from {file}; first: {bad[0]}")
    if not examples:
        raise ValueError(f"{file}: no valid rows")
    return examples


def load_examples(
    source: str | Path | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    drop_bad: bool = False,
    require: Sequence[str] = ("complaint", "response"),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Loads and validates a complaint/response data set.

    Args:
        source: None for the embedded set (:data:`EMBEDDED_PATH`); a local ``.csv``, ``.json``,
            ``.jsonl`` or ``.parquet`` file; or a Hub dataset id (``owner/name``, needs network).
            Text files are UTF-8, or UTF-16 with a byte-order mark.
        columns: our field name -> the file's column, e.g. ``{"complaint": "question",
            "response": "answer", "specialty": "category"}``; unmapped fields keep their names.
        drop_bad: drop rows that fail validation (printing how many) instead of raising.
        require: fields that must exist as columns.
        seed: seed of the stratified 80/10/10 split made when the source has no split column.

    Returns:
        One dict per row with ``id`` (``"row-000001"``... when the file has none),
        ``complaint``, ``response``, ``split``, and ``specialty``, ``severity``, ``p_mild``,
        ``p_moderate``, ``p_critical`` when present. Texts are stripped; severity is lower case.

    Raises:
        FileNotFoundError: if a local path does not exist or is a directory.
        ValueError: naming the file for an empty, header-only, binary or corrupt file, and the
            file, 1-based row (and line) and column for a missing column, empty or non-string
            text, an unknown severity or split, a bad probability, probabilities not summing to
            1 within :data:`PROB_SUM_TOL`, a duplicate id, undecodable bytes or bad JSON/CSV.
    """
    mapping = _column_mapping(columns, require)
    source = EMBEDDED_PATH if source is None else source
    file = str(source)
    records = _read_source(source)
    present = _present_fields(file, records, mapping, require)
    examples = _validate_rows(file, records, mapping, present, drop_bad)
    if "split" not in present:
        examples = assign_splits(examples, seed=seed)
    return examples


def assign_splits(
    examples: Sequence[dict[str, Any]],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> list[dict[str, Any]]:
    """Deterministic train/validation/test split, stratified by severity when it is present.

    Within each severity, examples are shuffled by a ``seed``-ed permutation of their input
    order; ``round(n * fraction)`` go to validation and to test, the rest to train.

    Args:
        examples: dicts; those with a ``severity`` key are stratified by it.
        seed: NumPy seed.
        fractions: train, validation, test fractions (must sum to 1).

    Returns:
        New dicts (same order as the input) with ``split`` set.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    strata: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        strata.setdefault(ex.get("severity", ""), []).append(i)
    split_of = {}
    for key in sorted(strata):
        idx = [strata[key][j] for j in rng.permutation(len(strata[key]))]
        n_val = round(len(idx) * fractions[1])
        n_test = round(len(idx) * fractions[2])
        for k, i in enumerate(idx):
            split_of[i] = "validation" if k < n_val else "test" if k < n_val + n_test else "train"
    return [{**ex, "split": split_of[i]} for i, ex in enumerate(examples)]


def split_examples(examples: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Groups examples by their ``split`` field.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}`` in input order.

    Raises:
        ValueError: if an example has no split or an unknown one.
    """
    parts: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for ex in examples:
        split = ex.get("split")
        if split not in parts:
            raise ValueError(f"example {ex.get('id')!r}: split {split!r} not in {SPLITS}")
        parts[split].append(ex)
    return parts


def save_examples(
    examples: Sequence[dict[str, Any]], path: str | Path, *, overwrite: bool = False
) -> Path:
    """Writes examples as JSONL (UTF-8, one object a line) or Parquet, chosen by extension.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
        ValueError: for an extension other than ``.jsonl`` / ``.parquet``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: output must end in .jsonl or .parquet")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--set overwrite=true)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(examples)), path)
    return path
