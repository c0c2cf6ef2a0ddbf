"""Compile time of the train step vs depth: scanned layers against unrolled ones.

Usage: python benchmarks/plan_compile.py [--layers 8 32] [--width 256] [--seq 256]
       [--repeats 2] [--unrolled]   (also time the unrolled stack, for contrast)

For each depth, :func:`sevjax.plan.plan` compiles the real train step of a random-init Llama
(width ``--width``, 4 heads, vocabulary 1024, batch 16 x ``--seq`` tokens, float32, the local
devices, ``ModelOptions(scan_layers=...)``) without running it, each in a fresh process so no
cache is shared; runs alternate between depths over ``--repeats`` and the median of XLA's
compile time (``compile_seconds``; tracing and lowering reported beside it) is taken. The last
line is ``scanned compile time ratio L=<max>/L=<min>: X.XX``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a checkout runs uninstalled


def child(layers: int, width: int, seq: int, scan: bool) -> None:
    """Plans one depth and prints its report as one JSON line."""
    from sevjax import plan
    from sevjax.config import load
    from sevjax.schema import TrainConfig

    sets = [
        "model.model_type=llama",
        f"model.layers={layers}",
        f"model.width={width}",
        "model.heads=4",
        "model.vocab_size=1024",
        "data.batch_size=16",
        f"data.buckets=[{seq}]",
        f"model.scan_layers={str(scan).lower()}",
    ]
    r = plan.plan(load(TrainConfig, None, sets))
    print(json.dumps(r))


def measure(layers: int, width: int, seq: int, scan: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, (layers, width, seq, int(scan)))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--unrolled", action="store_true")
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child[:3], bool(args.child[3]))
    layouts = [True, False] if args.unrolled else [True]
    times: dict[tuple[bool, int], list[dict]] = {}
    for _ in range(args.repeats):
        for scan in layouts:
            for layers in args.layers:
                r = measure(layers, args.width, args.seq, scan)
                times.setdefault((scan, layers), []).append(r)
                name = "scanned" if scan else "unrolled"
                print(
                    f"{name:<8} L={layers:<3} compile {r['compile_seconds']:7.2f} s  "
                    f"trace+lower {r['lower_seconds']:5.2f} s  params {r['params']:,}",
                    flush=True,
                )
    med = {k: statistics.median(r["compile_seconds"] for r in v) for k, v in times.items()}
    lo, hi = min(args.layers), max(args.layers)
    for scan in layouts:
        name = "scanned" if scan else "unrolled"
        print(
            f"{name} median compile: "
            + ", ".join(f"L={n} {med[scan, n]:.2f} s" for n in args.layers)
        )
    for scan in layouts[::-1]:
        name = "scanned" if scan else "unrolled"
        print(f"{name} compile time ratio L={hi}/L={lo}: {med[scan, hi] / med[scan, lo]:.2f}")
    return {f"{'scanned' if s else 'unrolled'} L={n}": t for (s, n), t in med.items()}


if __name__ == "__main__":
    main()
