"""The Pallas TPU splash-attention kernel behind ``ModelOptions(attention="splash")``.

The static part of the mask (causal, causal + sliding window, or full) is built into the kernel;
padding and packed examples arrive as segment ids (0 = padding), which splash compares between
queries and keys. Under an active mesh the kernel runs inside ``shard_map`` over the batch axes
and, when both the query and key/value head counts divide it, the ``tensor`` axis; each device
then runs the kernel on its own batch rows and heads. On a non-TPU target the same kernel runs in
Pallas interpret mode (slow; it exists so that CPU tests can check the numerics).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

from sevjax.sharding import logical_to_spec


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segments: jax.Array,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    softcap: float | None = None,
    interpret: bool,
) -> jax.Array:
    """Self-attention through splash.

    Args:
        q: [B, T, N, H]. k, v: [B, T, K, H] with N % K == 0; T a multiple of 128.
        segments: [B, T] int segment id of each token (0 = padding).
        causal: causal static mask. window: sliding window (with ``causal``) or None.
        scale: score scale.
        softcap: logit soft-cap ``cap * tanh(s / cap)`` of the scaled scores, or None.
        interpret: run the kernel in Pallas interpret mode (non-TPU targets).

    Returns:
        [B, T, N, H] in q's dtype.
    """
    b, t, n, _ = q.shape
    kh = k.shape[2]
    if scale != 1.0:
        q = (q * scale).astype(q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, N|K, T, H)

    def local(q, k, v, seg):
        kernel = _kernel(q.shape[1], t, causal, window, softcap, interpret)

        def one(q, k, v, s):
            return kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))

        return jax.vmap(one)(q, k, v, seg)  # (B, N, T, H)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        out = local(q, k, v, segments)
    else:
        batch = logical_to_spec(("batch",), mesh, (b,))[0]
        tensor = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1)
        heads = "tensor" if tensor > 1 and n % tensor == 0 and kh % tensor == 0 else None
        qkv = PartitionSpec(batch, heads, None, None)
        out = jax.shard_map(
            local,
            in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)),
            out_specs=qkv,
            check_vma=False,
        )(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)  # (B, T, N, H)


def _kernel(heads: int, seq: int, causal: bool, window: int | None, softcap, interpret: bool):
    """A splash kernel for ``heads`` query heads over a [seq, seq] static mask."""
    shape = (seq, seq)
    if causal and window is not None:
        one = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    elif causal:
        one = sm.CausalMask(shape)
    else:
        one = sm.FullMask(shape)
    block = next(b for b in (512, 256, 128) if seq % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # Built inside the trace that uses it, never cached across traces: its mask tables become
    # that program's constants (a cached kernel built under one trace would leak its tracers into
    # the next, and building it eagerly fails for compile-only TPU devices in `train.py plan`).
    return sk.make_splash_mha(
        sm.MultiHeadMask([one] * heads),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sizes,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )
