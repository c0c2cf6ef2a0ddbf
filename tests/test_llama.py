"""Llama / Qwen2 / Mistral: HF logits and gradient parity (unrolled and scanned), packing, bf16,
sharding, published configs."""

import dataclasses
from pathlib import Path

import _hf_fixtures as fx
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sevjax import hf, models
from sevjax.models import ModelOptions, llama
from sevjax.sharding import logical_to_spec, make_mesh

HF_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hf"  # published config.json files
KINDS = ("llama", "qwen2", "qwen2-untied", "mistral")
LAYOUTS = {"unrolled": ModelOptions(), "scanned": ModelOptions(scan_layers=True)}


@pytest.fixture(scope="module")
def torch_models():
    return {kind: fx.llama(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def ckpts(torch_models, tmp_path_factory):
    return {k: fx.save(m, tmp_path_factory.mktemp(k)) for k, m in torch_models.items()}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def loaded(request, ckpts):
    return {k: hf.load_pretrained(p, options=LAYOUTS[request.param]) for k, p in ckpts.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_on_left_padded_batch(kind, torch_models, loaded):
    m, config = loaded[kind]
    assert config.tie_word_embeddings == (kind == "qwen2")
    assert config.qkv_bias == kind.startswith("qwen2") and not config.o_bias
    assert config.sliding_window == (5 if kind == "mistral" else None)
    ids, mask, _ = fx.left_padded_batch()
    ref = fx.torch_logits(torch_models[kind], ids, mask)
    out = np.asarray(fx.forward(m, jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


def test_llama3_rope_scaling_is_used(loaded):
    config = loaded["llama"][1]
    assert dict(config.rope_scaling)["rope_type"] == "llama3" and config.rope_theta == 5e5
    plain = dataclasses.replace(config, rope_scaling=None)
    model = loaded["llama"][0]
    cls = models.model_class(plain)
    attn = nnx.eval_shape(lambda: cls(plain, options=model.options, rngs=nnx.Rngs(0))).layers
    scaled = model.layers
    if isinstance(scaled, nnx.List):
        attn, scaled = attn[0], scaled[0]
    assert attn.self_attn.inv_freq != scaled.self_attn.inv_freq


def test_gradients_match_torch(torch_models, loaded):
    fx.check_gradients(llama, torch_models["llama"], *loaded["llama"])


def test_segment_ids_packing(loaded):
    fx.check_packing(loaded["qwen2"][0])


def test_bf16_forward_close_to_f32(ckpts, loaded):
    m32, _ = loaded["llama"]
    m16, _ = hf.load_pretrained(ckpts["llama"], dtype=jnp.bfloat16, options=m32.options)
    ids, mask, _ = fx.left_padded_batch()
    out32 = np.asarray(fx.forward(m32, jnp.asarray(ids), jnp.asarray(mask)))
    out16 = fx.forward(m16, jnp.asarray(ids), jnp.asarray(mask))
    assert out16.dtype == jnp.float32  # bf16 matmuls, logits accumulated and returned in f32
    err = np.abs(np.asarray(out16) - out32)[mask.astype(bool)].max()
    # bf16 eps is 7.8e-3 and errors compound over the layers. Measured on this fixture:
    # max|err| = 0.077 with max|logits| = 4.42, i.e. 1.7% of the logit range. Bound: 3%.
    assert err <= 0.03 * np.abs(out32).max()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharding_follows_rules_on_fsdp2_tensor4_mesh(layout):
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    config = llama.LlamaConfig(
        model_type="qwen2",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    m = models.build(config, mesh=mesh, options=LAYOUTS[layout])
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        value = var.get_value()
        expected = NamedSharding(
            mesh, logical_to_spec(var.get_metadata()["axes"], mesh, value.shape)
        )
        assert value.sharding.is_equivalent_to(expected, value.ndim), path
    lead = (None,) if layout == "scanned" else ()  # the stacked "layers" axis is replicated
    block = m.layers if layout == "scanned" else m.layers[0]
    if layout == "scanned":
        assert block.self_attn.q_proj.kernel.get_metadata()["axes"][0] == "layers"
        assert block.self_attn.q_proj.kernel.shape == (2, 64, 8, 8)
    attn = block.self_attn
    spec = lambda v: v.get_value().sharding.spec  # noqa: E731
    assert spec(attn.q_proj.kernel) == PartitionSpec(*lead, "fsdp", "tensor", None)
    assert spec(attn.k_proj.kernel) == PartitionSpec(*lead, "fsdp", "tensor", None)
    assert spec(attn.o_proj.kernel) == PartitionSpec(*lead, "tensor", None, "fsdp")
    assert spec(m.embed_tokens.embedding) == PartitionSpec("tensor", "fsdp")
    assert spec(m.lm_head.kernel) == PartitionSpec("fsdp", "tensor")
    assert spec(block.mlp.down_proj.kernel) == PartitionSpec(*lead, "tensor", "fsdp")


def test_config_from_published_qwen25():
    d = fx.reduced(
        HF_CONFIGS / "qwen2.5-0.5b.json",
        hidden_size=56,  # 14 heads of 4
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        max_window_layers=2,
    )
    config = models.config_from_hf(d)
    assert isinstance(config, llama.LlamaConfig) and config.model_type == "qwen2"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (14, 2, 4)
    assert config.qkv_bias and not config.o_bias and not config.mlp_bias
    assert config.rope_theta == 1e6 and config.rope_scaling is None
    assert config.rms_norm_eps == 1e-6 and config.tie_word_embeddings
    assert config.hidden_act == "silu" and config.eos_token_id == config.bos_token_id == 151643
    assert llama.LlamaConfig.from_hf_config(config.to_hf_config()) == config
    m = models.build(config)
    attn = m.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    assert attn.o_proj.bias is None and m.lm_head is None and m.head()[1]
    assert attn.k_proj.kernel.shape == (56, 2, 4) and attn.q_proj.kernel.shape == (56, 14, 4)
    assert fx.forward(m, jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 128)


def test_old_style_rope_config_and_unsupported_rope_type():
    old = {
        "model_type": "llama",
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    config = llama.LlamaConfig.from_hf_config({**old, "hidden_size": 32, "num_attention_heads": 4})
    assert config.rope_theta == 5e5 and dict(config.rope_scaling)["rope_type"] == "linear"
    with pytest.raises(ValueError, match="rope_type"):
        llama.LlamaConfig.from_hf_config({"model_type": "llama", "rope_scaling": {"type": "yarn"}})
