"""Smoke tests: each benchmark's ``main`` runs on a minuscule config (no timing asserts)."""

import math
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_mfu  # noqa: E402
import memory_bench  # noqa: E402
import train_bench  # noqa: E402

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--seq", "32", "--batch", "2"]


def test_train_bench_runs(capsys):
    out = train_bench.main([*TINY, "--vocab", "128", "--steps", "2", "--warmup", "1"])
    assert out["sevjax_tokens_per_s"] > 0 and out["torch_tokens_per_s"] > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"sevjax/torch tokens-per-second ratio: {out['ratio']:.2f}"


def test_memory_bench_runs():
    argv = [*TINY, "--kv-heads", "1", "--vocab", "256", "--chunk-size", "16", "--steps", "1"]
    out = memory_bench.main(argv)
    assert set(out) == {"naive", "chunked"}
    assert out["naive"]["temp_bytes"] > 0 and out["chunked"]["temp_bytes"] > 0
    # the same model and batch: both losses agree
    assert math.isclose(out["naive"]["loss"], out["chunked"]["loss"], rel_tol=1e-5)


def test_gpu_mfu_tiny_runs():
    results = gpu_mfu.main(["--tiny"])
    assert [r["model"] for r in results] == list(gpu_mfu.DEFAULT_MODELS)
    assert [r["chunked_loss"] for r in results] == [False, True]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in results)
