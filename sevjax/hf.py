"""Hugging Face checkpoint import and export, driven by each family's ``hf_param_table``.

One table per family lists :class:`sevjax.models.hf_table.HFParam` rows (HF key, our per-layer
path, transpose, HF shape); :func:`load_pretrained` and :func:`save_pretrained` both read it, so
the two directions cannot drift apart, and :func:`sevjax.models.hf_table.locate` maps per-layer
paths onto slices of a scanned model's stacked parameters. Safetensors are read and written with
a small built-in reader/writer on NumPy memory maps (bfloat16 via ``ml_dtypes``), one tensor at a
time, so a large checkpoint never sits whole in host memory. ``torch`` is imported only for
legacy ``pytorch_model.bin`` files. :func:`read_config` reads only ``config.json``.
"""

from __future__ import annotations

import functools
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
from sevjax.distributed import is_main
from sevjax.models import hf_table
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
        for index, single, add in (
            ("model.safetensors.index.json", "model.safetensors", self._add_safetensors),
            ("pytorch_model.bin.index.json", "pytorch_model.bin", self._add_torch),
        ):
            if (directory / index).exists():
                weight_map = json.loads((directory / index).read_text())["weight_map"]
                for name in sorted(set(weight_map.values())):
                    add(directory / name)
                return
            if (directory / single).exists():
                return add(directory / single)
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

            self._register(key, shape, read)

    def _add_torch(self, path: Path) -> None:
        import torch

        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, t in tensors.items():

            def read(t=t):
                if t.dtype == torch.bfloat16:
                    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                return t.numpy()

            self._register(key, tuple(t.shape), read)

    def _register(self, key: str, shape: tuple[int, ...], read: Callable[[], np.ndarray]) -> None:
        key = hf_table.canonical_key(key)  # legacy names renamed as transformers does on load
        self.shapes[key], self._readers[key] = shape, read

    def read(self, key: str) -> np.ndarray:
        return self._readers[key]()


def _resolve(path_or_repo_id: str | Path) -> Path:
    path = Path(path_or_repo_id)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
    local = _from_hub(path_or_repo_id, snapshot_download, allow_patterns=patterns)
    if not any(local.glob("*.safetensors")):
        local = _from_hub(path_or_repo_id, snapshot_download, allow_patterns=["*.bin", "*.json"])
    return local


def _from_hub(repo: str | Path, download: Callable[..., str], **kw: Any) -> Path:
    try:
        return Path(download(str(repo), **kw))
    except Exception as e:  # any Hub failure (offline, bad id, no access) means "not found"
        raise FileNotFoundError(
            f"{repo} is neither a local directory nor a downloadable Hub repo: {e}"
        ) from e


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _architecture(module: Any, config: Any) -> str:
    arch = module.HF_ARCHITECTURE
    return arch if isinstance(arch, str) else arch[models.model_type_of(config)]


# -------------------------------------------------------------------------------------- import


def read_config(path_or_repo_id: str | Path) -> Any:
    """Our config dataclass from a checkpoint's ``config.json`` (reads no weights).

    Args:
        path_or_repo_id: a local directory, or a Hub repo id when no such path exists.

    Raises:
        FileNotFoundError: no config.json there.
        ValueError: unsupported ``model_type``.
    """
    path = Path(path_or_repo_id)
    if not path.exists():
        from huggingface_hub import hf_hub_download

        path = _from_hub(path_or_repo_id, hf_hub_download, filename="config.json").parent
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    return models.config_from_hf(json.loads((path / "config.json").read_text()))


