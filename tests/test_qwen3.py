"""Qwen3 (a Llama config variant): HF logits and gradient parity (unrolled and scanned), export to
transformers, greedy decoding == transformers, packing, sliding-window layers, published config."""

from pathlib import Path

import _decoder_checks as dc
import _hf_fixtures as fx
import numpy as np
import pytest
import transformers
from flax import nnx

from sevjax import hf, models
from sevjax.models import ModelOptions, llama

HF_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hf"  # published config.json files
LAYOUTS = {"unrolled": ModelOptions(), "scanned": ModelOptions(scan_layers=True)}
KINDS = ("qwen3", "qwen3-window")


def torch_qwen3(kind: str):
    """head_dim 16 != D/N = 8 (explicit), q/k RMSNorm per head. "qwen3": untied, no biases.
    "qwen3-window": tied, q/k/v/o biases (``attention_bias``), a 5-token window on the layers
    from ``max_window_layers=1`` on (layer 1 slides, layer 0 is global)."""
    kw = dict(
        vocab_size=fx.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rope_theta=1e6,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    if kind == "qwen3":
        kw.update(tie_word_embeddings=False)
    else:
        kw.update(tie_word_embeddings=True, attention_bias=True)
        kw.update(use_sliding_window=True, sliding_window=5, max_window_layers=1)
    return fx.randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw)))


@pytest.fixture(scope="module")
def torch_models():
    return {kind: torch_qwen3(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def ckpts(torch_models, tmp_path_factory):
    return {k: fx.save(m, tmp_path_factory.mktemp(k)) for k, m in torch_models.items()}


@pytest.fixture(scope="module")
def loaded(ckpts):
    """(kind, layout) -> (our model, config)."""
    return {
        (kind, layout): hf.load_pretrained(path, options=options)
        for kind, path in ckpts.items()
        for layout, options in LAYOUTS.items()
    }


EVERY = [(kind, layout) for kind in KINDS for layout in LAYOUTS]
# The compile-heavy checks run each layout once, each on one kind (the windowed kind scanned).
HEAVY = [("qwen3", "unrolled"), ("qwen3-window", "scanned")]


@pytest.mark.parametrize("kind,layout", EVERY)
def test_logits_match_hf_on_left_padded_batch(kind, layout, torch_models, loaded):
    m, config = loaded[kind, layout]
    assert config.model_type == "qwen3" and config.qk_norm and config.head_dim == 16
    assert config.qkv_bias == config.o_bias == (kind == "qwen3-window")
    if kind == "qwen3-window":
        assert config.layer_types == ("full_attention", "sliding_attention")
        assert m.sliding_window == 5 and m.local_layers == (False, True)
    else:
        assert config.sliding_window is None and m.local_layers is None
    ids, mask, _ = fx.left_padded_batch()
    ref = fx.torch_logits(torch_models[kind], ids, mask)
    out = dc.logits(m, ids, mask)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("kind,layout", HEAVY)
def test_gradients_match_torch(kind, layout, torch_models, loaded):
    fx.check_gradients(llama, torch_models[kind], *loaded[kind, layout])


@pytest.mark.parametrize("kind,layout", EVERY)
def test_export_reloads_in_transformers(kind, layout, loaded, tmp_path, caplog):
    m, config = loaded[kind, layout]
    dc.check_export_round_trip(m, config, tmp_path / "export", caplog, "Qwen3ForCausalLM")


@pytest.mark.parametrize("kind,layout", HEAVY)
def test_greedy_equals_transformers_and_cached_logits_equal_full(
    kind, layout, torch_models, loaded
):
    dc.check_greedy_and_cached_decoding(torch_models[kind], loaded[kind, layout][0])


def test_segment_ids_packing(loaded):
    fx.check_packing(loaded["qwen3-window", "unrolled"][0])


def test_config_from_published_qwen3_06b():
    d = fx.reduced(
        HF_CONFIGS / "qwen3-0.6b.json",
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128,
    )  # fmt: skip
    config = models.config_from_hf(d)
    assert isinstance(config, llama.LlamaConfig) and config.model_type == "qwen3"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.qk_norm and not config.qkv_bias and not config.o_bias and not config.mlp_bias
    assert config.rope_theta == 1e6 and config.rope_scaling is None and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings and config.sliding_window is None
    assert config.layer_types is None  # use_sliding_window=false: no layer slides
    assert (config.bos_token_id, config.eos_token_id) == (151643, 151645)
    assert llama.LlamaConfig.from_hf_config(config.to_hf_config()) == config
    hf_config = transformers.Qwen3Config(**config.to_hf_config())
    assert hf_config.layer_types == ["full_attention"] * 2 and hf_config.sliding_window is None
    m = nnx.eval_shape(lambda: llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    attn = m.layers[0].self_attn
    assert attn.q_norm.scale.shape == (16,)
    assert attn.q_norm.scale.get_metadata()["axes"] == ("head_dim",)
    assert attn.q_proj.kernel.shape == (32, 4, 16) and attn.o_proj.kernel.shape == (4, 16, 32)
    assert m.lm_head is None


def test_qwen3_sliding_window_rule_and_refusals():
    base = {"model_type": "qwen3", "num_hidden_layers": 4, "hidden_size": 32}
    base.update(num_attention_heads=4, use_sliding_window=True, sliding_window=8)
    config = llama.LlamaConfig.from_hf_config({**base, "max_window_layers": 3})
    assert config.layer_types == ("full_attention",) * 3 + ("sliding_attention",)
    assert (
        list(config.layer_types)
        == transformers.Qwen3Config(**base, max_window_layers=3).layer_types
    )
    all_full = llama.LlamaConfig.from_hf_config({**base, "max_window_layers": 4})
    assert all_full.sliding_window is None and all_full.layer_types is None
    off = llama.LlamaConfig.from_hf_config({**base, "use_sliding_window": False})
    assert off.sliding_window is None and off.layer_types is None
    with pytest.raises(ValueError, match="Qwen3 option"):
        llama.LlamaConfig(model_type="llama", layer_types=("full_attention",) * 32)
    with pytest.raises(ValueError, match="layer_types must be 4 entries"):
        llama.LlamaConfig.from_hf_config({**base, "layer_types": ["chunked_attention"] * 4})
    with pytest.raises(ValueError, match="Qwen2 use_sliding_window"):
        llama.LlamaConfig.from_hf_config({"model_type": "qwen2", "use_sliding_window": True})
