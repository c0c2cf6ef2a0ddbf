"""Attention kernels: the selection rule (no accelerator needed), xla == reference for every mask
kind, splash (Pallas interpret mode on CPU) == reference, and an AOT compile of the splash path
for a TPU topology when libtpu is available."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sevjax.models import ModelOptions, attention, build
from sevjax.models.attention import causal_mask, padding_mask, select_implementation
from sevjax.models.llama import LlamaConfig
from sevjax.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
B, T, N, K, H = 2, 16, 4, 2, 8


@pytest.mark.parametrize(
    "requested,backend,dtype,q_len,kv_len,head_dim,aligned,dropout,expected,why",
    [
        ("auto", "cpu", jnp.float32, 16, 16, 8, True, False, "xla", None),
        ("auto", "gpu", jnp.bfloat16, 128, 128, 64, True, False, "cudnn", None),
        ("auto", "gpu", jnp.float16, 2, 64, 128, False, False, "cudnn", None),  # cached prefill
        ("auto", "gpu", jnp.float32, 128, 128, 64, True, False, "xla", "bfloat16/float16"),
        ("auto", "gpu", jnp.bfloat16, 128, 128, 100, True, False, "xla", "head dim"),
        ("auto", "gpu", jnp.bfloat16, 128, 128, 256, True, False, "xla", "head dim"),
        ("auto", "gpu", jnp.bfloat16, 1, 65, 64, False, False, "xla", "even lengths"),
        ("auto", "tpu", jnp.bfloat16, 256, 256, 64, True, False, "splash", None),
        ("auto", "tpu", jnp.bfloat16, 100, 100, 64, True, False, "xla", "multiple of 128"),
        ("auto", "tpu", jnp.bfloat16, 1, 256, 64, False, False, "xla", "KV cache"),
        ("auto", "gpu", jnp.bfloat16, 128, 128, 64, True, True, "reference", "dropout"),
        ("splash", "cpu", jnp.float32, 128, 128, 8, True, False, "splash", None),  # interpret
        ("splash", "tpu", jnp.float32, 128, 128, 8, True, True, "reference", "dropout"),
        ("splash", "gpu", jnp.bfloat16, 128, 128, 64, True, False, "xla", "TPU kernel"),
        ("cudnn", "cpu", jnp.bfloat16, 128, 128, 64, True, False, "xla", "GPU"),
        ("cudnn", "tpu", jnp.bfloat16, 128, 128, 64, True, False, "xla", "GPU"),
        ("xla", "gpu", jnp.bfloat16, 128, 128, 64, True, False, "xla", None),
        ("reference", "gpu", jnp.bfloat16, 128, 128, 64, True, False, "reference", None),
    ],
)
def test_selection_rule(
    requested, backend, dtype, q_len, kv_len, head_dim, aligned, dropout, expected, why
):
    impl, reason = select_implementation(
        requested,
        backend=backend,
        dtype=dtype,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        aligned=aligned,
        dropout=dropout,
    )
    assert impl == expected
    assert (reason is None) == (why is None) and (why is None or why in reason), reason


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="allowed"):
        select_implementation(
            "flash", backend="cpu", dtype=jnp.float32, q_len=1, kv_len=1, head_dim=8, aligned=True
        )
    with pytest.raises(ValueError, match="allowed"):
        ModelOptions(attention="flash")
    with pytest.raises(ValueError, match="remat"):
        ModelOptions(remat="some")


def _qkv(t=T, s=None, seed=0, k=K):
    rs = np.random.RandomState(seed)
    s = t if s is None else s
    return (
        jnp.asarray(rs.randn(B, t, N, H), jnp.float32),
        jnp.asarray(rs.randn(B, s, k, H), jnp.float32),
        jnp.asarray(rs.randn(B, s, k, H), jnp.float32),
    )


def _masks(t=T):
    """name -> (mask builder taking an implementation, valid query rows [B, T])."""
    valid = np.ones((B, t), np.int32)
    valid[1, :5] = 0  # left padding
    seg = np.zeros((B, t), np.int32)
    seg[0, :6], seg[0, 6:-3] = 1, 2  # two packed examples and 3 pad tokens
    seg[1, :-1] = 1
    right = np.ones((B, t), np.int32)
    right[0, -4:] = 0  # right padding (encoder)
    return {
        "causal+left-padding": (lambda i: causal_mask(jnp.asarray(valid), implementation=i), valid),
        "packed-segments": (
            lambda i: causal_mask(
                jnp.asarray(seg != 0), segment_ids=jnp.asarray(seg), implementation=i
            ),
            seg != 0,
        ),
        "sliding-window": (
            lambda i: causal_mask(jnp.asarray(valid), window=5, implementation=i),
            valid,
        ),
        "bidirectional-padding": (
            lambda i: padding_mask(jnp.asarray(right), implementation=i),
            right,
        ),
    }


def _attend_and_grad(q, k, v, mask, cot):
    def f(q, k, v):
        return (attention.attend(q, k, v, mask) * cot).sum()

    out = attention.attend(q, k, v, mask)
    return out, jax.grad(f, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("kind", ["causal+left-padding", "packed-segments", "sliding-window",
                                  "bidirectional-padding"])  # fmt: skip
def test_xla_equals_reference(kind):
    q, k, v = _qkv()
    build_mask, _ = _masks()[kind]
    cot = jnp.asarray(np.random.RandomState(1).randn(B, T, N, H), jnp.float32)
    out_x, g_x = jax.jit(_attend_and_grad)(q, k, v, build_mask("xla"), cot)
    out_r, g_r = jax.jit(_attend_and_grad)(q, k, v, build_mask("reference"), cot)
    np.testing.assert_allclose(out_x, out_r, atol=1e-5)  # fully masked rows included
    for a, b in zip(g_x, g_r):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_xla_equals_reference_for_cached_decode_with_window():
    q, k, v = _qkv(t=3, s=T)
    key_valid = np.zeros((B, T), np.int32)
    key_valid[:, 2:12] = 1  # left padding of 2, then 7 cached and 3 new tokens
    for window in (None, 4):
        masks = [
            causal_mask(
                jnp.asarray(key_valid), q_index=9 + jnp.arange(3), window=window, implementation=i
            )
            for i in ("xla", "reference")
        ]
        assert not masks[0].aligned and masks[0].segments is None
        x, r = (jax.jit(attention.attend)(q, k, v, m) for m in masks)
        np.testing.assert_allclose(x, r, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal+left-padding", "packed-segments", "sliding-window",
                                  "bidirectional-padding"])  # fmt: skip
def test_splash_interpret_equals_reference(kind):
    """The Pallas splash kernel (interpret mode on CPU) on the rows that hold real tokens."""
    t = 128
    q, k, v = _qkv(t=t)
    build_mask, valid = _masks(t)[kind]
    keep = jnp.asarray(valid != 0)[:, :, None, None]
    cot = jnp.asarray(np.random.RandomState(1).randn(B, t, N, H), jnp.float32) * keep
    out_s, g_s = jax.jit(_attend_and_grad)(q, k, v, build_mask("splash"), cot)
    out_r, g_r = jax.jit(_attend_and_grad)(q, k, v, build_mask("reference"), cot)
    np.testing.assert_allclose(out_s * keep, out_r * keep, atol=1e-5)
    for a, b in zip(g_s, g_r):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_model_with_splash_equals_reference_on_padded_packed_batch():
    """Scanned Mistral (GQA, sliding window) with packed and padded rows; splash also under a
    data=2 x fsdp=2 x tensor=2 mesh, where it runs per device inside shard_map."""
    config = LlamaConfig(
        model_type="mistral",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=40,
        max_position_embeddings=256,
    )
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(3, 128, (4, 128)), jnp.int32)
    seg = np.ones((4, 128), np.int32)
    seg[0, 60:] = 2
    seg[1, -10:] = 0
    pos = np.arange(128)[None].repeat(4, 0)
    pos[0, 60:] -= 60

    def forward(m, i):
        return m(i, position_ids=jnp.asarray(pos), segment_ids=jnp.asarray(seg))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    splash = build(config, mesh=mesh, options=ModelOptions(scan_layers=True, attention="splash"))
    reference = build(config, options=ModelOptions(scan_layers=True, attention="reference"))
    nnx.update(reference, jax.device_get(nnx.state(splash)))  # the same weights
    ref = np.asarray(jax.jit(forward)(reference, ids))
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(forward)(splash, ids))
    assert np.abs(out - ref)[seg != 0].max() <= 1e-4


def _libtpu_path() -> str | None:
    path = os.environ.get("SEVJAX_LIBTPU_PATH")
    if path and (Path(path) / "libtpu").is_dir():
        return path
    spec = importlib.util.find_spec("libtpu")
    return None if spec is None else str(Path(spec.origin).parents[1])


AOT_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies
    from sevjax import models
    from sevjax.models import ModelOptions
    from sevjax.models.llama import LlamaConfig
    from sevjax.sharding import make_mesh, state_shardings, batch_sharding

    topo = topologies.get_topology_desc("v5e:2x2", "tpu")
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=topo.devices)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    opts = ModelOptions(scan_layers=True, remat="dots", attention="auto")
    model = nnx.eval_shape(lambda: models.model_class(cfg)(
        cfg, dtype=jnp.bfloat16, options=opts, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p_sh, r_sh = state_shardings(params, mesh), state_shardings(rest, mesh)

    def loss(params, rest, ids, seg, pos):
        m = nnx.merge(graphdef, params, rest)
        return m(ids, position_ids=pos, segment_ids=seg).mean()

    ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=batch_sharding(mesh))
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(p_sh, r_sh, *[batch_sharding(mesh)] * 3))
    with jax.set_mesh(mesh):
        compiled = step.trace(params, rest, ids, ids, ids).lower().compile()
    hlo = compiled.as_text()
    print("kernels:", *sorted(k for k in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")
                             if k in hlo), "custom-calls:", hlo.count("tpu_custom_call"))
    """
)


def test_splash_aot_compiles_for_tpu_topology():
    """Compiles the scanned, rematted train step with splash for a v5e 2x2 topology (4 chips)."""
    libtpu = _libtpu_path()
    if libtpu is None:
        pytest.skip("libtpu is not installed (pip install libtpu, or set SEVJAX_LIBTPU_PATH)")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), libtpu, env.get("PYTHONPATH", "")])
    env.update(TPU_ACCELERATOR_TYPE="v5litepod-4", TPU_WORKER_HOSTNAMES="localhost")
    env.update(TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # no metadata, no lockfile
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the real Mosaic kernels (forward, dq, dkv), not the interpret-mode fallback
    assert "kernels: splash_mha_dkv splash_mha_dq splash_mha_fwd" in proc.stdout, proc.stdout
