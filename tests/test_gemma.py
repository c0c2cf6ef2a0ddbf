"""Gemma 2 / Gemma 3 (text): HF logits and gradient parity (unrolled and scanned), export to
transformers, greedy decoding == transformers, cached decoding and sampling with the soft-capped
logits, packing, the chunked loss with final-logit soft-capping, soft-capped attention in every
kernel path, published configs."""

import dataclasses
import math
from pathlib import Path

import _decoder_checks as dc
import _hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sevjax import hf, models
from sevjax import loss as L
from sevjax.models import ModelOptions, attention, gemma
from sevjax.models.attention import causal_mask, select_implementation

HF_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hf"  # published config.json files
LAYOUTS = {"unrolled": ModelOptions(), "scanned": ModelOptions(scan_layers=True)}
KINDS = ("gemma2", "gemma3")
ARCH = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def torch_gemma(kind: str):
    """2 layers (local then global, window 5 < the 12-token batch), head_dim 16 != D/N = 8,
    score scale 24**-0.5. gemma2: tied, soft-caps that bind (scores 2, logits 3). gemma3: q/k
    norms, local RoPE base 100 vs global 10000 with linear scaling, q/k/v/o biases, untied,
    a final-logit cap of 4 (HF Gemma 3 applies it when set)."""
    kw = dict(
        vocab_size=fx.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=5,
        query_pre_attn_scalar=24,
        attn_implementation="eager",
    )
    if kind == "gemma2":
        config = transformers.Gemma2Config(
            **kw, attn_logit_softcapping=2.0, final_logit_softcapping=3.0
        )
        return fx.randomize(transformers.Gemma2ForCausalLM(config))
    config = transformers.Gemma3TextConfig(
        **kw,
        sliding_window_pattern=2,
        rope_theta=10000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        attention_bias=True,
        tie_word_embeddings=False,
        final_logit_softcapping=4.0,
    )
    return fx.randomize(transformers.Gemma3ForCausalLM(config))


