"""Checks shared by the Gemma and Qwen3 tests: export -> transformers reload, greedy generation
against transformers, cached decoding against the full forward, sampling from soft-capped logits,
and the LM task's chunked loss against full logits."""

from __future__ import annotations

import functools
import logging

import _hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from sevjax import hf, train
from sevjax import loss as L
from sevjax.config import load
from sevjax.generate import generate, sample_logits
from sevjax.models import decoder
from sevjax.schema import TrainConfig

NEW = 12


def params(m) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def logits(m, ids, mask) -> np.ndarray:
    return np.asarray(fx.forward(m, jnp.asarray(ids), jnp.asarray(mask)))


def reload_in_transformers(path, caplog):
    """Loads with transformers, failing on any missing/unexpected/mismatched key or warning."""
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            caplog.clear()
            tm, info = transformers.AutoModelForCausalLM.from_pretrained(
                path, output_loading_info=True, attn_implementation="eager"
            )
    finally:
        transformers.logging.disable_propagation()
    assert not any(info.values()), info
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    return tm.eval()


def check_export_round_trip(m, config, out_dir, caplog, architecture: str) -> None:
    """Export -> transformers (no missing/unexpected keys, no warning, logits 1e-5) -> our import
    (same config, same parameters)."""
    out = hf.save_pretrained(m, config, out_dir)
    tm = reload_in_transformers(out, caplog)
    assert type(tm).__name__ == architecture
    ids, mask, _ = fx.left_padded_batch()
    ref = fx.torch_logits(tm, ids, mask)
    assert np.abs(logits(m, ids, mask) - ref)[mask.astype(bool)].max() <= 1e-5
    m2, config2 = hf.load_pretrained(out, options=m.options)
    assert config2 == config
    a, b = params(m), params(m2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def prompts():
    ids, mask, _ = fx.left_padded_batch(batch=3, length=8, seed=3)
    return ids, mask


def check_greedy_and_cached_decoding(tm, m) -> None:
    """Our cached greedy decoding == transformers' ``generate(do_sample=False)``, and its first
    steps' logits (prefill + 3 one-token cached steps, soft-capped where the model caps) == the
    full forward's on the same tokens."""
    ids, mask = prompts()
    ours = np.asarray(generate(m, ids, mask, max_new_tokens=NEW, eos_token_id=None))
    with torch.no_grad():
        ref = tm.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(ours, ref)
    # prompt 8 + 4 = the 12 columns of the parity batch: one forward compile
    check_cached_matches_full(m, ids, mask, ours[:, :4])


def check_cached_matches_full(m, ids, mask, new) -> None:
    """The logits of a prefill of ``ids`` and 3 one-token cached steps over ``new`` (soft-capped
    where the model caps) == the full forward's on the same tokens (1e-5)."""
    full_ids = jnp.asarray(np.concatenate([ids, new], axis=1))
    full_mask = jnp.asarray(np.concatenate([mask, np.ones_like(new)], axis=1))
    full = logits(m, full_ids, full_mask)  # (B, P + 4, V)
    b, p = ids.shape
    key_valid = jnp.zeros((b, p + 4), jnp.int32).at[:, :p].set(jnp.asarray(mask))
    positions = decoder.default_positions(full_mask)

    @nnx.jit
    def step(m, ids, pos, key_valid, cache, index):
        h, cache = m.cached_hidden(ids, pos, key_valid, cache, index)
        return m.logits(h), cache

    out, cache = step(
        m, jnp.asarray(ids), positions[:, :p], key_valid, m.init_cache(b, p + 4), jnp.int32(0)
    )
    steps = [out]
    for i in range(3):
        key_valid = key_valid.at[:, p + i].set(1)
        col = slice(p + i, p + i + 1)
        out, cache = step(m, full_ids[:, col], positions[:, col], key_valid, cache, p + i)
        steps.append(out)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)  # (B, P + 3, V)
    valid = np.asarray(full_mask[:, : p + 3]).astype(bool)
    assert np.abs(cached - full[:, : p + 3])[valid].max() <= 1e-5


