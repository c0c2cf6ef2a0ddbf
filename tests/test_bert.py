"""BERT classifier: parity with transformers' PyTorch BERT on tiny random checkpoints, unrolled and
scanned."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sevjax import hf
from sevjax.models import ModelOptions, bert, build
from sevjax.models.hf_table import locate, to_ours
from sevjax.sharding import make_mesh

LAYOUTS = {"unrolled": ModelOptions(), "scanned": ModelOptions(scan_layers=True)}

# The published bert-base-arabertv02 config.json, reduced in size (fewer layers, narrower,
# smaller vocabulary); every option it sets is kept.
ARABERT_TINY = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "vocab_size": 200,
}
LABELS = ("mild", "moderate", "critical")
TOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial biases and LayerNorm affine params, so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    B, T = 3, 16
    lengths = [16, 11, 5]
    ids = rng.integers(5, ARABERT_TINY["vocab_size"], (B, T))
    mask = np.zeros((B, T), np.int64)
    types = np.zeros((B, T), np.int64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        types[b, n // 2 : n] = 1
    ids = np.where(mask == 1, ids, 0)
    return ids, mask, types


@pytest.fixture(scope="module")
def cls_ckpt(tmp_path_factory):
    """A tiny random BertForSequenceClassification saved with save_pretrained."""
    hf_cfg = transformers.BertConfig(
        **{**ARABERT_TINY, "architectures": ["BertForSequenceClassification"]},
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    tm = transformers.BertForSequenceClassification(hf_cfg).eval()
    _randomize(tm, 0)
    path = tmp_path_factory.mktemp("bert_cls")
    tm.save_pretrained(path)
    return tm, path


@pytest.fixture(scope="module")
def forward():
    """One jitted forward shared by the tests: (logits, hidden states)."""

    @nnx.jit
    def fwd(model, ids, mask, types):
        return model(ids, mask, types), model.hidden_states(ids, mask, types)

    return fwd


@pytest.fixture(scope="module", params=list(LAYOUTS))
def ours(request, cls_ckpt):
    return hf.load_pretrained(str(cls_ckpt[1]), options=LAYOUTS[request.param])


def _flat(tree):
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(tree)}


def _torch_out(tm, batch):
    ids, mask, types = (torch.as_tensor(x) for x in batch)
    with torch.no_grad():
        out = tm(
            input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
        )
    return out


def _hidden_err(ours_hs, ref_hs, mask):
    keep = np.asarray(mask, bool)
    assert len(ours_hs) == len(ref_hs)
    return [
        float(np.abs(np.asarray(a, np.float32)[keep] - np.asarray(t)[keep]).max())
        for a, t in zip(ours_hs, ref_hs)
    ]


def test_config_from_arabert_fields():
    cfg = bert.BertConfig.from_hf_config(ARABERT_TINY)
    assert cfg.num_labels == 3  # a MaskedLM checkpoint carries no label set
    assert cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-12
    assert cfg.type_vocab_size == 2 and cfg.max_position_embeddings == 64
    assert cfg.hidden_dropout_prob == 0.1 and cfg.attention_probs_dropout_prob == 0.1
    assert cfg.classifier_dropout is None and cfg.pad_token_id == 0
    ref = transformers.BertConfig(**ARABERT_TINY)
    for f in dataclasses.fields(cfg):
        if f.name not in ("num_labels", "id2label"):
            assert getattr(cfg, f.name) == getattr(ref, f.name), f.name

    named = dataclasses.replace(cfg, id2label=LABELS)
    d = named.to_hf_config()
    assert d["architectures"] == [bert.HF_ARCHITECTURE]
    back = transformers.BertConfig(**d)
    assert back.num_labels == 3 and back.id2label == dict(enumerate(LABELS))
    assert bert.BertConfig.from_hf_config(back.to_dict()) == named
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.from_hf_config({**ARABERT_TINY, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act"):
        dataclasses.replace(cfg, hidden_act="swish7")


def test_param_table_covers_model(ours, cls_ckpt):
    model, cfg = ours
    flat = _flat(nnx.state(model, nnx.Param))
    table = bert.hf_param_table(cfg)
    located = [locate(row.path, flat) for row in table]
    assert {path for path, _ in located} == set(flat) and len(set(located)) == len(table)
    assert {row.hf_key for row in table} == set(cls_ckpt[0].state_dict()) - {
        k for k in cls_ckpt[0].state_dict() if any(re.fullmatch(r, k) for r in bert.HF_IGNORE)
    }
    scanned = model.options.scan_layers
    for path, var in flat.items():
        axes = var.get_metadata()["axes"]
        assert len(axes) == var.ndim and (axes[0] == "layers") == (scanned and "layers" in path)


def test_logits_and_hidden_states_parity(ours, cls_ckpt, batch, forward):
    model, cfg = ours
    out = _torch_out(cls_ckpt[0], batch)
    logits, hs = forward(model, *(jnp.asarray(x) for x in batch))
    assert logits.shape == (3, cfg.num_labels) and logits.dtype == jnp.float32
    assert len(hs) == cfg.num_hidden_layers + 1
    errs = _hidden_err(hs, out.hidden_states, batch[1])
    assert max(errs) <= TOL, errs
    assert np.abs(np.asarray(logits) - out.logits.numpy()).max() <= TOL


def test_bf16_close_to_f32(cls_ckpt, batch, ours, forward):
    model32, _ = ours
    model16, _ = hf.load_pretrained(str(cls_ckpt[1]), dtype=jnp.bfloat16, options=model32.options)
    args = [jnp.asarray(x) for x in batch]
    l32, hs32 = forward(model32, *args)
    l16, hs16 = forward(model16, *args)
    assert l16.dtype == jnp.bfloat16 and hs16[-1].dtype == jnp.bfloat16
    # Measured on 6 random batches: max |Δlogits| <= 3.0e-3 (|logits| <= 0.5) and max |Δh| <=
    # 0.038 on non-pad hidden states (|h| <= 4.1, bf16 eps 7.8e-3). Bounds are ~3x those.
    err = float(np.abs(np.asarray(l16, np.float32) - np.asarray(l32)).max())
    assert err <= 1e-2, err
    errs = _hidden_err(hs16, hs32, batch[1])
    assert max(errs) <= 0.1, errs


def test_loaded_model_is_in_eval_mode(ours, batch, forward):
    model, _ = ours
    args = [jnp.asarray(x) for x in batch]
    first, second = (np.asarray(forward(model, *args)[0]) for _ in range(2))
    np.testing.assert_array_equal(first, second)


def test_dropout_train_view_vs_eval(ours, cls_ckpt, batch, forward):
    args = [jnp.asarray(x) for x in batch]
    model, _ = ours
    train = nnx.view(model, deterministic=False)  # dropout on, parameters shared

    def run(seed):  # RBG keys: threefry dropout compiles slowly on XLA:CPU
        key = jax.random.key(seed, impl="rbg")
        nnx.reseed(train, dropout=key, policy="match_shape")  # scanned streams are [L]
        return np.asarray(forward(train, *args)[0])

    l1 = run(1)
    np.testing.assert_array_equal(l1, run(1))  # same "dropout" seed -> same masks
    assert np.abs(l1 - run(2)).max() > 1e-3
    assert np.abs(l1 - np.asarray(forward(train, *args)[0])).max() > 1e-3  # stream advances
    e1 = np.asarray(forward(model, *args)[0])  # the model itself stayed in eval mode
    ref = _torch_out(cls_ckpt[0], batch).logits.numpy()
    assert np.abs(e1 - ref).max() <= TOL


def test_grad_matches_torch(ours, cls_ckpt, batch):
    model, cfg = ours
    tm = cls_ckpt[0]
    labels = np.array([0, 2, 1])
    ids, mask, types = (torch.as_tensor(x) for x in batch)
    tm.zero_grad()
    loss_t = torch.nn.functional.cross_entropy(
        tm(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, torch.as_tensor(labels)
    )
    loss_t.backward()
    grads_t = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    def loss_fn(m):
        logits = m(*(jnp.asarray(x) for x in batch))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], 1).mean()

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    assert abs(float(loss) - loss_t.item()) <= 1e-5
    flat = _flat(grads)
    for row in bert.hf_param_table(cfg):
        path, layer = locate(row.path, flat)
        g = np.asarray(flat[path][...])
        g = g if layer is None else g[layer]
        gt = to_ours(row, grads_t[row.hf_key], g.shape)
        # attention.self.key.bias has an exactly-zero gradient (softmax ignores a per-query
        # constant); both sides give ~1e-10 round-off there, hence the 1e-8 absolute floor.
        scale = np.abs(gt).max()
        err = np.abs(g - gt).max()
        assert err <= TOL * scale + 1e-8, (row.hf_key, err, scale)


@pytest.fixture(scope="module")
def mlm_ckpt(tmp_path_factory):
    """A tiny random AraBERT-shaped BertForMaskedLM (encoder + MLM head, no pooler)."""
    torch.manual_seed(1)
    tm = transformers.BertForMaskedLM(transformers.BertConfig(**ARABERT_TINY)).eval()
    _randomize(tm, 1)
    path = tmp_path_factory.mktemp("bert_mlm")
    tm.save_pretrained(path)
    return tm, path


def test_import_masked_lm_checkpoint(mlm_ckpt, batch, forward, capsys):
    tm, path = mlm_ckpt
    model, cfg = hf.load_pretrained(str(path))
    assert cfg.num_labels == 3
    notes = capsys.readouterr().out
    for p in ("classifier.bias", "classifier.kernel", "pooler.bias", "pooler.kernel"):
        assert f"{p} is not in" in notes, notes
    assert "layers.0" not in notes and "embeddings" not in notes
    logits, hs = forward(model, *(jnp.asarray(x) for x in batch))
    assert logits.shape == (3, 3) and np.isfinite(np.asarray(logits)).all()
    out = _torch_out(tm, batch)
    errs = _hidden_err(hs, out.hidden_states, batch[1])
    assert max(errs) <= TOL, errs


def test_export_round_trip(ours, batch, forward, tmp_path):
    model, cfg = ours
    named = dataclasses.replace(cfg, id2label=LABELS)
    hf.save_pretrained(model, named, tmp_path)
    tm = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert tm.config.id2label == dict(enumerate(LABELS))
    logits, _ = forward(model, *(jnp.asarray(x) for x in batch))
    ref = _torch_out(tm, batch).logits.numpy()
    assert np.abs(np.asarray(logits) - ref).max() <= TOL


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_load_and_forward(layout, cls_ckpt, batch, forward):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model, _ = hf.load_pretrained(str(cls_ckpt[1]), mesh=mesh, options=LAYOUTS[layout])
    lead = (None,) if layout == "scanned" else ()
    q = model.layers.attn.query.kernel if lead else model.layers[0].attn.query.kernel
    assert q.get_value().sharding.spec == jax.sharding.PartitionSpec(*lead, "fsdp", "tensor", None)
    with jax.set_mesh(mesh):
        logits, _ = forward(model, *(jnp.asarray(x) for x in batch))
    ref = _torch_out(cls_ckpt[0], batch).logits.numpy()
    assert np.abs(np.asarray(logits) - ref).max() <= TOL


def test_input_checks():
    cfg = bert.BertConfig.from_hf_config(ARABERT_TINY)
    model = build(cfg, seed=0)
    assert (
        model.embeddings.word.embedding[0].sum() == 0
    )  # padding row, as nn.Embedding(padding_idx)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.ones((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.ones((2, 8), jnp.int32), jnp.ones((2, 7), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(jnp.ones((8,), jnp.int32))