@pytest.fixture(scope="module")
def torch_models():
    return {kind: torch_gemma(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def ckpts(torch_models, tmp_path_factory):
    return {k: fx.save(m, tmp_path_factory.mktemp(k)) for k, m in torch_models.items()}


@pytest.fixture(scope="module")
def all_loaded(ckpts):
    """layout -> kind -> (our model, config)."""
    return {
        layout: {k: hf.load_pretrained(p, options=options) for k, p in ckpts.items()}
        for layout, options in LAYOUTS.items()
    }


@pytest.fixture(scope="module", params=list(LAYOUTS))
def loaded(request, all_loaded):
    """kind -> (our model, config) for one layout."""
    return all_loaded[request.param]


@pytest.fixture(scope="module")
def unrolled(all_loaded):
    """For the tests whose subject does not depend on the layout."""
    return all_loaded["unrolled"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_on_left_padded_batch(kind, torch_models, loaded):
    m, config = loaded[kind]
    assert config.layer_types == ("sliding_attention", "full_attention")
    assert m.local_layers == (True, False) and m.sliding_window == 5
    assert m.final_logit_softcap == (3.0 if kind == "gemma2" else 4.0)
    ids, mask, _ = fx.left_padded_batch()
    ref = fx.torch_logits(torch_models[kind], ids, mask)
    out = dc.logits(m, ids, mask)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4
    tm, positions = torch_models[kind], torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))
    with torch.no_grad():  # the logits before the cap: it binds on this batch
        h = tm.model(torch.tensor(ids), torch.tensor(mask), positions).last_hidden_state
        raw = tm.lm_head(h).numpy()[mask.astype(bool)]
    assert np.abs(out).max() < m.final_logit_softcap < np.abs(raw).max()


def test_local_global_pattern_is_what_matches(unrolled, torch_models):
    """The same weights with every layer global no longer match HF (the window matters)."""
    m, config = unrolled["gemma2"]
    glob = dataclasses.replace(config, layer_types=("full_attention",) * 2)
    abstract = nnx.eval_shape(lambda: gemma.GemmaForCausalLM(glob, rngs=nnx.Rngs(0)))
    other = nnx.merge(nnx.graphdef(abstract), nnx.state(m))
    ids, mask, _ = fx.left_padded_batch()
    ref = fx.torch_logits(torch_models["gemma2"], ids, mask)
    assert np.abs(dc.logits(other, ids, mask) - ref)[mask.astype(bool)].max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_torch(kind, torch_models, loaded):
    fx.check_gradients(gemma, torch_models[kind], *loaded[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_export_reloads_in_transformers(kind, loaded, tmp_path, caplog):
    dc.check_export_round_trip(*loaded[kind], tmp_path / "export", caplog, ARCH[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_transformers_and_cached_logits_equal_full(kind, torch_models, loaded):
    dc.check_greedy_and_cached_decoding(torch_models[kind], loaded[kind][0])


def test_sampling_draws_from_soft_capped_logits(unrolled):
    dc.check_sampling_uses_capped_logits(unrolled["gemma2"][0])


@pytest.mark.parametrize("kind,layout", [("gemma2", "scanned"), ("gemma3", "unrolled")])
def test_segment_ids_packing(kind, layout, all_loaded):
    fx.check_packing(all_loaded[layout][kind][0])


def test_lm_task_chunked_loss_with_soft_cap_equals_full_logits(unrolled, tmp_path):
    """The train step's loss (``LMTask``) on the tied, soft-capped Gemma 2; the untied head is
    covered by the loss-level test below."""
    dc.check_lm_task_chunked_equals_full(unrolled["gemma2"][0], tmp_path)


# ------------------------------------------------------------------ chunked loss, NumPy reference


def _numpy_capped_loss(hidden, head, labels, mask, weights, cap, z_loss):
    z = np.einsum("btd,dv->btv", hidden.astype(np.float64), head.astype(np.float64))
    z = cap * np.tanh(z / cap)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll = lse - np.take_along_axis(z, labels[..., None], -1)[..., 0]
    per_token = nll + z_loss * lse**2
    return (weights[:, None] * mask * per_token).sum() / max(mask.sum(), 1.0)


@pytest.mark.parametrize(  # chunks that divide B*T=24 or not, or exceed it; both head layouts
    "chunk_size,z_loss,transpose_head", [(5, 0.0, False), (24, 1e-2, True), (100, 0.0, True)]
)
def test_chunked_soft_capped_loss_matches_numpy_and_full_logits(transpose_head, chunk_size, z_loss):
    rng = np.random.default_rng(3)
    b, t, d, v, cap = 2, 12, 16, 40, 2.5
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    head = rng.normal(size=(d, v)).astype(np.float32)  # logits up to ~15: the cap binds
    labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) > 0.25).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=(b,)).astype(np.float32)
    head_arg = head.T.copy() if transpose_head else head

    def full(h, w):
        z = jnp.einsum("btd,vd->btv" if transpose_head else "btd,dv->btv", h, w)
        z = cap * jnp.tanh(z / cap)
        return L.severity_weighted_cross_entropy(z, labels, mask, weights, z_loss=z_loss)[0]

    def chunked(h, w):
        return L.chunked_severity_weighted_cross_entropy(
            h, w, labels, mask, weights, chunk_size=chunk_size, z_loss=z_loss,
            transpose_head=transpose_head, logit_softcap=cap,
        )[0]  # fmt: skip

    v1, g1 = jax.value_and_grad(full, argnums=(0, 1))(hidden, head_arg)
    v2, g2 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head_arg)
    expected = _numpy_capped_loss(hidden, head, labels, mask, weights, cap, z_loss)
    np.testing.assert_allclose(v2, expected, rtol=1e-5)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    np.testing.assert_allclose(g2[0], g1[0], atol=1e-5)
    np.testing.assert_allclose(g2[1], g1[1], atol=1e-5)
    uncapped = L.chunked_severity_weighted_cross_entropy(
        hidden, head_arg, labels, mask, weights, chunk_size=chunk_size, z_loss=z_loss,
        transpose_head=transpose_head,
    )[0]  # fmt: skip
    assert abs(float(uncapped) - float(v2)) > 0.1  # the cap changes the loss here
    with pytest.raises(ValueError, match="logit_softcap"):
        L.chunked_severity_weighted_cross_entropy(
            hidden, head, labels, mask, weights, chunk_size=4, logit_softcap=0.0
        )


# ------------------------------------------------------------------- soft-capped attention kernels


@pytest.mark.parametrize(
    "requested,backend,dtype,q_len,head_dim,aligned,expected,why",
    [
        ("auto", "cpu", jnp.float32, 16, 8, True, "reference", "soft-cap"),
        ("xla", "gpu", jnp.bfloat16, 128, 64, True, "reference", "soft-cap"),
        ("auto", "gpu", jnp.bfloat16, 128, 64, True, "reference", "soft-cap"),  # cudnn has none
        ("cudnn", "gpu", jnp.float32, 128, 64, True, "reference", "not float32; logit soft"),
        ("auto", "tpu", jnp.bfloat16, 256, 64, True, "splash", None),  # splash applies the cap
        ("auto", "tpu", jnp.bfloat16, 100, 64, True, "reference", "multiple of 128"),
        ("auto", "tpu", jnp.bfloat16, 1, 64, False, "reference", "KV cache"),  # cached decode
        ("splash", "cpu", jnp.float32, 128, 8, True, "splash", None),  # interpret mode
        ("reference", "gpu", jnp.bfloat16, 128, 64, True, "reference", None),
    ],
)
def test_selection_rule_with_soft_capped_scores(
    requested, backend, dtype, q_len, head_dim, aligned, expected, why
):
    kv_len = q_len if aligned else 256
    impl, reason = select_implementation(
        requested, backend=backend, dtype=dtype, q_len=q_len, kv_len=kv_len,
        head_dim=head_dim, aligned=aligned, softcap=True,
    )  # fmt: skip
    assert impl == expected
    assert (reason is None) == (why is None) and (why is None or why in reason), reason


def _qkv(t, seed=0):
    rs = np.random.RandomState(seed)
    shapes = ((2, t, 4, 8), (2, t, 2, 8), (2, t, 2, 8))
    return [jnp.asarray(3 * rs.randn(*s), jnp.float32) for s in shapes]  # big scores: cap binds


def _numpy_attention(q, k, v, dense, scale, cap):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # GQA: 2 query heads per kv head
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    s = cap * np.tanh(s / cap)
    s = np.where(np.asarray(dense), s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def test_reference_and_xla_request_apply_the_soft_cap():
    q, k, v = _qkv(16)
    valid = np.ones((2, 16), np.int32)
    valid[1, :3] = 0
    expected = None
    for impl in ("reference", "xla"):  # "xla" cannot cap: it must fall back to the reference
        mask = causal_mask(jnp.asarray(valid), window=5, implementation=impl)
        out = jax.jit(lambda q, k, v, m: attention.attend(q, k, v, m, scale=0.3, softcap=2.0))(
            q, k, v, mask
        )
        expected = _numpy_attention(q, k, v, mask.dense, 0.3, 2.0)
        rows = valid.astype(bool)
        np.testing.assert_allclose(np.asarray(out)[rows], expected[rows], atol=1e-5)
    uncapped = attention.attend(q, k, v, mask, scale=0.3)
    assert np.abs(np.asarray(uncapped) - expected)[valid.astype(bool)].max() > 1e-2


def test_splash_interpret_applies_the_soft_cap():
    """The Pallas splash kernel (interpret mode on CPU) with a cap and a sliding window equals
    the reference path, forward and gradients."""
    t = 128
    q, k, v = _qkv(t)
    cot = jnp.asarray(np.random.RandomState(1).randn(2, t, 4, 8), jnp.float32)
    valid = jnp.ones((2, t), jnp.int32)

    def run(impl):
        mask = causal_mask(valid, window=40, implementation=impl)

        def f(q, k, v):
            return (attention.attend(q, k, v, mask, scale=0.3, softcap=2.0) * cot).sum()

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (val_s, g_s), (val_r, g_r) = run("splash"), run("reference")
    np.testing.assert_allclose(val_s, val_r, rtol=1e-5)
    for a, b in zip(g_s, g_r, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_scanned_model_with_splash_equals_reference_on_packed_batch():
    """A scanned Gemma 2 (local and global layers, so each layer's kernel is picked by a
    ``lax.cond``; soft-capped scores) with splash (interpret mode) == the reference path."""
    config = gemma.GemmaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=40,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, max_position_embeddings=256,
    )  # fmt: skip
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(3, 128, (2, 128)), jnp.int32)
    seg = np.ones((2, 128), np.int32)
    seg[0, 60:], seg[1, -10:] = 2, 0
    pos = np.arange(128)[None].repeat(2, 0)
    pos[0, 60:] -= 60

    def forward(m):
        return m(ids, position_ids=jnp.asarray(pos), segment_ids=jnp.asarray(seg))

    splash = models.build(config, options=ModelOptions(scan_layers=True, attention="splash"))
    abstract = nnx.eval_shape(
        lambda: gemma.GemmaForCausalLM(
            config, options=ModelOptions(scan_layers=True, attention="reference"), rngs=nnx.Rngs(0)
        )
    )
    reference = nnx.merge(nnx.graphdef(abstract), nnx.state(splash))
    out, ref = (np.asarray(nnx.jit(forward)(m)) for m in (splash, reference))
    assert np.abs(out - ref)[seg != 0].max() <= 1e-5


# ------------------------------------------------------------------------------ published configs


def test_config_from_published_gemma2_9b():
    d = fx.reduced(
        HF_CONFIGS / "gemma-2-9b.json",
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128,
    )  # fmt: skip
    config = models.config_from_hf(d)
    assert isinstance(config, gemma.GemmaConfig) and config.model_type == "gemma2"
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert config.query_pre_attn_scalar == 256 and config.sliding_window == 4096
    assert config.hidden_activation == "gelu_pytorch_tanh" and config.tie_word_embeddings
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.rope_local_base_freq is None and config.local_rope_theta == 10000.0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 1, 0)
    assert list(config.layer_types) == transformers.Gemma2Config(**d).layer_types
    assert gemma.GemmaConfig.from_hf_config(config.to_hf_config()) == config
    assert transformers.Gemma2Config(**config.to_hf_config()).layer_types == list(
        config.layer_types
    )
    m = nnx.eval_shape(lambda: gemma.GemmaForCausalLM(config, rngs=nnx.Rngs(0)))
    attn = m.layers[0].self_attn
    assert attn.softcap == 50.0 and math.isclose(attn.scale, 1 / 16) and attn.q_norm is None
    assert m.lm_head is None and m.final_logit_softcap == 30.0