def load_pretrained(
    path_or_repo_id: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    options: models.ModelOptions | None = None,
    seed: int = 0,
) -> tuple[nnx.Module, Any]:
    """Loads an HF checkpoint (``config.json`` + safetensors / ``pytorch_model.bin``), eval mode.

    The model is built abstractly; each tensor is then read from its memory map, transposed /
    reshaped as the family's table says, cast to ``param_dtype`` and placed straight onto its
    target sharding (with ``mesh``, each device's slice is read separately; for a scanned model
    each device reads its slice of every layer, so no host ever holds a whole stacked tensor) or
    the default device. Parameters named by the family's ``HF_NEW_IF_MISSING`` that the
    checkpoint lacks, and non-parameter state (RNG streams), are freshly initialised.

    Args:
        path_or_repo_id: a local directory, or a Hub repo id when no such path exists.
        dtype: compute dtype of the model.
        param_dtype: storage dtype of the parameters.
        mesh: optional device mesh.
        options: layout and kernels (:class:`sevjax.models.ModelOptions`).
        seed: seed for freshly initialised parameters.

    Returns:
        (model, config); dropout is off (``nnx.view(model, deterministic=False)`` turns it on).

    Raises:
        FileNotFoundError: no config.json / weights.
        ValueError: unsupported model_type, missing/unexpected keys or a wrong shape (named).
    """
    directory = _resolve(path_or_repo_id)
    config = read_config(directory)
    module = models.family(models.model_type_of(config))
    ckpt = _Checkpoint(directory)
    cls = models.model_class(config)

    kw = dict(dtype=dtype, param_dtype=param_dtype, options=options)
    factory = lambda: cls(config, **kw, rngs=nnx.Rngs(seed))  # noqa: E731

    graphdef, abstract = nnx.split(nnx.eval_shape(factory))
    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh))) if mesh else {}
    flat = {_path_str(p): (p, v) for p, v in nnx.to_flat_state(abstract)}

    plan = _match(module, config, ckpt, flat)
    fresh = [p for p in flat if p not in plan]
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
    for ours, entries in plan.items():
        path, var = flat[ours]
        sharding = shardings[path].get_value() if mesh else None
        values[ours] = _place(ckpt, entries, var.get_value(), sharding)
    state = nnx.from_flat_state([(path, var.replace(values[p])) for p, (path, var) in flat.items()])
    return nnx.merge(graphdef, state), config


def _place(ckpt: _Checkpoint, entries: list, abstract: Any, sharding: Any) -> jax.Array:
    """One parameter from its checkpoint tensor(s): one entry, or one per layer when stacked."""
    shape, dtype = tuple(abstract.shape), abstract.dtype
    stacked = entries[0][2] is not None
    per_layer = shape[1:] if stacked else shape

    def view(j: int) -> np.ndarray:  # lazy (memory-mapped) view in our per-layer layout
        row, key, _ = entries[j]
        return hf_table.to_ours(row, ckpt.read(key), per_layer)

    if sharding is None:
        if not stacked:
            return jax.device_put(np.ascontiguousarray(view(0)).astype(dtype), jax.devices()[0])
        host = np.empty(shape, dtype)
        for j in range(shape[0]):
            host[j] = view(j)
        return jax.device_put(host, jax.devices()[0])

    def read(idx: tuple[slice, ...]) -> np.ndarray:  # one device's slice (multi-host safe)
        if not stacked:
            return np.ascontiguousarray(view(0)[idx]).astype(dtype)
        return np.stack(
            [np.asarray(view(j)[idx[1:]]).astype(dtype) for j in range(shape[0])[idx[0]]]
        )

    return jax.make_array_from_callback(shape, sharding, read)


def _match(module: Any, config: Any, ckpt: _Checkpoint, flat: dict) -> dict[str, list]:
    """Checks key sets and shapes; returns ``our_path -> [(row, checkpoint key, layer)]``."""
    prefix = module.HF_BASE_PREFIX
    keys = set(ckpt.shapes)
    base_only = prefix and not any(k.startswith(prefix) for k in keys)
    plan: dict[str, list] = {}
    missing, mapped = [], set()
    for row in module.hf_param_table(config):
        try:
            ours, layer = hf_table.locate(row.path, flat)
        except KeyError:
            raise ValueError(
                f"HF table names {row.path} for {row.hf_key}, but the model has no such param"
            ) from None
        mapped.add(ours)
        key = row.hf_key
        key = key[len(prefix) :] if base_only and key.startswith(prefix) else key
        if key not in keys:
            if not any(row.path.startswith(p) for p in module.HF_NEW_IF_MISSING):
                missing.append(key)
            continue
        shape = tuple(flat[ours][1].get_value().shape)
        expected = hf_table.expected_hf_shape(row, shape if layer is None else shape[1:])
        if ckpt.shapes[key] != expected:
            raise ValueError(
                f"checkpoint tensor {key} has shape {ckpt.shapes[key]} but {row.path} needs "
                f"{expected}"
            )
        plan.setdefault(ours, []).append((row, key, layer))
    if missing:
        raise ValueError(f"checkpoint is missing keys: {', '.join(missing)}")
    for entries in plan.values():
        entries.sort(key=lambda e: -1 if e[2] is None else e[2])
    used = {key for entries in plan.values() for _, key, _ in entries}
    unexpected = [
        k for k in sorted(keys - used) if not any(re.fullmatch(r, k) for r in module.HF_IGNORE)
    ]
    if unexpected:
        raise ValueError(f"checkpoint has unexpected keys: {', '.join(unexpected)}")
    params = {p for p, (_, v) in flat.items() if isinstance(v, nnx.Param)}
    if params - mapped:
        raise ValueError(f"model params missing from the HF table: {sorted(params - mapped)}")
    return plan


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


