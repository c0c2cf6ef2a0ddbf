"""Tiny random transformers decoder models saved to disk, plus torch reference helpers."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sevjax.models.hf_table import locate, to_ours

VOCAB = 128
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (HF inits biases to 0 and norms to 1, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.08 * noise if name.endswith("bias") else 0.2 * noise)
    return model.eval()


def gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    kw.update(bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    kw.update(overrides)
    return randomize(GPT2LMHeadModel(GPT2Config(**kw)))


def llama(kind: str = "llama", **overrides):
    """kind: "llama" (untied, llama3 rope scaling), "qwen2" (q/k/v bias, tied), "qwen2-untied"
    or "mistral" (sliding window of 5 tokens)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    if kind == "llama":
        kw.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False)
        kw.update(overrides)
        return randomize(LlamaForCausalLM(LlamaConfig(**kw)))
    if kind == "mistral":
        kw.update(sliding_window=5, **overrides)
        return randomize(MistralForCausalLM(MistralConfig(**kw)))
    kw.update(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=kind == "qwen2")
    kw.update(overrides)
    return randomize(Qwen2ForCausalLM(Qwen2Config(**kw)))


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def left_padded_batch(batch: int = 3, length: int = 12, seed: int = 0):
    """(ids, mask, positions) int64 [B, T]; row b has 2*b leading pad tokens (pad id 0)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for b in range(batch):
        mask[b, : 2 * b] = 0
    ids = ids * mask
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, positions


def torch_logits(model, ids, mask) -> np.ndarray:
    """Reference logits [B, T, V] with explicit cumsum position ids (HF GPT-2 defaults to arange)."""
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def reduced(hf_config_path: Path, **sizes) -> dict:
    """A published config.json with its sizes replaced by tiny ones (every other field kept)."""
    d = json.loads(Path(hf_config_path).read_text())
    d.update(sizes)
    return d


@nnx.jit
def forward(m, ids, mask=None, position_ids=None, segment_ids=None):
    """``m(...)`` jitted: one compile per shape (eager calls of a scanned model recompile)."""
    return m(ids, mask, position_ids, segment_ids=segment_ids)


def masked_lm_loss_jax(m, ids, mask):
    logits = m(ids, mask)[:, :-1].astype(jnp.float32)
    weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return (nll * weights).sum() / weights.sum()


def masked_lm_loss_torch(tm, ids, mask):
    positions = torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    logits = tm(ids_t, attention_mask=mask_t, position_ids=positions).logits[:, :-1]
    weights = (mask_t[:, 1:] * mask_t[:, :-1]).float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1), reduction="none"
    ).reshape(weights.shape)
    return (nll * weights).sum() / weights.sum()


def flat_params(tree) -> dict[str, np.ndarray]:
    """Dot-joined path -> value of every variable in an nnx state / module's params."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def per_layer(table, flat):
    """(row, our per-layer value) for every table row, unstacking scanned parameters."""
    out = []
    for row in table:
        path, layer = locate(row.path, flat)
        out.append((row, flat[path] if layer is None else flat[path][layer]))
    return out


def check_gradients(module, tm, m, config):
    """Gradient of the masked LM loss w.r.t. every parameter matches torch (1e-4 relative)."""
    ids, mask, _ = left_padded_batch()
    grads = nnx.jit(nnx.grad(masked_lm_loss_jax))(m, jnp.asarray(ids), jnp.asarray(mask))
    flat = flat_params(grads)
    tm.zero_grad()
    masked_lm_loss_torch(tm, ids, mask).backward()
    ref = dict(tm.named_parameters())
    table = module.hf_param_table(config)
    assert {locate(row.path, flat)[0] for row in table} == set(flat)
    for row, g in per_layer(table, flat):
        g_ref = to_ours(row, ref[row.hf_key].grad.numpy(), g.shape)
        rel = np.abs(g - g_ref).max() / np.abs(g_ref).max()
        assert rel <= 1e-4, (row.hf_key, rel)


def check_packing(m):
    """A row packing two examples gives the logits of the two examples run alone."""
    rs = np.random.RandomState(1)
    a, b = rs.randint(3, 128, 5), rs.randint(3, 128, 7)
    ids = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 7 + [0, 0]])
    pos = np.concatenate([np.arange(5), np.arange(7), [0, 0]])[None]
    packed = np.asarray(forward(m, jnp.asarray(ids), None, jnp.asarray(pos), jnp.asarray(seg)))
    alone_a = np.asarray(forward(m, jnp.asarray(a[None])))
    alone_b = np.asarray(forward(m, jnp.asarray(b[None])))
    assert np.abs(packed[0, :5] - alone_a[0]).max() <= 1e-5
    assert np.abs(packed[0, 5:12] - alone_b[0]).max() <= 1e-5
    with pytest.raises(ValueError, match="position_ids"):
        m(jnp.asarray(ids), segment_ids=seg)