def check_sampling_uses_capped_logits(m) -> None:
    """``generate(temperature=1)`` draws each token from the soft-capped logits of the full
    forward with the same keys (and, for this model, not from the uncapped ones)."""
    assert m.final_logit_softcap is not None
    ids, mask = prompts()
    b, p = ids.shape
    rng = jax.random.key(11)
    ours = np.asarray(generate(m, ids, mask, max_new_tokens=NEW, temperature=1.0, rng=rng))
    full_mask = jnp.asarray(np.concatenate([mask, np.ones((b, NEW), mask.dtype)], axis=1))

    @functools.partial(nnx.jit, static_argnames="capped")
    def last_logits(m, seq, col, capped):
        h = m.hidden(seq, full_mask)  # causal: columns after ``col`` do not matter
        z = m.logits(h) if capped else decoder.project_logits(h, *m.head())
        return jax.lax.dynamic_index_in_dim(z, col, axis=1, keepdims=False)  # (B, V)

    def sample(capped: bool) -> np.ndarray:
        seq = jnp.zeros((b, p + NEW), jnp.int32).at[:, :p].set(jnp.asarray(ids))
        key = rng
        for i in range(NEW):
            key, sub = jax.random.split(key)
            z = last_logits(m, seq, p + i - 1, capped=capped)
            seq = seq.at[:, p + i].set(sample_logits(z, sub, temperature=1.0))
        return np.asarray(seq[:, p:])

    np.testing.assert_array_equal(ours, sample(capped=True))
    assert not np.array_equal(ours, sample(capped=False))


def lm_batch(seed: int = 0) -> dict[str, jax.Array]:
    """One LM batch as :class:`sevjax.train.LMTask` reads it: two rows of two packed examples."""
    rs = np.random.RandomState(seed)
    t = 16
    ids = rs.randint(3, fx.VOCAB, (2, t))
    seg = np.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * 4 + [2] * 12])
    pos = np.concatenate([np.arange(9), np.arange(5), [0, 0]])[None].repeat(2, 0)
    pos[1] = np.concatenate([np.arange(4), np.arange(12)])
    labels = np.roll(ids, -1, axis=1)
    loss_mask = (seg != 0) & (np.roll(seg, -1, axis=1) == seg)
    return {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "positions": jnp.asarray(pos, jnp.int32),
        "segment_ids": jnp.asarray(seg, jnp.int32),
        "labels": jnp.asarray(labels, jnp.int32),
        "loss_mask": jnp.asarray(loss_mask, jnp.float32),
        "weights": jnp.asarray(rs.uniform(0.5, 2.0, (2, t)), jnp.float32),
        "severity": jnp.asarray(rs.randint(0, 3, (2, t)), jnp.int32),
    }


def check_lm_task_chunked_equals_full(m, tmp_path) -> None:
    """``LMTask``'s chunked loss (hidden @ head, soft-capped inside) == its full-logits loss:
    the loss sums (1e-5), their gradients (1e-4 relative) and the eval sums (1e-5)."""
    cfg = load(TrainConfig, overrides=[f"run_dir={tmp_path}", "loss.chunk_size=7"])
    batch = lm_batch()
    graphdef, state, rest = nnx.split(m, nnx.Param, ...)

    def run(chunked: bool):
        task = train.LMTask(cfg, None, chunked=chunked)

        def loss(state):
            sums = task.loss_sums(nnx.merge(graphdef, state, rest), batch, jax.random.key(0))
            return L.loss_from_sums(sums), sums

        (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        evals = jax.jit(lambda s: task.eval_sums(nnx.merge(graphdef, s, rest), batch))(state)
        return value, sums, jax.tree.leaves(grads), evals

    full, chunk = run(False), run(True)
    np.testing.assert_allclose(chunk[0], full[0], rtol=1e-5)
    for k in chunk[1]:
        np.testing.assert_allclose(chunk[1][k], full[1][k], rtol=1e-5, err_msg=k)
    for a, b in zip(chunk[2], full[2], strict=True):
        assert np.abs(a - b).max() <= 1e-4 * max(np.abs(b).max(), 1e-6)
    for k in full[3]:
        np.testing.assert_allclose(chunk[3][k], full[3][k], rtol=1e-5, err_msg=k)
