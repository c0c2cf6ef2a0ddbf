"""PEFT LoRA adapters in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

What :func:`save_adapter` writes is what ``peft.PeftModel.from_pretrained(base, directory)``
loads onto the ``transformers`` base model: for every adapted module and layer,
``base_model.model.<HF module>.lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] (float32),
the HF module path read from the family's ``hf_param_table`` (the kernel's HF key without
``.weight``), so any family built on ``layers.Dense`` gets adapters without code of its own.
Our A [prod(in), r] and B [r, prod(out)] flatten the kernel's dims in C order, which is exactly
the HF layout of the torch weight whenever the table row is a plain transpose (``nn.Linear``,
``fan_in_fan_out=false``) or no transpose (GPT-2's ``Conv1D``, ``fan_in_fan_out=true``) followed
by a C-order reshape; :func:`_entries` checks that for every row and refuses anything else.
:func:`load_adapter` reads such a directory back into a model that :func:`sevjax.lora.apply`
equipped with the same rank, alpha and targets.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from sevjax import hf, lora, models
from sevjax.distributed import is_main
from sevjax.models import hf_table
from sevjax.models.layers import Dense

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_IN_LAYER = re.compile(
    r"^.*?\.\d+\.(.*)$"
)  # "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"


class _Entry(NamedTuple):
    """One adapted module of one layer."""

    hf_module: str  # e.g. model.layers.3.self_attn.q_proj
    dense: Dense
    layer: int | None  # slice of a scanned (stacked) adapter, None unrolled
    fan_in_fan_out: bool  # the HF weight is [in, out] (Conv1D)


def _check_layout(row: hf_table.HFParam, shape: tuple[int, ...], n_in: int) -> None:
    """Raises unless our kernel [*in, *out] flattened in C order is the HF weight (transposed)."""
    n_out = math.prod(shape[n_in:])
    idx = np.arange(math.prod(shape)).reshape(shape)
    flat = idx.reshape(math.prod(shape[:n_in]), n_out)  # (in, out)
    if not np.array_equal(hf_table.to_hf(row, idx), flat.T if row.transpose else flat):
        raise ValueError(
            f"{row.hf_key}: the HF layout is not a plain (transposed) reshape of our kernel "
            f"{shape}; PEFT adapters are not supported for it"
        )


def _entries(model: nnx.Module, config: Any, *, adapted: bool = True) -> list[_Entry]:
    """Every LoRA-equipped Dense and layer (or, ``adapted=False``, every block Dense and layer)
    with its HF module path, in table order."""
    denses = lora.lora_denses(model) if adapted else lora.block_denses(model)
    kernels = {f"{path}.kernel": dense for path, _, dense in denses}
    out, covered = [], set()
    for row in models.family(models.model_type_of(config)).hf_param_table(config):
        try:
            ours, layer = hf_table.locate(row.path, kernels)
        except KeyError:
            continue
        dense = kernels[ours]
        shape = tuple(dense.kernel.get_value().shape)[0 if layer is None else 1 :]
        _check_layout(row, shape, dense.n_in)
        if not row.hf_key.endswith(".weight"):
            raise ValueError(f"{row.hf_key}: expected an HF key ending in .weight")
        out.append(_Entry(row.hf_key[: -len(".weight")], dense, layer, not row.transpose))
        covered.add(ours)
    if covered != set(kernels):
        raise ValueError(f"the HF table has no rows for {sorted(set(kernels) - covered)}")
    return out


def _target_modules(model: nnx.Module, config: Any, entries: list[_Entry]) -> list[str]:
    """PEFT ``target_modules``: a module's last name when every block module of that name is
    adapted (``q_proj``), else its path inside the layer (``attn.c_proj``)."""

    def rel(e: _Entry) -> str:
        m = _IN_LAYER.match(e.hf_module)
        return m[1] if m else e.hf_module

    adapted = {rel(e) for e in entries}
    every = {rel(e) for e in _entries(model, config, adapted=False)}
    names = set()
    for r in adapted:
        last = r.rsplit(".", 1)[-1]
        same = {x for x in every if x.rsplit(".", 1)[-1] == last}
        names.add(last if same <= adapted else r)
    return sorted(names)


def adapter_config(model: nnx.Module, config: Any) -> dict[str, Any]:
    """The ``adapter_config.json`` dict of ``model``'s adapters (PEFT ``LoraConfig`` fields)."""
    spec = model.lora_spec
    entries = _entries(model, config)
    fan = {e.fan_in_fan_out for e in entries}
    if len(fan) != 1:
        raise ValueError("adapted modules mix nn.Linear and Conv1D layouts; PEFT needs one")
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _target_modules(model, config, entries),
        "fan_in_fan_out": fan.pop(),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nnx.Module, config: Any, out_dir: str | Path) -> Path:
    """Writes ``model``'s adapters as a PEFT adapter directory (process 0 writes; with adapters
    spread over several processes every process must call this).

    Args:
        model: a model with LoRA branches (:func:`sevjax.lora.apply`).
        config: its config.
        out_dir: the directory (created); ``adapter_config.json`` and
            ``adapter_model.safetensors`` are (over)written.

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.numpy import save_file

    if not lora.has_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    out = Path(out_dir)
    tensors = {}
    for e in _entries(model, config):
        key = f"{PREFIX}{e.hf_module}"
        a = hf.gather(e.dense.lora.lora_a.get_value(), e.layer).astype(np.float32)  # (in, r)
        b = hf.gather(e.dense.lora.lora_b.get_value(), e.layer).astype(np.float32)  # (r, out)
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)  # (r, in)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.T)  # (out, r)
    settings = adapter_config(model, config)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return out


def _check_config(found: dict[str, Any], spec: lora.LoRASpec, directory: Path) -> None:
    """Raises unless the adapter's settings are ones this model's adapters reproduce."""
    problems = []
    if found.get("peft_type") != "LORA":
        problems.append(f"peft_type {found.get('peft_type')!r} (only LORA is supported)")
    if found.get("r") != spec.rank:
        problems.append(f"r={found.get('r')} but model.lora.rank={spec.rank}")
    if float(found.get("lora_alpha", -1)) != spec.alpha:
        problems.append(f"lora_alpha={found.get('lora_alpha')} but model.lora.alpha={spec.alpha}")
    for key in ("use_rslora", "use_dora"):
        if found.get(key):
            problems.append(f"{key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if found.get(key):
            problems.append(f"a non-empty {key} is not supported")
    if found.get("bias", "none") != "none":
        problems.append(f"bias={found.get('bias')!r} is not supported (only 'none')")
    if problems:
        raise ValueError(f"PEFT adapter {directory}: " + "; ".join(problems))


def load_adapter(model: nnx.Module, config: Any, directory: str | Path) -> nnx.Module:
    """Sets ``model``'s adapters (in place, keeping their shardings) from a PEFT adapter dir.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` / ``adapter_model.safetensors``.
        ValueError: settings other than the model's (rank, alpha, rsLoRA, DoRA, bias), keys the
            model's targets do not produce or lack, or wrong shapes.
    """
    from safetensors.numpy import load_file

    path = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"no {name} in PEFT adapter directory {path}")
    _check_config(json.loads((path / CONFIG_FILE).read_text()), model.lora_spec, path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    entries = _entries(model, config)
    wanted = {f"{PREFIX}{e.hf_module}.lora_{x}.weight" for e in entries for x in "AB"}
    if set(tensors) != wanted:
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        raise ValueError(
            f"PEFT adapter {path} does not match model.lora.targets: missing {missing[:6]}, "
            f"unexpected {extra[:6]}"
        )
    by_dense: dict[int, list[_Entry]] = {}
    for e in entries:
        by_dense.setdefault(id(e.dense), []).append(e)
    for group in by_dense.values():
        group.sort(key=lambda e: e.layer or 0)
        adapter = group[0].dense.lora
        for var, x in ((adapter.lora_a, "A"), (adapter.lora_b, "B")):
            keys = [f"{PREFIX}{e.hf_module}.lora_{x}.weight" for e in group]
            ours = [tensors[k].T for k in keys]  # A (in, r), B (r, out)
            _set(var, np.stack(ours) if group[0].layer is not None else ours[0], keys[0])
    return model


def _set(var: nnx.Variable, value: np.ndarray, key: str) -> None:
    """Replaces a variable's value by a host array, on the same sharding."""
    old = var.get_value()
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(
            f"{key}: the adapter's tensors give {value.shape}, the model needs {old.shape}"
        )
    value = np.ascontiguousarray(value.astype(old.dtype))
    var.set_value(jax.make_array_from_callback(value.shape, old.sharding, lambda i: value[i]))
