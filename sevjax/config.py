"""Typed configuration: frozen dataclass schemas, a YAML overlay loader and ``--set`` overrides.

A schema is a tree of frozen dataclasses deriving from :class:`Section`. The defaults in the
schema are the full configuration; a YAML file is a short overlay on them, and command-line
``--set a.b=value`` overrides are applied last. Every value goes through the same checks: field
types from the annotations (``int``, ``float``, ``str``, ``bool``, ``X | None``, ``tuple[...]``,
``Literal[...]`` choices, nested sections, ``dict[str, str]``), then each section's own
``validate()``. Unknown keys raise ``ValueError`` naming the key and listing the allowed ones.

The schemas themselves live in :mod:`sevjax.schema`; :func:`describe` lists every key of one
with its default and help text (``python train.py --print-config``).

Typical use::

    cfg = load(TrainConfig, "configs/tiny.yaml", ["optim.lr=3e-4", "mesh.data=2"])
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

S = TypeVar("S", bound="Section")


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of every config section: checks field types and choices, then calls ``validate``.

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` and override :meth:`validate` for
    cross-field rules (raise ``ValueError`` with the key name and what was expected).
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], f.name)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; the base class has none."""


def choice(name: str, value: Any, valid: Sequence[Any]) -> None:
    """Raises ``ValueError`` listing the valid choices when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"config key {name!r}: got {value!r}; valid choices: {list(valid)}")


def positive(name: str, value: float | int, *, allow_zero: bool = False) -> None:
    """Raises ``ValueError`` unless ``value > 0`` (or ``>= 0`` with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        kind = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"config key {name!r}: must be {kind}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; converts lists to tuples, ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        choice(name, value, args)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {name!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"config key {name!r}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {name!r}: expected a mapping, got {value!r}")
        return {
            _coerce(k, args[0], name): _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()
        }
    if isinstance(tp, type) and issubclass(tp, Section):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=name)
        raise ValueError(f"config key {name!r} is a section; expected a mapping, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:
        raise TypeError(f"config key {name!r}: unsupported annotation {tp!r}")
    raise ValueError(f"config key {name!r}: expected {_type_name(tp)}, got {value!r}")


def _section_fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _unknown(key: str, cls: type, prefix: str) -> ValueError:
    where = f"section {prefix!r}" if prefix else f"{cls.__name__}"
    allowed = ", ".join(f.name for f in dataclasses.fields(cls))
    full = f"{prefix}.{key}" if prefix else key
    return ValueError(f"unknown config key {full!r}; allowed keys in {where}: {allowed}")


def from_dict(schema_cls: type[S], data: dict[str, Any], *, prefix: str = "") -> S:
    """Builds a schema instance from a (partial) nested dict; missing keys keep their defaults.

    Args:
        schema_cls: a :class:`Section` subclass.
        data: nested mapping of section names to mappings / values.
        prefix: dotted path of this section (for error messages).

    Raises:
        ValueError: on unknown keys (listing the allowed ones) or invalid values.
    """
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or schema_cls.__name__!r}: expected a mapping")
    hints = _section_fields(schema_cls)
    names = {f.name for f in dataclasses.fields(schema_cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(key, schema_cls, prefix)
        full = f"{prefix}.{key}" if prefix else key
        if _is_section_type(hints[key]) and isinstance(value, dict):
            value = from_dict(hints[key], value, prefix=full)
        kwargs[key] = _coerce(value, hints[key], full)
    return schema_cls(**kwargs)


def to_dict(cfg: Section) -> dict[str, Any]:
    """The config as a nested dict of plain JSON/YAML values (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, Section):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


def _merge(base: dict[str, Any], overlay: dict[str, Any], cls: type, prefix: str) -> None:
    """Deep-merges ``overlay`` into ``base`` in place, rejecting keys the schema lacks."""
    hints = _section_fields(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in overlay.items():
        if key not in names:
            raise _unknown(key, cls, prefix)
        full = f"{prefix}.{key}" if prefix else key
        if _is_section_type(hints[key]):
            if not isinstance(value, dict):
                raise ValueError(f"config key {full!r} is a section; expected a mapping")
            _merge(base[key], value, hints[key], full)
        else:
            base[key] = value


def _set(base: dict[str, Any], cls: type, dotted: str, value: Any) -> None:
    """Applies one ``a.b.c=value`` override to the nested dict ``base``."""
    parts = dotted.split(".")
    node, node_cls, prefix = base, cls, ""
    for i, key in enumerate(parts):
        if node_cls is None:  # inside a dict-typed field: free-form keys
            if i == len(parts) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {})
            continue
        names = {f.name for f in dataclasses.fields(node_cls)}
        if key not in names:
            raise _unknown(key, node_cls, prefix)
        tp = _section_fields(node_cls)[key]
        prefix = f"{prefix}.{key}" if prefix else key
        if i == len(parts) - 1:
            if _is_section_type(tp) and not isinstance(value, dict):
                raise ValueError(f"config key {prefix!r} is a section; set one of its keys")
            node[key] = value
        elif _is_section_type(tp):
            node, node_cls = node[key], tp
        elif typing.get_origin(tp) is dict or (
            typing.get_origin(tp) in (typing.Union, types.UnionType)
            and any(typing.get_origin(a) is dict for a in typing.get_args(tp))
        ):
            if node.get(key) is None:
                node[key] = {}
            node, node_cls = node[key], None
        else:
            raise ValueError(f"config key {prefix!r} is a value, not a section ({dotted!r})")


def parse_override(text: str) -> tuple[str, Any]:
    """Splits ``"a.b=value"`` into ``("a.b", value)``, typing the value with ``yaml.safe_load``."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load(
    schema_cls: type[S],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> S:
    """Schema defaults, overlaid with a YAML file, then with ``key.sub=value`` overrides.

    Args:
        schema_cls: a :class:`Section` subclass whose defaults are the base config.
        path: optional YAML file holding a (partial) nested mapping.
        overrides: strings like ``"optim.lr=3e-4"``; values are parsed with ``yaml.safe_load``
            (so ``3``, ``0.5``, ``true``, ``null``, ``[1, 2]`` get their YAML types).

    Returns:
        A validated, frozen ``schema_cls`` instance.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on unknown keys (listing allowed keys), invalid values (listing choices) or
            a YAML syntax error (naming the file, line and column).
    """
    data = to_dict(schema_cls())
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a directory; expected a YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            overlay = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {path}: invalid YAML{where}: {problem}") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {path}: not UTF-8 text") from None
        if not isinstance(overlay, dict):
            raise ValueError(f"config file {path}: expected a mapping at the top level")
        try:
            _merge(data, overlay, schema_cls, "")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for text in overrides:
        key, value = parse_override(text)
        _set(data, schema_cls, key, value)
    return from_dict(schema_cls, data)


def _field_help(cls: type) -> dict[str, str]:
    """Field name -> its trailing ``# comment`` in the class source (the field's help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^\n#]+?#\s*(.+)$", source, flags=re.MULTILINE)
    return dict(found)


def describe(schema_cls: type[Section], prefix: str = "") -> list[tuple[str, str, str]]:
    """Every key of a schema: ``(dotted key, default as JSON, help)`` in declaration order.

    The help text is the trailing ``# comment`` of the field in :mod:`sevjax.schema`; a section
    is listed with an empty default and the first line of its docstring.
    """
    import json

    out = []
    defaults = schema_cls()
    helps = _field_help(schema_cls)
    for f in dataclasses.fields(schema_cls):
        key, value = f"{prefix}{f.name}", getattr(defaults, f.name)
        if isinstance(value, Section):
            doc = (type(value).__doc__ or "").strip().splitlines()
            out.append((key, "", doc[0] if doc else ""))
            out += describe(type(value), prefix=f"{key}.")
        else:
            text = json.dumps(
                to_dict(value) if isinstance(value, tuple) else value, ensure_ascii=False
            )
            out.append((key, text, helps.get(f.name, "")))
    return out
