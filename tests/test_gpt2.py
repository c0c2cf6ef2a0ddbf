"""GPT-2: HF logits/gradient parity, packing, bf16, configs from the published AraGPT2 files."""

from pathlib import Path

import _hf_fixtures as fx
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sevjax import models
from sevjax.models import gpt2

HF_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hf"  # published config.json files


@pytest.fixture(scope="module")
def torch_gpt2():
    return fx.gpt2()


@pytest.fixture(scope="module")
def ckpt(torch_gpt2, tmp_path_factory):
    return fx.save(torch_gpt2, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def model(ckpt):
    return models.load_pretrained(ckpt)


def test_logits_match_hf_on_left_padded_batch(torch_gpt2, model):
    m, _ = model
    ids, mask, _ = fx.left_padded_batch()
    ref = fx.torch_logits(torch_gpt2, ids, mask)
    out = np.asarray(m(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


def test_hidden_and_head_give_logits(model):
    m, config = model
    ids, mask, _ = fx.left_padded_batch()
    h = m.hidden(jnp.asarray(ids), jnp.asarray(mask))
    w, transpose = m.head()
    assert h.shape == (*ids.shape, config.n_embd) and transpose and w.shape == (128, 32)
    np.testing.assert_allclose(h @ w.T, m(jnp.asarray(ids), jnp.asarray(mask)), atol=1e-5)


def test_gradients_match_torch(torch_gpt2, model):
    fx.check_gradients(gpt2, torch_gpt2, *model)


def test_segment_ids_packing(model):
    fx.check_packing(model[0])


def test_bf16_forward_close_to_f32(ckpt, model):
    m32, _ = model
    m16, _ = models.load_pretrained(ckpt, dtype=jnp.bfloat16)
    ids, mask, _ = fx.left_padded_batch()
    out32 = np.asarray(m32(jnp.asarray(ids), jnp.asarray(mask)))
    out16 = m16(jnp.asarray(ids), jnp.asarray(mask))
    assert out16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out16, np.float32) - out32)[mask.astype(bool)].max()
    # bf16 has an 8-bit mantissa (eps 7.8e-3) and errors compound over the layers. Measured on
    # this fixture: max|err| = 0.060 with max|logits| = 4.58, i.e. 1.3% of the logit range. Bound:
    # 3% of the logit range.
    assert err <= 0.03 * np.abs(out32).max()


@pytest.mark.parametrize("name,width", [("aragpt2-base", 32), ("aragpt2-medium", 64)])
def test_config_from_published_aragpt2(name, width):
    d = fx.reduced(
        HF_CONFIGS / f"{name}.json", n_embd=width, n_head=4, n_layer=2, vocab_size=128, n_ctx=64
    )
    d["n_positions"] = 64
    config = models.config_from_hf(d)
    assert isinstance(config, gpt2.GPT2Config)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, None)
    assert config.n_inner is None and config.inner_size == 4 * width
    assert config.activation_function == "gelu_new" and config.tie_word_embeddings
    assert config.layer_norm_epsilon == 1e-5 and config.scale_attn_weights
    assert gpt2.GPT2Config.from_hf_config(config.to_hf_config()) == config
    m = models.build(config)
    assert m.lm_head is None and m.head()[1]
    assert m.layers[0].mlp.c_fc.kernel.shape == (width, 4 * width)
    assert m.layers[0].attn.c_attn.kernel.shape == (width, 3 * width)
    assert m(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 128)


def test_gelu_new_is_the_tanh_approximation():
    from transformers.activations import ACT2FN

    x = np.linspace(-6, 6, 101, dtype=np.float32)
    ref = ACT2FN["gelu_new"](torch.tensor(x)).numpy()
    np.testing.assert_allclose(models.layers.activation("gelu_new")(x), ref, atol=1e-6)
