"""The row type of the per-family HF tables and the rules that read a table in both directions.

Each family's ``hf_param_table(config)`` lists one :class:`HFParam` per HF tensor, always with
per-layer paths (``layers.3.attn.c_attn.kernel``), whatever the model's layout. For a scanned
model (:mod:`sevjax.models.stack`) :func:`locate` maps that path onto slice 3 of the stacked
parameter ``layers.attn.c_attn.kernel`` [L, ...]. :func:`to_ours` / :func:`to_hf` convert one
tensor between the checkpoint's layout and ours (transpose of a torch ``nn.Linear`` [out, in],
then a C-order reshape when we keep heads as their own dimensions), so import and export are
the same table read forwards and backwards.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.*)$")
# TF-era names that transformers renames on load (its "legacy" WeightRenaming rules), e.g. in
# bert-base-multilingual-cased
LEGACY_RENAMES = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))


class HFParam(NamedTuple):
    """One HF tensor and where it lives in our model.

    Attributes:
        hf_key: the key in the HF checkpoint.
        path: our dot-joined parameter path, per layer (``layers.{i}.<block path>``).
        transpose: the HF tensor is a torch ``nn.Linear`` weight [out, in] (ours is [in, out]).
        hf_shape: the HF tensor's own shape when ours is a C-order reshape of it (of its
          transpose for ``transpose`` rows), e.g. GPT-2's ``c_attn`` [D, 3D] that we store
          [D, 3, N, H]; None when ours is the tensor (or its transpose) as is.
    """

    hf_key: str
    path: str
    transpose: bool = False
    hf_shape: tuple[int, ...] | None = None


def canonical_key(key: str) -> str:
    """A checkpoint key with :data:`LEGACY_RENAMES` applied (``x.LayerNorm.gamma`` ->
    ``x.LayerNorm.weight``)."""
    for old, new in LEGACY_RENAMES:
        key = key.replace(old, new)
    return key


def locate(path: str, params: dict[str, Any]) -> tuple[str, int | None]:
    """(parameter path in ``params``, layer index or None) for a table path.

    ``layers.3.x.kernel`` names ``layers.x.kernel`` slice 3 when only the stacked form exists.

    Raises:
        KeyError: if neither form exists.
    """
    if path in params:
        return path, None
    m = _LAYER.match(path)
    if m and f"{m[1]}.{m[3]}" in params:
        return f"{m[1]}.{m[3]}", int(m[2])
    raise KeyError(path)


def expected_hf_shape(row: HFParam, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for our per-layer shape ``ours``."""
    if row.hf_shape is not None:
        return tuple(row.hf_shape)
    return tuple(ours[::-1]) if row.transpose else tuple(ours)


def to_ours(row: HFParam, x: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """An HF tensor (or any array laid out like one) in our per-layer layout ``ours``."""
    x = x.T if row.transpose else x
    return x.reshape(ours) if row.hf_shape is not None else x


def to_hf(row: HFParam, x: np.ndarray) -> np.ndarray:
    """Our per-layer tensor in the HF layout (inverse of :func:`to_ours`)."""
    if row.hf_shape is not None:
        flat = row.hf_shape[::-1] if row.transpose else row.hf_shape
        x = x.reshape(flat)
    return x.T if row.transpose else x
