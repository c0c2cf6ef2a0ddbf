"""LoRA vs full fine-tuning: one train step of the same model, side by side in one run.

Usage: python benchmarks/lora_bench.py [--rank 16] [--steps 20] [--warmup 3] [--set KEY=VALUE ...]

Both are the real jitted train step (:func:`sevjax.trainer.make_train_step` on
:class:`sevjax.train.LMTask`, built from a :class:`sevjax.schema.TrainConfig` exactly as
``python train.py`` builds it: :func:`sevjax.train.model_source` and
:func:`sevjax.train.trainable`) on one device, on the same synthetic batch
(``data.batch_size`` x ``max(data.buckets)`` tokens). The default config is the tiny default run
(``configs/tiny.yaml``: GPT-2, 2 layers, width 128, vocab 1024, 16 x 256 tokens); ``--set``
changes it for both. The LoRA step adds ``model.lora.rank=<rank>`` (default targets, frozen base
in ``model.lora.base_dtype``, bfloat16 by default). Steps of the two are interleaved (the order
alternates) so load from other processes hits both alike; the figure is the median step time.
The last line is ``lora/full step-time ratio: X.XX`` (below 1: the LoRA step is faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs uninstalled

import jax

from sevjax import sharding, train, trainer
from sevjax.config import load
from sevjax.schema import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import SevjaxStep, compile_step, synthetic_batch, timed  # noqa: E402


def build_step(cfg: TrainConfig) -> SevjaxStep:
    """The compiled train step of ``cfg`` on one device, bound to its state and a batch."""
    mesh = sharding.make_mesh(1, 1, 1, devices=[jax.devices()[0]])
    config = train.model_config(cfg)
    source = train.model_source(cfg, config, mesh)
    trainable = train.trainable(cfg)
    s = trainer.setup(source, mesh=mesh, optim_cfg=cfg.optim, steps=cfg.steps, trainable=trainable)
    state, fixed = trainer.initial_state(source, s, trainable=trainable)
    task = train.LMTask(cfg, None, chunked=config.vocab_size > cfg.loss.chunked_vocab_threshold)
    batch_np = synthetic_batch(cfg.data.batch_size, max(cfg.data.buckets), config.vocab_size)
    return compile_step(task, s, state, fixed, batch_np)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16, help="model.lora.rank of the LoRA step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compile")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a TrainConfig override for both steps, e.g. --set data.batch_size=8 (repeatable)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark and prints it; returns the median step times and their ratio."""
    args = parse_args(argv)
    load_avg = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}; jax {jax.__version__} "
        f"({jax.default_backend()})"
    )
    cfgs = {
        "full": load(TrainConfig, overrides=args.overrides),
        "lora": load(TrainConfig, overrides=[*args.overrides, f"model.lora.rank={args.rank}"]),
    }
    m, d, lc = cfgs["full"].model, cfgs["full"].data, cfgs["lora"].model.lora
    print(
        f"config: {m.model_type} L={m.layers} D={m.width} N={m.heads} V={m.vocab_size} "
        f"B={d.batch_size} T={max(d.buckets)}, {m.dtype} compute; LoRA r={lc.rank} "
        f"alpha={lc.alpha} on {list(lc.targets)}, base {lc.base_dtype}; "
        f"{args.steps} timed steps each after {args.warmup} warm-up"
    )
    steps = {name: build_step(cfg) for name, cfg in cfgs.items()}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    runs: dict[str, list[tuple[float, float, float | None]]] = {k: [] for k in steps}
    for i in range(args.steps):  # alternate which goes first
        for name in ("full", "lora") if i % 2 == 0 else ("lora", "full"):
            runs[name].append(timed(steps[name]))
    med = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    for name, st in steps.items():
        walls = [r[0] for r in runs[name]]
        print(
            f"{name:4s} step median {med[name] * 1e3:7.1f} ms (min {min(walls) * 1e3:.1f}, "
            f"max {max(walls) * 1e3:.1f}); trainable params {st.n_params:,}; XLA temp "
            f"{st.temp_bytes / 2**20:.1f} MiB; compile {st.compile_s:.2f} s"
        )
    ratio = med["lora"] / med["full"]
    print(f"lora/full step-time ratio: {ratio:.2f}")
    return {
        "full_step_s": med["full"],
        "lora_step_s": med["lora"],
        "ratio": ratio,
        "trainable": {k: st.n_params for k, st in steps.items()},
    }


if __name__ == "__main__":
    main()
