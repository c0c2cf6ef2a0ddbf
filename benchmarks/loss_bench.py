"""Loss benchmarks, measured side by side in one run.

Usage: python benchmarks/loss_bench.py [--repeats 10]

(a) jitted value_and_grad time of the severity-weighted loss vs plain masked cross-entropy at
    B=8, T=512, V=64000 (AraGPT2's vocabulary), median of the repeats, and their ratio.
(b) XLA's temporary memory of naive vs chunked value_and_grad w.r.t. hidden states and head at
    Qwen2.5-0.5B's head size (B=4, T=1024, D=896, V=151936, bf16 inputs, chunk_size=256).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs uninstalled

import jax
import jax.numpy as jnp
import optax

from sevjax import loss as L


def median_seconds(fns, args, repeats: int) -> list[float]:
    """Median wall time of each function, runs interleaved so load changes hit both alike."""
    for fn in fns:
        jax.block_until_ready(fn(*args))  # compile + warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_time(repeats: int) -> None:
    B, T, V = 8, 512, 64000
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    logits = jax.random.normal(k1, (B, T, V), jnp.float32)
    labels = jax.random.randint(k2, (B, T), 0, V)
    mask = (jax.random.uniform(k3, (B, T)) > 0.3).astype(jnp.float32)
    weights = jax.random.uniform(k4, (B,), minval=0.5, maxval=2.0)

    def plain(x):
        nll = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels)
        return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def weighted(x):
        return L.severity_weighted_cross_entropy(x, labels, mask, weights)[0]

    fns = [jax.jit(jax.value_and_grad(f)) for f in (plain, weighted)]
    t_plain, t_weighted = median_seconds(fns, (logits,), repeats)
    print(f"(a) value_and_grad B={B} T={T} V={V} f32, median of {repeats}:")
    print(f"    plain masked CE   {t_plain * 1e3:9.1f} ms")
    print(f"    severity-weighted {t_weighted * 1e3:9.1f} ms")
    print(f"    weighted/plain time ratio: {t_weighted / t_plain:.3f}")


def bench_memory() -> None:
    B, T, D, V, chunk = 4, 1024, 896, 151936, 256
    hidden = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16)
    head = jax.ShapeDtypeStruct((D, V), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((B, T), jnp.int32)
    mask = jax.ShapeDtypeStruct((B, T), jnp.float32)
    weights = jax.ShapeDtypeStruct((B,), jnp.float32)

    def naive(h, w, y, m, s):
        logits = jnp.einsum("btd,dv->btv", h, w)  # (B, T, V) bf16
        return L.severity_weighted_cross_entropy(logits, y, m, s)[0]

    def chunked(h, w, y, m, s):
        return L.chunked_severity_weighted_cross_entropy(h, w, y, m, s, chunk_size=chunk)[0]

    def temp_bytes(fn) -> int:
        grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        compiled = grad.lower(hidden, head, labels, mask, weights).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    naive_b, chunked_b = temp_bytes(naive), temp_bytes(chunked)
    print(f"(b) value_and_grad wrt hidden+head, B={B} T={T} D={D} V={V} bf16, chunk={chunk}:")
    print(f"    naive   temp {naive_b / 2**20:9.1f} MiB")
    print(f"    chunked temp {chunked_b / 2**20:9.1f} MiB")
    print(f"    chunked/naive temp memory ratio: {chunked_b / naive_b:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, jax {jax.__version__}, "
        f"backend {jax.default_backend()}, devices {jax.device_count()}"
    )
    bench_time(args.repeats)
    bench_memory()


if __name__ == "__main__":
    main()
