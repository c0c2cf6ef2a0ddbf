"""Will it fit? ``sevjax.plan`` for the shipped models on TPU topologies, compiled on this host.

Usage: python benchmarks/plan_fit.py [--cases NAME ...] [--out plan_fit.json]
       (needs libtpu: pip install -r requirements-tpu.txt; runs on a CPU-only machine)

Each case is the real train step of ``python train.py`` (its shipped YAML config, or the one
given below, plus ``--set`` overrides) compiled by libtpu for a TPU topology with
:func:`sevjax.plan.plan`; nothing is executed, and only the models' published ``config.json``
files (``configs/hf/``) are read. Prints one JSON line per case and a Markdown table of the
parameters, per-chip memory (XLA's memory analysis: arguments + outputs + temp - aliased), HBM
per chip as libtpu reports it, whether it fits, program and model FLOPs per step, and compile
time on this host. A case that does not fit is a row, not an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs uninstalled

from sevjax import plan
from sevjax.config import load
from sevjax.schema import TrainConfig

V5E_8, V5E_16 = "v5e:2x4", "v5e:4x4"
FSDP8 = ["mesh.data=1", "mesh.fsdp=8"]
SCAN_FULL = ["model.scan_layers=true", "model.remat=full"]
LLAMA_8B = [
    "model.name_or_path=meta-llama/Llama-3.1-8B",
    "model.dtype=bfloat16",
    "data.batch_size=16",
    "data.buckets=[1024]",
    "loss.chunk_size=4096",
    "mesh.data=1",
    "mesh.fsdp=16",
]
UNROLLED = ["model.scan_layers=false"]
SCAN = ["model.scan_layers=true", "model.remat=none"]
# name -> (YAML config or None, overrides, topology)
CASES = {
    "aragpt2-base": ("configs/aragpt2-base.yaml", [*FSDP8, *UNROLLED], V5E_8),
    "aragpt2-medium": ("configs/aragpt2-medium.yaml", [*FSDP8, *UNROLLED], V5E_8),
    "qwen2.5-0.5b": ("configs/qwen2.5-0.5b.yaml", [*FSDP8, *UNROLLED], V5E_8),
    "qwen2.5-0.5b-scan-remat": ("configs/qwen2.5-0.5b.yaml", [*FSDP8, *SCAN_FULL], V5E_8),
    "llama-3.1-8b-scan-remat": (None, [*LLAMA_8B, *SCAN_FULL], V5E_16),
    "llama-3.1-8b-scan": (None, [*LLAMA_8B, *SCAN], V5E_16),
}


def row(name: str, r: dict) -> str:
    """One Markdown table row of a report."""
    gib = 2**30
    need = r["per_device_bytes"]["total"] or r["compiler_required_bytes"]
    b, o = r["batch"], r["options"]
    opts = ("scan" if o["scan_layers"] else "unrolled") + f", remat {o['remat']}"
    return (
        f"| {name} | {r['target']} ({r['devices']} chips, mesh fsdp={r['mesh']['fsdp']}) "
        f"| {r['params']:,} | {b['grad_accum']}x{b['batch_size']}x{b['seq']} | {opts} "
        f"| {need / gib:.2f} | {r['hbm_bytes_per_device'] / gib:.2f} "
        f"| {'yes' if r['fits'] else '**no**'} | {r['flops_per_step']:.2e} "
        f"| {r['model_flops_per_step']:.2e} | {r['compile_seconds']:.0f} s |"
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=None, help="also write the reports as a JSON list")
    args = parser.parse_args(argv)
    if not plan.tpu_compiler_available():
        raise SystemExit("libtpu is not installed: pip install -r requirements-tpu.txt")
    root = Path(__file__).resolve().parents[1]
    reports = []
    for name in args.cases:
        yaml, overrides, topology = CASES[name]
        cfg = load(TrainConfig, None if yaml is None else str(root / yaml), overrides)
        r = plan.plan(cfg, topology=topology)
        print(json.dumps({"case": name, **r}), flush=True)
        reports.append({"case": name, **r})
    print(
        "\n| model | target | params | A x B x T | layers | GiB / chip | HBM GiB | fits "
        "| FLOPs / step (program) | FLOPs / step (6N+attn) | compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(row(r["case"], r))
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=2) + "\n")
    return reports


if __name__ == "__main__":
    main()
