"""Training throughput and MFU of sevjax's train step on one GPU (H100), largest batch that fits.

Usage: python benchmarks/gpu_mfu.py [--models aragpt2-medium qwen2.5-0.5b] [--seq 1024]
       [--start-batch 32] [--steps 10] [--time-budget 270] [--config-dir DIR]
       [--no-scan] [--remat none|full|dots] [--attention auto|xla|cudnn|reference]
       python benchmarks/gpu_mfu.py --tiny   # minuscule configs on CPU (smoke test only)

Models are random-init at the sizes of the published configs (``<config-dir>/<name>.json`` via
``sevjax.models.config_from_hf``), float32 parameters and AdamW state, bfloat16 compute, the real
step of the trainer on :class:`sevjax.train.LMTask` (severity-weighted loss; the chunked loss when
the vocabulary exceeds ``LossSection.chunked_vocab_threshold``, as training decides), with the
model options of a real run by default: scanned layers, no remat, ``attention=auto`` (cuDNN flash
attention on a GPU in bf16). For each model the batch
starts at ``--start-batch`` and halves while the step does not fit: XLA's compiled memory
(arguments + outputs + temporaries - aliased) above the device's ``bytes_limit``, or an
out-of-memory error at run time. The whole script stops searching once ``--time-budget`` seconds
are spent (about 5 minutes in all on an H100 by default).

Formula (stated once, used for every number)::

    flops_per_token = 6 * N + 12 * L * A * T
    MFU = flops_per_token * tokens / (peak_flops * seconds),  peak_flops = 989e12

N is the number of parameters that take part in a matmul (:func:`sevjax.plan.matmul_params`: every
``kernel``, per-head and scanned ones included, plus the LM head ``V * D`` counted once whether
tied to the embedding or not); the embedding lookups and position embeddings are not matmuls and
are left out. ``12 * L * A * T`` is the attention score
and value matmuls (forward + backward, ``A`` = heads x head_dim, ``T`` = sequence length,
counted over the full ``T x T`` square as PaLM's appendix B does, although the causal half is
masked). 989e12 is the H100 SXM dense bf16 peak; the chunked loss's backward recomputes the head
logits (2 * V * D per token more), which the formula does not credit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs uninstalled

import jax
import jax.numpy as jnp
from train_bench import sevjax_train_step, synthetic_batch

from sevjax import models, plan
from sevjax.schema import LossSection

H100_BF16_PEAK = 989e12
DEFAULT_MODELS = ("aragpt2-medium", "qwen2.5-0.5b")
TINY = {  # per model_type: minuscule sizes (vocabularies on both sides of the tiny threshold)
    "gpt2": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64),
    "qwen2": dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=64,
    ),
}
TINY_THRESHOLD = 384


def flops_per_token(hf: dict[str, Any], params: Any, seq: int) -> tuple[float, int]:
    """``(6 * N + 12 * L * A * T, N)`` for the model with HF config ``hf`` (see the docstring)."""
    config = models.config_from_hf(hf)
    return plan.model_flops(params, config, 1, seq), plan.matmul_params(params, config)


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _fits(step, device) -> tuple[bool, str]:
    """Whether the compiled step's memory fits the device (always True where unknown)."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    mem = step.compiled.memory_analysis()
    need = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    if limit is None:
        return True, f"needs {need / 2**30:.1f} GiB"
    return need <= limit, f"needs {need / 2**30:.1f} of {limit / 2**30:.1f} GiB"


def bench_model(name: str, hf: dict[str, Any], args, deadline: float) -> dict[str, Any] | None:
    """Largest power-of-two batch that fits, its tokens/s and MFU; None if none fit in time."""
    device = jax.devices()[0]
    threshold = TINY_THRESHOLD if args.tiny else LossSection().chunked_vocab_threshold
    chunked = hf["vocab_size"] > threshold
    batch = args.start_batch
    while batch >= 1:
        if time.time() > deadline:
            print(f"  [{name}] time budget spent before batch {batch}; stopping")
            return None
        step = None
        try:
            step = sevjax_train_step(
                hf,
                synthetic_batch(batch, args.seq, hf["vocab_size"]),
                dtype=jnp.bfloat16,
                chunked=chunked,
                device=device,
                options=models.ModelOptions(
                    scan_layers=args.scan, remat=args.remat, attention=args.attention
                ),
            )
            ok, note = _fits(step, device)
            print(f"  [{name}] batch {batch}: compiled in {step.compile_s:.1f}s, {note}")
            if ok:
                for _ in range(args.warmup):
                    step()
                times = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                per_token, n_matmul = flops_per_token(hf, step.state["params"], args.seq)
                tokens = batch * args.seq
                return {
                    "model": name,
                    "options": f"scan={args.scan} remat={args.remat} attention={args.attention}",
                    "batch": batch,
                    "chunked_loss": chunked,
                    "params": step.n_params,
                    "matmul_params": n_matmul,
                    "step_s": seconds,
                    "tokens_per_s": tokens / seconds,
                    "mfu": per_token * tokens / (args.peak_flops * seconds),
                }
        except Exception as err:  # noqa: BLE001 - only out-of-memory errors are retried
            if not _is_oom(err):
                raise
            print(f"  [{name}] batch {batch}: out of memory at run time")
        del step
        gc.collect()
        batch //= 2
    return None


def load_config(name: str, args) -> dict[str, Any]:
    """The HF config dict ``<config-dir>/<name>.json`` (minuscule sizes with ``--tiny``)."""
    path = Path(args.config_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no HF config.json for model {name!r} (see --config-dir)")
    hf = json.loads(path.read_text())
    if args.tiny:
        hf.update(TINY[hf["model_type"]])
    return hf


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument(
        "--config-dir",
        default=os.environ.get(
            "SEVJAX_HF_CONFIGS", str(Path(__file__).resolve().parents[1] / "configs" / "hf")
        ),
        help="folder of HF config.json files named <model>.json (env SEVJAX_HF_CONFIGS)",
    )
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--start-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=270.0, help="seconds, whole script")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK)
    parser.add_argument("--tiny", action="store_true", help="minuscule configs (CPU smoke test)")
    parser.add_argument("--no-scan", dest="scan", action="store_false", help="unrolled layers")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--attention", default="auto", help="auto | xla | cudnn | reference")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq, args.start_batch, args.steps, args.warmup = 64, 4, 2, 1
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs every model; prints one line each and returns the results."""
    args = parse_args(argv)
    deadline = time.time() + args.time_budget
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if args.tiny:
        print("--tiny: minuscule configs; MFU against the H100 peak is meaningless here")
    results = []
    for name in args.models:
        hf = load_config(name, args)
        result = bench_model(name, hf, args, deadline)
        if result is None:
            print(f"{name}: no batch fit (or the time budget ran out)")
            continue
        results.append(result)
        print(
            f"{name}: batch {result['batch']} x {args.seq}, {result['params'] / 1e6:.1f}M params "
            f"({result['matmul_params'] / 1e6:.1f}M in matmuls), chunked loss "
            f"{result['chunked_loss']}, step {result['step_s'] * 1e3:.1f} ms, "
            f"{result['tokens_per_s']:.0f} tokens/s, MFU {100 * result['mfu']:.1f}%"
        )
        sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