def test_config_from_published_gemma3_1b():
    d = fx.reduced(
        HF_CONFIGS / "gemma-3-1b-it.json",
        hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=128,
    )  # fmt: skip
    config = models.config_from_hf(d)
    assert isinstance(config, gemma.GemmaConfig) and config.model_type == "gemma3_text"
    assert config.attn_logit_softcapping is None and config.final_logit_softcapping is None
    assert config.rope_theta == 1e6 and config.local_rope_theta == 1e4
    assert config.sliding_window == 512 and config.eos_token_id == (1, 106)
    assert list(config.layer_types) == transformers.Gemma3TextConfig(**d).layer_types
    assert config.local_layers == (True,) * 5 + (False, True)  # every 6th layer is global
    assert gemma.GemmaConfig.from_hf_config(config.to_hf_config()) == config
    hf_again = transformers.Gemma3TextConfig(**config.to_hf_config())
    assert hf_again.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert hf_again.rope_parameters["full_attention"]["rope_theta"] == 1e6
    m = nnx.eval_shape(lambda: gemma.GemmaForCausalLM(config, rngs=nnx.Rngs(0)))
    assert m.layers[0].self_attn.q_norm is not None and m.final_logit_softcap is None
    assert m.layers[0].self_attn.softcap is None
    ignored = dataclasses.replace(config, attn_logit_softcapping=50.0)  # HF Gemma 3 ignores it
    assert gemma.GemmaAttention(ignored, dtype=jnp.float32, param_dtype=jnp.float32,
                                rngs=nnx.Rngs(0)).softcap is None  # fmt: skip


def test_unsupported_gemma_options_are_refused():
    base = {"model_type": "gemma2", "num_hidden_layers": 2}
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        gemma.GemmaConfig.from_hf_config({**base, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="layer_types"):
        gemma.GemmaConfig.from_hf_config({**base, "layer_types": ["chunked_attention"] * 2})
    with pytest.raises(ValueError, match="sliding_window is null"):
        gemma.GemmaConfig.from_hf_config({**base, "sliding_window": None})
    with pytest.raises(ValueError, match="rope_type"):
        gemma.GemmaConfig.from_hf_config(
            {
                "model_type": "gemma3_text",
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
                },
            }
        )
