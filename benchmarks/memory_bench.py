"""Large-vocabulary memory: sevjax's train step with the chunked loss vs full logits, in one run.

Usage: python benchmarks/memory_bench.py [--layers 2 --width 256 --heads 4 --kv-heads 2
       --vocab 151936 --seq 1024 --batch 1 --chunk-size 256 --steps 5 --repeats 1]

A Qwen2-style decoder (``LlamaConfig`` with ``model_type`` qwen2, tied embeddings) with Qwen2's
vocabulary of 151936 at sequence 1024, small enough for a 2-core CPU. Each variant (``naive``:
``[B, T, V]`` logits + ``severity_weighted_cross_entropy``; ``chunked``: hidden states + head +
``chunked_severity_weighted_cross_entropy``) runs in a fresh subprocess, alternating
(naive, chunked, naive, ...) over ``--repeats``. Each child builds the real step of
:mod:`sevjax.train` and reports:

- XLA's ``temp_size_in_bytes`` of the compiled step;
- peak resident memory of the whole process (``ru_maxrss``: import, init, compile and steps);
- peak resident memory while stepping: the kernel's high-water mark (``VmHWM``) reset through
  ``/proc/self/clear_refs`` after compiling, so compiler memory is left out (where allowed);
- median step time over ``--steps`` (after one warm-up step) and tokens/s = B*T / median, with
  how many cores other processes kept busy meanwhile (a shared machine's noise);
- the first step's loss (same initial weights and batch: the two variants should agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs uninstalled

VARIANTS = ("naive", "chunked")


def qwen2_config(args: argparse.Namespace) -> dict[str, Any]:
    """The HF config dict of the benchmarked Qwen2-style model."""
    return {
        "model_type": "qwen2",
        "vocab_size": args.vocab,
        "hidden_size": args.width,
        "intermediate_size": 4 * args.width,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": args.seq,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def _hwm_bytes() -> int | None:
    """The process's resident high-water mark (VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write "5" to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Measures one variant in this (fresh) process; returns its numbers."""
    import jax
    from train_bench import sevjax_train_step, synthetic_batch, timed

    batch_np = synthetic_batch(args.batch, args.seq, args.vocab)
    step = sevjax_train_step(
        qwen2_config(args),
        batch_np,
        chunked=args.child == "chunked",
        chunk_size=args.chunk_size,
    )
    reset = _reset_hwm()
    first = step()  # warm-up; its loss is of the same initial weights in both variants
    runs = [timed(step) for _ in range(args.steps)]
    median = statistics.median(r[0] for r in runs)
    others = [r[2] for r in runs if r[2] is not None]
    return {
        "variant": args.child,
        "temp_bytes": step.temp_bytes,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_peak_bytes": _hwm_bytes() if reset else None,
        "compile_s": step.compile_s,
        "step_s": median,
        "tokens_per_s": args.batch * args.seq / median,
        "others_cores": sum(others) / sum(r[0] for r in runs) if others else None,
        "loss": float(jax.device_get(first["loss"])),
        "n_params": step.n_params,
    }


def run_child(variant: str, argv: Sequence[str]) -> dict[str, Any]:
    """Runs :func:`child` for ``variant`` in a fresh interpreter; returns its JSON line."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--child", variant],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per loss chunk")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per child")
    parser.add_argument("--repeats", type=int, default=1, help="children per variant")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _cores(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _mib(n: int | None) -> str:
    return "      n/a" if n is None else f"{n / 2**20:9.1f}"


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Runs both variants in subprocesses, prints the table; returns the per-variant medians."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"config: Qwen2-style L={args.layers} D={args.width} N={args.heads} K={args.kv_heads} "
        f"V={args.vocab} T={args.seq} B={args.batch}, tied head, float32, chunk_size="
        f"{args.chunk_size}; {args.repeats} fresh process(es) per variant, {args.steps} steps each"
    )
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            runs[variant].append(run_child(variant, argv))
    keys = (
        "temp_bytes",
        "maxrss_bytes",
        "step_peak_bytes",
        "compile_s",
        "tokens_per_s",
        "loss",
        "others_cores",
    )
    out = {}
    for variant, rs in runs.items():
        out[variant] = {
            k: None if any(r[k] is None for r in rs) else statistics.median(r[k] for r in rs)
            for k in keys
        }
    print(f"parameters: {runs['naive'][0]['n_params']:,}")
    print(
        "variant   XLA temp MiB  peak RSS MiB  step-phase peak MiB  compile s  tokens/s  loss"
        "     others' cores"
    )
    for variant in VARIANTS:
        r = out[variant]
        print(
            f"{variant:8s} {_mib(r['temp_bytes'])}     {_mib(r['maxrss_bytes'])}     "
            f"{_mib(r['step_peak_bytes'])}            {r['compile_s']:7.1f}  "
            f"{r['tokens_per_s']:8.1f}  {r['loss']:.4f}  {_cores(r['others_cores'])}"
        )
    n, c = out["naive"], out["chunked"]
    print(f"chunked/naive XLA temp memory ratio: {c['temp_bytes'] / n['temp_bytes']:.3f}")
    print(f"chunked/naive peak RSS ratio: {c['maxrss_bytes'] / n['maxrss_bytes']:.3f}")
    if c["step_peak_bytes"] and n["step_peak_bytes"]:
        ratio = c["step_peak_bytes"] / n["step_peak_bytes"]
        print(f"chunked/naive step-phase peak RSS ratio: {ratio:.3f}")
    print(f"chunked/naive tokens-per-second ratio: {c['tokens_per_s'] / n['tokens_per_s']:.3f}")
    return out


if __name__ == "__main__":
    main()