@functools.cache
def _replicator(mesh: jax.sharding.Mesh) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Identity whose output is replicated on every device of ``mesh`` (one compile per shape)."""
    return jax.jit(
        lambda a: a, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )


def gather(arr: jax.Array, layer: int | None = None) -> np.ndarray:
    """One parameter (or one layer of a stacked one) as a host array, fetched on its own.

    A parameter spread over other processes' devices is first replicated by a per-tensor jit,
    so every process must make the same calls in the same order.
    """
    if not arr.is_fully_addressable:
        arr = _replicator(arr.sharding.mesh)(arr if layer is None else arr[layer])
        return np.asarray(arr.addressable_data(0))
    return np.asarray(jax.device_get(arr if layer is None else arr[layer]))


def _write_safetensors(
    path: Path | None,
    entries: list[tuple[str, tuple[int, ...]]],
    np_dtype: np.dtype,
    fetch: Callable[[str], np.ndarray],
) -> int:
    """Streams tensors (fetched one at a time) to ``path``; returns the bytes of tensor data.

    ``path=None`` fetches without writing (the other processes of a multi-process export).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * np_dtype.itemsize
        header[name] = {
            "dtype": _ST_NAMES[np_dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f = None if path is None else open(path, "wb")
    try:
        if f is not None:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
        for name, shape in entries:
            arr = fetch(name)
            if arr.shape != tuple(shape) or arr.dtype != np_dtype:
                raise ValueError(f"{name}: fetched {arr.shape} {arr.dtype}, header says {shape}")
            if f is not None:
                f.write(arr.tobytes())
    finally:
        if f is not None:
            f.close()
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
    when ``tokenizer`` is given. Tied embeddings are written once. Tensors are fetched and
    written one at a time (one layer of a scanned parameter at a time), so host memory holds a
    single tensor. With parameters sharded over several processes, EVERY process must call this
    function (each tensor is gathered by a collective); only process 0 writes files.

    Args:
        model: a model of our families (unrolled or scanned).
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
    writer = is_main()
    module = models.family(models.model_type_of(config))
    flat = {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    plan = _export_plan(module.hf_param_table(config), flat)
    named = _TORCH_DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    np_dtype = np.dtype(next(iter(flat.values())).dtype if dtype is None else named)
    if np_dtype.type not in _TORCH_DTYPE_NAMES.values():
        raise ValueError(f"cannot export dtype {np_dtype}; use one of {list(_TORCH_DTYPE_NAMES)}")

    def fetch(key: str) -> np.ndarray:
        row, ours, layer, _ = plan[key]
        arr = hf_table.to_hf(row, gather(flat[ours], layer))
        return np.ascontiguousarray(arr.astype(np_dtype))

    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, (*_, shape) in plan.items():
        nbytes = math.prod(shape) * np_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for old in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
            old.unlink()
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    total = sum(
        _write_safetensors(out / name if writer else None, entries, np_dtype, fetch)
        for name, entries in zip(names, shards)
    )
    if writer:
        if len(shards) > 1:
            weight_map = {k: name for name, entries in zip(names, shards) for k, _ in entries}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_configs(out, module, config, np_dtype, tokenizer)
    return out


def _export_plan(table: list, flat: dict[str, Any]) -> dict[str, tuple]:
    """``hf_key -> (row, our path, layer, HF shape)``; checks that table and model agree."""
    plan, unknown = {}, []
    for row in table:
        try:
            ours, layer = hf_table.locate(row.path, flat)
        except KeyError:
            unknown.append(row.path)
            continue
        shape = tuple(flat[ours].shape)[0 if layer is None else 1 :]  # per layer
        plan[row.hf_key] = (row, ours, layer, hf_table.expected_hf_shape(row, shape))
    missing = set(flat) - {ours for _, ours, _, _ in plan.values()}
    if unknown or missing:
        raise ValueError(
            f"HF table and model params differ: not in model {sorted(unknown)}, "
            f"not in table {sorted(missing)}"
        )
    return plan


def _write_configs(out: Path, module: Any, config: Any, np_dtype: np.dtype, tokenizer: Any) -> None:
    """config.json, generation_config.json (language models) and the tokenizer files."""
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
