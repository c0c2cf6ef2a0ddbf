"""Hugging Face checkpoint import and export, driven by each family's ``hf_param_table``.

One table per family maps ``(hf_key, our_path, transpose)``; :func:`load` and
:func:`save_pretrained` both read it, so the two directions cannot drift apart. Safetensors are
read and written with a small built-in reader/writer on NumPy memory maps (bfloat16 via
``ml_dtypes``), one tensor at a time, so a large checkpoint never sits whole in host memory.
``torch`` is imported only for legacy ``pytorch_model.bin`` files.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sevjax import models
from sevjax.sharding import state_shardings

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_TORCH_DTYPE_NAMES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ------------------------------------------------------------------------------ reading tensors


class _Checkpoint:
    """Lazy view of a checkpoint's tensors: ``shapes`` from headers, ``read(key)`` one tensor."""

    def __init__(self, directory: Path):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._readers: dict[str, Callable[[], np.ndarray]] = {}
        st_index, st_single = (
            directory / "model.safetensors.index.json",
            directory / "model.safetensors",
        )
        bin_index, bin_single = (
            directory / "pytorch_model.bin.index.json",
            directory / "pytorch_model.bin",
        )
        if st_index.exists():
            for name in sorted(set(json.loads(st_index.read_text())["weight_map"].values())):
                self._add_safetensors(directory / name)
        elif st_single.exists():
            self._add_safetensors(st_single)
        elif bin_index.exists():
            for name in sorted(set(json.loads(bin_index.read_text())["weight_map"].values())):
                self._add_torch(directory / name)
        elif bin_single.exists():
            self._add_torch(bin_single)
        else:
            raise FileNotFoundError(
                f"no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in {directory}"
            )

    def _add_safetensors(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"checkpoint shard {path} named in the index does not exist")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])

            def read(path=path, offset=8 + n + start, shape=shape, dtype=dtype, size=end - start):
                if size == 0:
                    return np.zeros(shape, dtype)
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

            self.shapes[key] = shape
            self._readers[key] = read

    def _add_torch(self, path: Path) -> None:
        import torch

        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, t in tensors.items():

            def read(t=t):
                if t.dtype == torch.bfloat16:
                    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                return t.numpy()

            self.shapes[key] = tuple(t.shape)
            self._readers[key] = read

    def read(self, key: str) -> np.ndarray:
        return self._readers[key]()


def _resolve(path_or_repo_id: str | Path) -> Path:
    path = Path(path_or_repo_id)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
    try:
        local = snapshot_download(str(path_or_repo_id), allow_patterns=patterns)
    except Exception as e:  # any Hub failure (offline, bad id, no access) means "not found"
        raise FileNotFoundError(
            f"{path_or_repo_id} is neither a local directory nor a downloadable Hub repo: {e}"
        ) from e
    local = Path(local)
    if not any(local.glob("*.safetensors")):
        local = Path(snapshot_download(str(path_or_repo_id), allow_patterns=["*.bin", "*.json"]))
    return local


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _architecture(module: Any, config: Any) -> str:
    arch = module.HF_ARCHITECTURE
    return arch if isinstance(arch, str) else arch[models.model_type_of(config)]


# -------------------------------------------------------------------------------------- import


def load(
    path_or_repo_id: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
) -> tuple[nnx.Module, Any]:
    """Loads an HF checkpoint (``config.json`` + safetensors / ``pytorch_model.bin``).

    The model is built abstractly; each tensor is then read from its memory map, transposed
    when the table says so, cast to ``param_dtype`` and placed straight onto its target sharding
    (with ``mesh``, each device's slice is read separately) or the default device. Parameters named by the family's ``HF_NEW_IF_MISSING`` that the checkpoint lacks, and
    non-parameter state (RNG streams), are freshly initialised.

    Args:
        path_or_repo_id: a local directory, or a Hub repo id when no such path exists.
        dtype: compute dtype of the model.
        param_dtype: storage dtype of the parameters.
        mesh: optional device mesh.
        seed: seed for freshly initialised parameters.

    Returns:
        (model, config).

    Raises:
        FileNotFoundError: no config.json / weights.
        ValueError: unsupported model_type, missing or unexpected keys, or a wrong shape (the
          message names the key and both shapes).
    """
    directory = _resolve(path_or_repo_id)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    config = models.config_from_hf(json.loads(config_path.read_text()))
    module = models.family(models.model_type_of(config))
    ckpt = _Checkpoint(directory)
    cls = models.model_class(config)

    def factory():
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(factory))
    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh))) if mesh else None
    flat = {_path_str(p): (p, v) for p, v in nnx.to_flat_state(abstract)}

    plan = _match(module, config, ckpt, flat)
    fresh = [p for p, v in flat.items() if p not in plan]
    for p in fresh:
        if isinstance(flat[p][1], nnx.Param):
            print(f"sevjax.hf: {p} is not in {directory}; initialised fresh")
    values: dict[str, Any] = {}
    if fresh:
        wanted = {flat[p][0] for p in fresh}

        def init():
            state = nnx.split(factory())[1]
            return {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(state) if p in wanted}

        out_sh = {p: shardings[flat[p][0]].get_value() for p in fresh} if mesh else None
        values.update(jax.jit(init, out_shardings=out_sh)())
    for ours, (hf_key, transpose) in plan.items():
        src = ckpt.read(hf_key)  # memory-mapped; .T is a view
        src = src.T if transpose else src
        dtype = flat[ours][1].get_value().dtype
        if mesh is None:
            values[ours] = jax.device_put(np.ascontiguousarray(src).astype(dtype), jax.devices()[0])
        else:  # each device reads only its own slice of the file (multi-host safe)
            values[ours] = jax.make_array_from_callback(
                src.shape,
                shardings[flat[ours][0]].get_value(),
                lambda idx, src=src, dtype=dtype: np.ascontiguousarray(src[idx]).astype(dtype),
            )
        del src
    state = nnx.from_flat_state([(path, var.replace(values[p])) for p, (path, var) in flat.items()])
    return nnx.merge(graphdef, state), config


