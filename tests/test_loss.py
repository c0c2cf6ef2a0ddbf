"""sevjax.loss against a NumPy reference, plus its properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sevjax import loss as L

B, T, V, D = 4, 6, 11, 8


def np_reference(logits, labels, mask, weights, normalize, z_loss=0.0):
    """Float64 NumPy reference of the three normalizations."""
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, np.clip(labels, 0, V - 1)[..., None], -1)[..., 0]
    per_token = nll + z_loss * lse**2
    m = np.asarray(mask, np.float64)
    w = np.asarray(weights, np.float64)
    w = np.broadcast_to(w[:, None], m.shape) if w.ndim == 1 else w
    if normalize == "tokens":
        return (w * m * per_token).sum() / max(m.sum(), 1.0)
    if normalize == "weighted":
        return (w * m * per_token).sum() / max((w * m).sum(), 1e-8)
    rows = [
        (w[b] * m[b] * per_token[b]).sum() / m[b].sum() for b in range(m.shape[0]) if m[b].sum() > 0
    ]
    return float(np.mean(rows)) if rows else 0.0


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    mask[1] = 0.0  # one row with no loss tokens
    labels[mask == 0] = -100  # masked positions may hold an ignore id
    weights = rng.uniform(0.5, 2.0, size=(B,)).astype(np.float32)
    token_weights = rng.uniform(0.5, 2.0, size=(B, T)).astype(np.float32)
    return logits, labels, mask, weights, token_weights


@pytest.mark.parametrize("normalize", L.NORMALIZATIONS)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_matches_numpy_reference(batch, normalize, per_token, z_loss):
    logits, labels, mask, weights, token_weights = batch
    w = token_weights if per_token else weights
    loss, aux = L.severity_weighted_cross_entropy(
        logits, labels, mask, w, normalize=normalize, z_loss=z_loss
    )
    expected = np_reference(logits, labels, mask, w, normalize, z_loss)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)
    assert aux["token_count"] == mask.sum()


@pytest.mark.parametrize("normalize", L.NORMALIZATIONS)
def test_gradient_matches_reference(batch, normalize):
    logits, labels, mask, weights, _ = batch
    grad = jax.grad(
        lambda x: L.severity_weighted_cross_entropy(x, labels, mask, weights, normalize=normalize)[
            0
        ]
    )(jnp.asarray(logits))
    # Analytic gradient: coefficient * (softmax - onehot) per token.
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(V)[np.clip(labels, 0, V - 1)]
    wm = weights[:, None] * mask
    if normalize == "tokens":
        coef = wm / max(mask.sum(), 1)
    elif normalize == "weighted":
        coef = wm / wm.sum()
    else:
        rows = mask.sum(1, keepdims=True)
        coef = wm / np.maximum(rows, 1) / (rows > 0).sum()
    np.testing.assert_allclose(grad, coef[..., None] * (p - onehot), atol=1e-5)


def test_unit_weights_give_plain_cross_entropy(batch):
    logits, labels, mask, _, _ = batch
    loss, _ = L.severity_weighted_cross_entropy(logits, labels, mask, np.ones(B, np.float32))
    nll = L.token_nll(logits, labels)
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-6)


def test_zero_weight_equals_masking(batch):
    logits, labels, mask, weights, _ = batch
    w = weights.copy()
    w[2] = 0.0
    masked = mask.copy()
    masked[2] = 0.0
    a, _ = L.severity_weighted_cross_entropy(logits, labels, mask, w, normalize="weighted")
    b, _ = L.severity_weighted_cross_entropy(logits, labels, masked, weights, normalize="weighted")
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("normalize", L.NORMALIZATIONS)
def test_split_batch_sums_combine_exactly(batch, normalize):
    logits, labels, mask, weights, _ = batch
    whole, _ = L.severity_weighted_cross_entropy(logits, labels, mask, weights, normalize=normalize)
    parts = [
        L.severity_weighted_cross_entropy(
            logits[s], labels[s], mask[s], weights[s], normalize=normalize
        )[1]
        for s in (slice(0, 1), slice(1, B))
    ]
    summed = jax.tree.map(lambda a, b: a + b, *parts)
    np.testing.assert_allclose(L.loss_from_sums(summed, normalize=normalize), whole, rtol=1e-6)


@pytest.mark.parametrize("normalize", L.NORMALIZATIONS)
def test_all_masked_gives_zero_and_finite_grads(batch, normalize):
    logits, labels, _, weights, _ = batch
    zeros = np.zeros((B, T), np.float32)

    def fn(x):
        return L.severity_weighted_cross_entropy(x, labels, zeros, weights, normalize=normalize)[0]

    value, grad = jax.value_and_grad(fn)(jnp.asarray(logits))
    assert value == 0.0
    assert np.isfinite(grad).all() and np.abs(grad).max() == 0.0


def test_bf16_logits_computed_in_float32(batch):
    logits, labels, mask, weights, _ = batch
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    loss, aux = L.severity_weighted_cross_entropy(bf16, labels, mask, weights)
    assert loss.dtype == jnp.float32 and aux["nll_sum"].dtype == jnp.float32
    ref = np_reference(np.asarray(bf16.astype(jnp.float32)), labels, mask, weights, "tokens")
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_severity_weights_and_presets():
    probs = np.array([[1, 0, 0], [0, 0, 1], [0.2, 0.3, 0.5]], np.float32)
    w = L.severity_weights(probs, L.class_weights("linear"))
    np.testing.assert_allclose(w, [1.0, 2.0, 0.2 + 0.45 + 1.0], rtol=1e-6)
    np.testing.assert_allclose(L.class_weights("uniform"), [1, 1, 1])
    balanced = L.class_weights("balanced", class_frequencies=[50, 30, 20])
    inverse = 100 / (3 * np.array([50, 30, 20]))
    np.testing.assert_allclose(balanced, inverse / inverse.mean(), rtol=1e-6)
    np.testing.assert_allclose(balanced.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(L.class_weights([1, 2, 4]), [1, 2, 4])
    with pytest.raises(ValueError, match="class_frequencies"):
        L.class_weights("balanced")
    with pytest.raises(ValueError, match="unknown class-weight preset"):
        L.class_weights("steep")
    with pytest.raises(ValueError, match="positive"):
        L.class_weights([1, 0, 2])


def test_weighted_normalization_ignores_uniform_rescaling(batch):
    logits, labels, mask, weights, _ = batch
    a, _ = L.severity_weighted_cross_entropy(logits, labels, mask, weights, normalize="weighted")
    b, _ = L.severity_weighted_cross_entropy(
        logits, labels, mask, 7 * weights, normalize="weighted"
    )
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_shape_errors_name_both_shapes(batch):
    logits, labels, mask, weights, _ = batch
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        L.severity_weighted_cross_entropy(logits, labels[:, :5], mask, weights)
    with pytest.raises(ValueError, match=r"weights \(3,\)"):
        L.severity_weighted_cross_entropy(logits, labels, mask, weights[:3])
    with pytest.raises(ValueError, match="loss_mask"):
        L.severity_weighted_cross_entropy(logits, labels, mask[:, :2], weights)
    with pytest.raises(ValueError, match="normalize"):
        L.severity_weighted_cross_entropy(logits, labels, mask, weights, normalize="mean")
    with pytest.raises(ValueError, match="class_weights"):
        L.severity_weights(np.ones((2, 3)), np.ones(4))


def test_validate_severity_probs():
    good = np.array([[0.2, 0.3, 0.5], [1, 0, 0]])
    assert L.validate_severity_probs(good).dtype == np.float32
    with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\): 1"):
        L.validate_severity_probs([[0.2, 0.3, 0.5], [np.nan, 0.5, 0.5]])
    with pytest.raises(ValueError, match=r"negative value in 1 row\(s\): 0"):
        L.validate_severity_probs([[-0.1, 0.6, 0.5]])
    with pytest.raises(ValueError, match=r"row sum not 1 within 1e-3 in 1 row\(s\): 1"):
        L.validate_severity_probs([[0.2, 0.3, 0.5], [0.2, 0.3, 0.4]])
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        L.validate_severity_probs(np.ones((2, 4)) / 4)


@pytest.fixture(scope="module")
def chunk_inputs():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.25).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=(B,)).astype(np.float32)
    return hidden, head, labels, mask, weights


@pytest.mark.parametrize("chunk_size", [6, 7, 24, 100])  # divides B*T=24 or not; larger than B*T
@pytest.mark.parametrize("transpose_head", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_equals_naive_value_and_grad(chunk_inputs, chunk_size, transpose_head, z_loss):
    hidden, head, labels, mask, weights = chunk_inputs
    head_arg = head.T.copy() if transpose_head else head

    def naive(h, w):
        logits = jnp.einsum("btd,vd->btv" if transpose_head else "btd,dv->btv", h, w)
        return L.severity_weighted_cross_entropy(logits, labels, mask, weights, z_loss=z_loss)[0]

    def chunked(h, w):
        return L.chunked_severity_weighted_cross_entropy(
            h,
            w,
            labels,
            mask,
            weights,
            chunk_size=chunk_size,
            z_loss=z_loss,
            transpose_head=transpose_head,
        )[0]

    v1, g1 = jax.value_and_grad(naive, argnums=(0, 1))(hidden, head_arg)
    v2, g2 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head_arg)
    np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g2[0], g1[0], atol=1e-5)
    np.testing.assert_allclose(g2[1], g1[1], atol=1e-5)


def test_chunked_bf16_inputs_give_f32_loss_and_input_dtype_grads(chunk_inputs):
    hidden, head, labels, mask, weights = chunk_inputs
    h, w = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(head, jnp.bfloat16)
    fn = lambda h, w: L.chunked_severity_weighted_cross_entropy(
        h, w, labels, mask, weights, chunk_size=5
    )[0]
    value, (gh, gw) = jax.value_and_grad(fn, argnums=(0, 1))(h, w)
    assert value.dtype == jnp.float32 and gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    ref, _ = L.severity_weighted_cross_entropy(logits, labels, mask, weights)
    np.testing.assert_allclose(value, ref, rtol=1e-5)


def test_chunked_shape_errors(chunk_inputs):
    hidden, head, labels, mask, weights = chunk_inputs
    with pytest.raises(ValueError, match="does not match hidden"):
        L.chunked_severity_weighted_cross_entropy(
            hidden, head, labels, mask, weights, chunk_size=4, transpose_head=True
        )
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked_severity_weighted_cross_entropy(hidden, head, labels, mask, weights, chunk_size=0)


def test_works_under_jit_grad_vmap(batch):
    logits, labels, mask, weights, _ = batch
    fn = lambda x, y, m, w: L.severity_weighted_cross_entropy(x, y, m, w)[0]
    eager = fn(logits, labels, mask, weights)
    np.testing.assert_allclose(jax.jit(fn)(logits, labels, mask, weights), eager, rtol=1e-6)
    assert np.isfinite(jax.jit(jax.grad(fn))(logits, labels, mask, weights)).all()
    # vmap over an extra leading axis: each slice is its own batch of one sequence.
    per_row = jax.vmap(fn)(logits[:, None], labels[:, None], mask[:, None], weights[:, None])
    for b in range(B):
        np.testing.assert_allclose(
            per_row[b],
            fn(logits[b : b + 1], labels[b : b + 1], mask[b : b + 1], weights[b : b + 1]),
            rtol=1e-6,
        )


def test_sharded_batch_equals_single_device(batch):
    logits, labels, mask, weights, _ = batch
    devices = np.asarray(jax.devices()[:4])
    assert devices.size == 4, "conftest sets 8 fake CPU devices"
    mesh = jax.sharding.Mesh(devices, ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    fn = jax.jit(lambda *a: L.severity_weighted_cross_entropy(*a, normalize="sequence")[0])
    single = fn(logits, labels, mask, weights)
    sharded = fn(shard(logits), shard(labels), shard(mask), shard(weights))
    np.testing.assert_allclose(sharded, single, rtol=1e-6)
