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


class _RowError(ValueError):
    """A problem with one row; carries the column name."""

    def __init__(self, column: str | None, message: str):
        super().__init__(message)
        self.column = column


def _where(file: str, row: int | None, line: int | None, column: str | None) -> str:
    parts = [file]
    if row is not None:
        parts.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
    if column is not None:
        parts.append(f"column {column!r}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# Readers: each yields (row_number, line_number | None, record | _RowError)
# ------------------------------------------------------------------------------------------


def _decode(path: Path) -> str:
    """Decodes UTF-8 (BOM allowed); undecodable bytes become lone surrogates that the row
    checks report with their row and column."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _read_jsonl(text: str) -> Iterable[tuple[int, int | None, Any]]:
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


def _read_json(text: str) -> Iterable[tuple[int, int | None, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _read_jsonl(text)  # a .json file holding JSON Lines, as datasets allows
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of objects (or {'data': [...]}) at the top level")
    for row, record in enumerate(data, start=1):
        yield row, None, record


def _read_csv(text: str) -> Iterable[tuple[int, int | None, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    row, line = 0, reader.line_num + 1
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


def _read_datasets(source: str, path: Path | None) -> Iterable[tuple[int, int | None, Any]]:
    import datasets  # lazy: slow import, only needed for Parquet and the Hub

    try:
        if path is not None:
            loaded = {"": datasets.load_dataset("parquet", data_files=str(path), split="train")}
        else:
            loaded = datasets.load_dataset(source)
    except Exception as e:  # datasets raises many types; the message matters
        raise ValueError(f"could not load {source!r} with datasets: {e}") from e
    row = 0
    for split_name, ds in loaded.items():
        for record in ds:
            row += 1
            split = _SPLIT_ALIASES.get(split_name, split_name)
            if split in SPLITS and "split" not in record:
                record = {**record, "split": split}
            yield row, None, record


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


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
    return out


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
        FileNotFoundError: if a local path does not exist.
        ValueError: naming the file, the 1-based row (and line) and the column for a missing
            column, empty or whitespace-only text, a non-string value, an unknown severity or
            split, a bad probability, a duplicate id, undecodable bytes or unparsable JSON/CSV.
    """
    mapping = {f: f for f in FIELDS}
    for field, column in (columns or {}).items():
        if field not in FIELDS:
            raise ValueError(f"columns: unknown field {field!r}; our fields are {FIELDS}")
        mapping[field] = column
    unknown = [f for f in require if f not in FIELDS]
    if unknown:
        raise ValueError(f"require: unknown fields {unknown}; our fields are {FIELDS}")
    source = EMBEDDED_PATH if source is None else source
    path = Path(source)
    file = str(source)
    if path.suffix.lower() in _FORMATS or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unsupported extension; expected one of {sorted(_FORMATS)}")
        if fmt == "parquet":
            records = list(_read_datasets(file, path))
        else:
            text = _decode(path)
            reader = {"csv": _read_csv, "json": _read_json, "jsonl": _read_jsonl}[fmt]
            try:
                records = list(reader(text))
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None
    elif isinstance(source, str) and _HUB_ID.match(source):
        records = list(_read_datasets(source, None))
    else:
        raise FileNotFoundError(f"{source!r} is neither a local data file nor a Hub dataset id")

    seen_columns = set()
    for _, _, record in records:
        if isinstance(record, dict):
            seen_columns |= set(record)
    for field in require:
        if mapping[field] not in seen_columns:
            raise ValueError(
                f"{file}: missing column {mapping[field]!r} (field {field!r}); "
                f"columns found: {sorted(seen_columns)}"
            )
    present = [f for f in FIELDS if mapping[f] in seen_columns]
    probs = [f for f in PROB_FIELDS if f in present]
    if probs and len(probs) != len(PROB_FIELDS):
        missing = [mapping[f] for f in PROB_FIELDS if f not in probs]
        raise ValueError(f"{file}: probability columns incomplete, missing {missing}")

    examples, bad, first_ids = [], [], {}
    for row, line, record in records:
        try:
            if isinstance(record, _RowError):
                raise record
            example = _convert(record, mapping, present)
            if "id" in example:
                if example["id"] in first_ids:
                    raise _RowError(
                        mapping["id"],
                        f"duplicate id {example['id']!r} (first seen at row {first_ids[example['id']]})",
                    )
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
