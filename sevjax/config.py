"""Typed configuration: frozen dataclass schemas, a YAML overlay loader and ``--set`` overrides.

A schema is a tree of frozen dataclasses deriving from :class:`Section`. The defaults in the
schema are the full configuration; a YAML file is a short overlay on them, and command-line
``--set a.b=value`` overrides are applied last. Every value goes through the same checks: field
types from the annotations (``int``, ``float``, ``str``, ``bool``, ``X | None``, ``tuple[...]``,
``Literal[...]`` choices, nested sections, ``dict[str, str]``), then each section's own
``validate()``. Unknown keys raise ``ValueError`` naming the key and listing the allowed ones.

Typical use (an entry script)::

    cfg = sevjax.config.parse_cli(TrainConfig, sys.argv[1:])
    # python train.py --config configs/tiny.yaml --set optim.lr=3e-4 --set mesh.data=2
"""

from __future__ import annotations

import argparse
import dataclasses
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
        ValueError: on unknown keys (listing allowed keys) or invalid values (listing choices).
    """
    data = to_dict(schema_cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        overlay = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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


def parse_cli(schema_cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Parses ``--config PATH`` and repeated ``--set key=value`` into a validated config.

    Args:
        schema_cls: the schema to load.
        argv: command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The loaded config (see :func:`load`).
    """
    parser = argparse.ArgumentParser(
        description=schema_cls.__doc__.splitlines()[0] if schema_cls.__doc__ else None
    )
    parser.add_argument("--config", default=None, help="YAML overlay on the defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    args = parser.parse_args(argv)
    return load(schema_cls, args.config, args.overrides)


# ---------------------------------------------------------------------------------------------
# The training schema. Its defaults are the tiny CPU run (configs/tiny.yaml restates them).
# ---------------------------------------------------------------------------------------------

WEIGHTING_PRESETS = ("uniform", "linear", "balanced")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    """The LM: a pretrained checkpoint, or a random-init model of the given sizes."""

    name_or_path: str | None = None  # HF Hub id or local dir; None = random init below
    tokenizer: str | None = None  # default: name_or_path, or a BPE trained on the data
    model_type: Literal["gpt2", "llama", "qwen2"] = "gpt2"  # random init only
    layers: int = 2
    width: int = 128
    heads: int = 4
    kv_heads: int | None = None  # llama/qwen2 only; None = heads
    vocab_size: int = 1024  # random init: also the BPE tokenizer's size
    max_positions: int = 512
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute; params stay float32

    def validate(self) -> None:
        for name in ("layers", "width", "heads", "vocab_size", "max_positions"):
            positive(f"model.{name}", getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be a multiple of heads={self.heads}")


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    """Where the (annotated) examples come from and how they become token batches."""

    path: str | None = None  # csv/json/jsonl/parquet or Hub id; None = the embedded set
    columns: dict[str, str] | None = None  # our field -> the file's column
    template: str = "الشكوى: {complaint}\nالرد: "  # prompt when there is no chat template
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    buckets: tuple[int, ...] = (64, 128, 256)  # padded lengths; the largest is the max length
    pack: bool = False  # several examples per row (segment ids, per-token weights)
    batch_size: int = 16  # rows per micro-batch, across all devices
    max_train_examples: int | None = None  # a deterministic subset, for quick runs
    max_eval_examples: int | None = None

    def validate(self) -> None:
        if not self.buckets or min(self.buckets) < 2:
            raise ValueError(f"data.buckets must be lengths >= 2, got {self.buckets}")
        positive("data.batch_size", self.batch_size)
        if "{complaint}" not in self.template:
            raise ValueError(f"data.template must contain {{complaint}}, got {self.template!r}")


@dataclasses.dataclass(frozen=True)
class LossSection(Section):
    """``ce`` (plain token mean) or ``severity`` (per-example weights from severity probs)."""

    mode: Literal["ce", "severity"] = "severity"
    weighting: str | tuple[float, ...] = "linear"  # uniform | linear | balanced | [w1, w2, w3]
    normalize: Literal["tokens", "weighted", "sequence"] = "tokens"
    z_loss: float = 0.0
    chunked_vocab_threshold: int = 65536  # vocab sizes above this use the chunked loss
    chunk_size: int = 2048  # tokens per chunk of the chunked loss

    def validate(self) -> None:
        if isinstance(self.weighting, str):
            choice("loss.weighting", self.weighting, WEIGHTING_PRESETS + ("<list of 3 numbers>",))
        elif len(self.weighting) != 3 or min(self.weighting) <= 0:
            raise ValueError(f"loss.weighting: expected 3 positive numbers, got {self.weighting}")
        positive("loss.z_loss", self.z_loss, allow_zero=True)
        positive("loss.chunk_size", self.chunk_size)


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
    """AdamW with warmup and decay; gradient accumulation over ``grad_accum`` micro-batches."""

    lr: float = 2e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.01  # not applied to norms, biases and embeddings
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = off
    grad_accum: int = 1

    def validate(self) -> None:
        positive("optim.lr", self.lr)
        positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        positive("optim.grad_accum", self.grad_accum)
        positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    """Device mesh sizes; one may be -1 (the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be >= 1 with at most one -1, got {sizes}")


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
    """Orbax checkpoints under ``<run_dir>/checkpoints``."""

    every: int = 100  # steps; the last step is always saved
    keep: int = 2
    async_save: bool = True
    resume: bool = True  # resume from the latest checkpoint in run_dir

    def validate(self) -> None:
        positive("checkpoint.every", self.every)
        positive("checkpoint.keep", self.keep)


@dataclasses.dataclass(frozen=True)
class LogSection(Section):
    """JSONL + TensorBoard every ``every`` steps, a progress bar and a loss-curve PNG."""

    every: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def validate(self) -> None:
        positive("log.every", self.every)


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    """Validation loss / perplexity, overall and per severity."""

    every: int = 50  # steps; also before the first step and after the last
    batch_size: int = 32

    def validate(self) -> None:
        positive("eval.every", self.every)
        positive("eval.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """Severity-aware LM fine-tuning (``python train.py``; defaults = the tiny CPU run)."""

    run_dir: str = "runs/tiny"
    seed: int = 0
    steps: int = 200
    export_hf: bool = True  # write <run_dir>/hf at the end
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def validate(self) -> None:
        positive("steps", self.steps)
        if self.data.pack and self.loss.normalize == "sequence":
            raise ValueError(
                "loss.normalize='sequence' needs one example per row; "
                "set data.pack=false or another loss.normalize"
            )
        if self.model.name_or_path is None and max(self.data.buckets) > self.model.max_positions:
            raise ValueError(
                f"max(data.buckets)={max(self.data.buckets)} exceeds "
                f"model.max_positions={self.model.max_positions}"
            )
