"""sevjax vs PyTorch: CPU training throughput of one train step, side by side in one run.

Usage: python benchmarks/train_bench.py [--layers 6 --width 512 --heads 8 --vocab 16000
       --seq 256 --batch 8 --steps 10 --warmup 2]

sevjax: the real jitted train step (:func:`sevjax.trainer.make_train_step` on the LM task
:class:`sevjax.train.LMTask`: AdamW with clipping, severity-weighted token loss, per-severity sums,
the finite-update guard, donated state).
PyTorch: ``transformers.GPT2LMHeadModel`` (dropout 0, like ours), ``torch.optim.AdamW``, global
norm clipping, and the same loss written in torch (per-token CE * per-example weight * mask,
sum / token count). Both float32, same shapes (not the same init), same batch, torch on as many
threads as XLA's CPU client uses (all cores). Steps of the two are interleaved (the order
alternates) so load from other processes hits both alike; tokens/s is B*T / median step time.
Also reported: each step's own process CPU time (user + system, all threads; includes
spin-waiting) and how many cores other processes kept busy meanwhile (``/proc/stat``), so a run
on a shared machine says how contended it was.
The last line is ``sevjax/torch tokens-per-second ratio: X.XX``.

The helpers :func:`sevjax_train_step` and :func:`synthetic_batch` are reused by
``memory_bench.py`` and ``gpu_mfu.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs uninstalled

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sevjax import models, sharding, train, trainer
from sevjax.schema import LossSection, TrainConfig

CLASS_WEIGHTS = (1.0, 1.5, 2.0)  # the "linear" preset, one severity class per row


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch in :mod:`sevjax.lm_data`'s layout, ``[1, B, T]`` arrays (A = 1).

    One example per row, no padding; the first quarter of each row is prompt (mask 0), row ``b``
    has severity class ``b % 3`` and its weight from :data:`CLASS_WEIGHTS` on every token.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    severity = np.broadcast_to((np.arange(batch) % 3)[:, None], (batch, seq)).astype(np.int32)
    out = {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.broadcast_to(np.arange(seq) >= seq // 4, (batch, seq)).astype(np.float32),
        "weights": np.asarray(CLASS_WEIGHTS, np.float32)[severity],
        "severity": severity,
    }
    return {k: np.ascontiguousarray(v)[None] for k, v in out.items()}  # (1, B, T)


@dataclasses.dataclass
class SevjaxStep:
    """A compiled sevjax train step bound to its state and batch; calling it runs one step."""

    compiled: Any
    state: Any
    fixed: Any
    batch: dict[str, jax.Array]
    rng: jax.Array
    trace_s: float  # trace + lower
    compile_s: float  # XLA compile
    temp_bytes: int  # XLA's temp_size_in_bytes of the step
    n_params: int

    def __call__(self) -> dict[str, jax.Array]:
        self.state, metrics = self.compiled(self.state, self.fixed, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        return metrics


def sevjax_train_step(
    hf_config: dict[str, Any],
    batch_np: dict[str, np.ndarray],
    *,
    dtype: Any = jnp.float32,
    chunked: bool = False,
    chunk_size: int = 2048,
    device: Any = None,
    options: models.ModelOptions | None = None,
) -> SevjaxStep:
    """Builds, lowers and compiles sevjax's real train step on one device.

    The state is :func:`sevjax.trainer.initial_state` (random init, AdamW from ``OptimSection``
    defaults, donated ``{params, opt_state, step}``); the step is
    :func:`sevjax.trainer.make_train_step` on :class:`sevjax.train.LMTask`, as training uses them.

    Args:
        hf_config: an HF ``config.json`` dict (``models.config_from_hf``).
        batch_np: ``[1, B, T]`` arrays as :func:`synthetic_batch` makes them.
        dtype: compute dtype (parameters and optimizer state stay float32).
        chunked: the chunked loss (hidden states + head) instead of full ``[B, T, V]`` logits.
        chunk_size: tokens per chunk of the chunked loss.
        device: the device (default ``jax.devices()[0]``).
        options: scanned layers, remat, attention kernel (default: unrolled, no remat, auto,
            with the XLA:CPU gradient barrier as training uses it).
    """
    cfg = TrainConfig(loss=LossSection(chunk_size=chunk_size))
    options = options or models.ModelOptions(grad_barrier=True)
    mesh = sharding.make_mesh(1, 1, 1, devices=[device or jax.devices()[0]])
    config = models.config_from_hf(hf_config)
    cls = models.model_class(config)
    source = trainer.ModelSource(
        lambda: cls(config, dtype=dtype, options=options, rngs=nnx.Rngs(0))
    )
    s = trainer.setup(source, mesh=mesh, optim_cfg=cfg.optim, steps=cfg.steps, trainable=nnx.Param)
    state, fixed = trainer.initial_state(source, s, trainable=nnx.Param)
    return compile_step(train.LMTask(cfg, None, chunked=chunked), s, state, fixed, batch_np)


def compile_step(task: Any, s: Any, state: Any, fixed: Any, batch_np: dict) -> SevjaxStep:
    """Lowers and compiles the trainer's real step for ``task`` on ``s.mesh`` (timed apart)."""
    batch_sh = trainer.batch_shardings(batch_np, s.mesh, lead=1)
    step = trainer.make_train_step(task, s, batch_sh)
    batch = trainer.put(batch_np, batch_sh, batch_np["input_ids"].shape[1], axis=1)
    rng = s.rng(0)
    start = time.perf_counter()
    lowered = step.lower(state, fixed, batch, rng)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    temp = compiled.memory_analysis().temp_size_in_bytes
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return SevjaxStep(
        compiled, state, fixed, batch, rng, traced - start, done - traced, temp, n_params
    )