def _match(module: Any, config: Any, ckpt: _Checkpoint, flat: dict) -> dict[str, tuple[str, bool]]:
    """Checks key sets and shapes; returns ``our_path -> (checkpoint key, transpose)``."""
    table = module.hf_param_table(config)
    prefix = module.HF_BASE_PREFIX
    keys = set(ckpt.shapes)
    base_only = prefix and not any(k.startswith(prefix) for k in keys)
    plan: dict[str, tuple[str, bool]] = {}
    missing = []
    for hf_key, ours, transpose in table:
        if ours not in flat:
            raise ValueError(f"HF table names {ours} for {hf_key}, but the model has no such param")
        key = hf_key[len(prefix) :] if base_only and hf_key.startswith(prefix) else hf_key
        if key not in keys:
            if not any(ours.startswith(p) for p in module.HF_NEW_IF_MISSING):
                missing.append(key)
            continue
        expected = tuple(flat[ours][1].get_value().shape)
        expected = expected[::-1] if transpose else expected
        if ckpt.shapes[key] != expected:
            raise ValueError(
                f"checkpoint tensor {key} has shape {ckpt.shapes[key]} but {ours} needs {expected}"
            )
        plan[ours] = (key, transpose)
    if missing:
        raise ValueError(f"checkpoint is missing keys: {', '.join(missing)}")
    used = {k for k, _ in plan.values()}
    unexpected = [
        k for k in sorted(keys - used) if not any(re.fullmatch(r, k) for r in module.HF_IGNORE)
    ]
    if unexpected:
        raise ValueError(f"checkpoint has unexpected keys: {', '.join(unexpected)}")
    params = {p for p, (_, v) in flat.items() if isinstance(v, nnx.Param)}
    unmapped = params - {ours for _, ours, _ in table}
    if unmapped:
        raise ValueError(f"model params missing from the HF table: {sorted(unmapped)}")
    return plan


load_pretrained = load


# -------------------------------------------------------------------------------------- export


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not like '2GB', '500MB' or an int")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _write_safetensors(path: Path, names: list[str], fetch: Callable[[str], np.ndarray]) -> int:
    """Writes tensors (fetched one at a time) to ``path``; returns the bytes of tensor data."""
    arrays = {}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        arr = arrays[name] = fetch(name)
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(arrays.pop(name).tobytes())
    return offset


def save_pretrained(
    model: nnx.Module,
    config: Any,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "2GB",
    dtype: Any = None,
) -> Path:
    """Writes an HF checkpoint that ``transformers`` ``from_pretrained`` loads without warnings.

    Writes ``config.json`` (with ``architectures`` and ``torch_dtype``/``dtype``), safetensors
    (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when larger than
    ``max_shard_size``), ``generation_config.json`` for language models, and the tokenizer files
    when ``tokenizer`` is given. Tied embeddings are written once.

    Args:
        model: a model of our families.
        config: its config.
        out_dir: output directory (created).
        tokenizer: optional HF tokenizer (anything with ``save_pretrained``).
        max_shard_size: bytes, or a string like "2GB" / "500MB".
        dtype: storage dtype ("float32", "bfloat16", "float16" or a jnp dtype); default: the
          parameters' own dtype.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = models.family(models.model_type_of(config))
    table = module.hf_param_table(config)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    mapped = {ours for _, ours, _ in table}
    if mapped != set(flat):
        raise ValueError(
            f"HF table and model params differ: not in model {sorted(mapped - set(flat))}, "
            f"not in table {sorted(set(flat) - mapped)}"
        )
    if dtype is None:
        np_dtype = np.dtype(next(iter(flat.values())).get_value().dtype)
    else:
        np_dtype = np.dtype(
            _TORCH_DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        )
    if np_dtype.type not in _TORCH_DTYPE_NAMES.values():
        raise ValueError(f"cannot export dtype {np_dtype}; use one of {list(_TORCH_DTYPE_NAMES)}")
    by_key = {hf_key: (ours, transpose) for hf_key, ours, transpose in table}

    def fetch(hf_key: str) -> np.ndarray:
        ours, transpose = by_key[hf_key]
        arr = np.asarray(jax.device_get(flat[ours].get_value())).astype(np_dtype)
        return np.ascontiguousarray(arr.T if transpose else arr)

    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for hf_key, ours, _ in table:
        nbytes = math.prod(flat[ours].get_value().shape) * np_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(hf_key)
        size += nbytes
    for old in list(out.glob("model*.safetensors")) + list(
        out.glob("model.safetensors.index.json")
    ):
        old.unlink()
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], fetch)
    else:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += _write_safetensors(out / name, names, fetch)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf_config = dict(config.to_hf_config())
    architecture = _architecture(module, config)
    dtype_name = {v: k for k, v in _TORCH_DTYPE_NAMES.items()}[np_dtype.type]
    hf_config.update(architectures=[architecture], torch_dtype=dtype_name, dtype=dtype_name)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if "CausalLM" in architecture or "LMHead" in architecture:
        gen = {"_from_model_config": True}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf_config.get(k) is not None:
                gen[k] = hf_config[k]
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