def gpt2_config(args: argparse.Namespace) -> dict[str, Any]:
    """The HF GPT-2 config dict both frameworks build from (dropout off: ours has none)."""
    return {
        "model_type": "gpt2",
        "vocab_size": args.vocab,
        "n_layer": args.layers,
        "n_embd": args.width,
        "n_head": args.heads,
        "n_positions": args.seq,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def torch_train_step(hf_config: dict[str, Any], batch_np: dict[str, np.ndarray]):
    """One PyTorch training step (forward, severity-weighted loss, backward, clip, AdamW).

    Returns:
        ``(step, n_params)``; ``step()`` runs one step and returns the loss (a Python float).
    """
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(**{k: v for k, v in hf_config.items() if k != "model_type"})
    model = transformers.GPT2LMHeadModel(config).train()
    defaults = TrainConfig().optim
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=defaults.lr,
        betas=(defaults.b1, defaults.b2),
        eps=defaults.eps,
        weight_decay=defaults.weight_decay,
    )
    ids = torch.from_numpy(batch_np["input_ids"][0]).long()  # (B, T)
    labels = torch.from_numpy(batch_np["labels"][0]).long()  # (B, T)
    mask = torch.from_numpy(batch_np["loss_mask"][0])  # (B, T)
    weights = torch.from_numpy(batch_np["weights"][0][:, 0].copy())  # (B,) per example

    def step() -> float:
        logits = model(input_ids=ids).logits  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(mask)  # (B, T)
        loss = (nll * weights[:, None] * mask).sum() / mask.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.grad_clip)
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in model.parameters())


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def timed(fn) -> tuple[float, float, float | None]:
    """One call: ``(wall s, own CPU s, CPU s other processes used meanwhile or None)``."""
    busy, cpu, start = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = _busy_cpu_seconds()
    others = None if busy is None or after is None else max(0.0, after - busy - cpu)
    return wall, cpu, others


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the benchmark and prints it; returns the numbers (tokens/s, ratio, compile time)."""
    args = parse_args(argv)
    import torch

    threads = os.cpu_count() or 1  # XLA's CPU client runs one intra-op thread per core
    torch.set_num_threads(threads)
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} on {torch.get_num_threads()} "
        f"threads; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    hf = gpt2_config(args)
    batch_np = synthetic_batch(args.batch, args.seq, args.vocab)
    tokens = args.batch * args.seq
    print(
        f"config: GPT-2 L={args.layers} D={args.width} N={args.heads} V={args.vocab} "
        f"T={args.seq} B={args.batch}, float32, {args.steps} timed steps after {args.warmup} warm-up"
    )

    jx = sevjax_train_step(hf, batch_np)
    first_jax = timed(jx)[0]
    tstep, torch_params = torch_train_step(hf, batch_np)
    first_torch = timed(tstep)[0]
    for _ in range(args.warmup):
        jx()
        tstep()
    runs: dict[str, list[tuple[float, float, float | None]]] = {"sevjax": [], "torch": []}
    for i in range(args.steps):  # alternate which framework goes first
        order = (
            (("sevjax", jx), ("torch", tstep)) if i % 2 == 0 else (("torch", tstep), ("sevjax", jx))
        )
        for name, fn in order:
            runs[name].append(timed(fn))
    med = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    tok_s = {k: tokens / v for k, v in med.items()}
    ratio = tok_s["sevjax"] / tok_s["torch"]
    print(f"parameters: sevjax {jx.n_params:,}, torch {torch_params:,}")
    print(
        f"sevjax: trace+lower {jx.trace_s:.2f}s, XLA compile {jx.compile_s:.2f}s, "
        f"first step {first_jax:.3f}s; torch first step {first_torch:.3f}s"
    )
    for name in ("sevjax", "torch"):
        walls = [r[0] for r in runs[name]]
        others = [r[2] for r in runs[name] if r[2] is not None]
        busy = f"; others used {sum(others) / sum(walls):.2f} cores" if others else ""
        print(
            f"{name:7s} step median {med[name] * 1e3:8.1f} ms (min {min(walls) * 1e3:.1f}, "
            f"max {max(walls) * 1e3:.1f}), {tok_s[name]:9.0f} tokens/s; "
            f"own CPU {med_cpu[name]:.2f} s/step{busy}"
        )
    cpu_ratio = med_cpu["torch"] / max(med_cpu["sevjax"], 1e-9)
    print(f"sevjax/torch tokens-per-CPU-second ratio: {cpu_ratio:.2f}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"sevjax/torch tokens-per-second ratio: {ratio:.2f}")
    return {
        "sevjax_tokens_per_s": tok_s["sevjax"],
        "torch_tokens_per_s": tok_s["torch"],
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "compile_s": jx.compile_s,
    }


if __name__ == "__main__":
    main()
