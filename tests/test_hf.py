"""HF import/export: round trips through transformers (unrolled and scanned), sharded/bf16/.bin
files, per-device loading of stacked layers, per-tensor export from a mesh, key/shape errors."""

import json

import _hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _decoder_checks import params, reload_in_transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from sevjax import hf, models
from sevjax.models import ModelOptions
from sevjax.sharding import make_mesh, state_shardings

KINDS = ("gpt2", "llama", "qwen2")
SCANNED = ModelOptions(scan_layers=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    made = {"gpt2": fx.gpt2(), "llama": fx.llama("llama"), "qwen2": fx.llama("qwen2")}
    return {k: fx.save(m, tmp_path_factory.mktemp(k)) for k, m in made.items()}


@pytest.fixture(scope="module")
def loaded(ckpts):
    return {k: hf.load_pretrained(p) for k, p in ckpts.items()}


@pytest.fixture(scope="module")
def scanned(ckpts):
    return {k: hf.load_pretrained(p, options=SCANNED) for k, p in ckpts.items()}


@pytest.fixture(scope="module")
def batch():
    return fx.left_padded_batch()


def logits(m, batch):
    ids, mask, _ = batch
    return np.asarray(fx.forward(m, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_transformers(kind, layout, loaded, scanned, batch, tmp_path, caplog):
    m, config = (loaded if layout == "unrolled" else scanned)[kind]
    out = hf.save_pretrained(m, config, tmp_path / "export")
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["torch_dtype"] == hf_config["dtype"] == "float32"
    assert hf_config["architectures"] == [hf._architecture(models.family(kind), config)]
    tm = reload_in_transformers(out, caplog)
    assert tm.config.tie_word_embeddings == config.tie_word_embeddings
    ids, mask, _ = batch
    ref = fx.torch_logits(tm, ids, mask)
    assert np.abs(logits(m, batch) - ref)[mask.astype(bool)].max() <= 1e-5
    if config.tie_word_embeddings:  # written once, so no lm_head key in the file
        assert not any(k.startswith("lm_head") for k in load_file(out / "model.safetensors"))
    m2, config2 = hf.load_pretrained(out, options=m.options)
    assert config2 == config
    a, b = params(m), params(m2)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_sharded_export_writes_index_and_reloads(layout, loaded, scanned, batch, tmp_path, caplog):
    m, config = (loaded if layout == "unrolled" else scanned)["llama"]
    out = hf.save_pretrained(m, config, tmp_path, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert all((out / s).exists() for s in shards)
    n_params = sum(v.size for v in params(m).values())
    assert index["metadata"]["total_size"] == 4 * n_params
    ids, mask, _ = batch
    ref = fx.torch_logits(reload_in_transformers(out, caplog), ids, mask)
    assert np.abs(logits(m, batch) - ref)[mask.astype(bool)].max() <= 1e-5
    m2, _ = hf.load_pretrained(out, options=m.options)
    np.testing.assert_array_equal(logits(m2, batch), logits(m, batch))


def test_bf16_export_and_import(loaded, tmp_path):
    m, config = loaded["qwen2"]
    out = hf.save_pretrained(m, config, tmp_path, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with open(out / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    m2, _ = hf.load_pretrained(out)
    for k, v in params(m).items():
        np.testing.assert_array_equal(params(m2)[k], v.astype(jnp.bfloat16).astype(np.float32))


def test_pytorch_bin_and_base_model_checkpoints(ckpts, loaded, batch, tmp_path):
    tm = transformers.AutoModelForCausalLM.from_pretrained(ckpts["gpt2"])
    state = {k: v.contiguous() for k, v in tm.state_dict().items()}  # lm_head: tied, ignored
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # old checkpoints hold buffers
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((ckpts["gpt2"] / "config.json").read_text())
    expected = logits(loaded["gpt2"][0], batch)
    np.testing.assert_array_equal(logits(hf.load_pretrained(tmp_path / "bin")[0], batch), expected)
    tm.transformer.save_pretrained(tmp_path / "base")  # GPT2Model: keys without "transformer."
    base, _ = hf.load_pretrained(tmp_path / "base")
    np.testing.assert_array_equal(logits(base, batch), expected)


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_load_with_mesh_puts_each_tensor_on_its_sharding(layout, ckpts, loaded, batch, tmp_path):
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    options = SCANNED if layout == "scanned" else None
    m, config = hf.load_pretrained(ckpts["llama"], mesh=mesh, options=options)
    state = nnx.state(m, nnx.Param)
    expected = dict(nnx.to_flat_state(state_shardings(state, mesh)))
    for path, var in nnx.to_flat_state(state):
        assert var.get_value().sharding == expected[path].get_value(), path
    if layout == "scanned":  # [L, D, N, H]: every device holds its slice of both layers
        q = m.layers.self_attn.q_proj.kernel.get_value()
        assert q.addressable_shards[0].data.shape == (2, 16, 1, 8)
    else:
        q = m.layers[0].self_attn.q_proj.kernel.get_value()
        assert q.addressable_shards[0].data.shape == (16, 1, 8)
    assert len(q.sharding.device_set) == 8
    ids, mask, _ = batch
    diff = np.abs(logits(m, batch) - logits(loaded["llama"][0], batch))
    assert diff[mask.astype(bool)].max() <= 1e-5
    # Export from the mesh, tensor by tensor: the same bytes as the unsharded unrolled model.
    sharded_out = hf.save_pretrained(m, config, tmp_path / "from_mesh")
    plain_out = hf.save_pretrained(*loaded["llama"], tmp_path / "plain")
    for name in ("model.safetensors", "config.json"):
        assert (sharded_out / name).read_bytes() == (plain_out / name).read_bytes()


def test_generation_config_and_tokenizer_files(loaded, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "ألم": 2, "صدر": 3}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    m, config = loaded["gpt2"]
    out = hf.save_pretrained(m, config, tmp_path, tokenizer=tok)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == 0 and "pad_token_id" not in gen
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded("ألم صدر")["input_ids"] == [2, 3]


def rewrite(src, dst, edit):
    """Copies a checkpoint dir, editing its tensors dict with ``edit``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_errors_name_the_key_and_shapes(ckpts, tmp_path):
    src = ckpts["llama"]
    key = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"missing keys: {key}"):
        hf.load_pretrained(rewrite(src, tmp_path / "missing", lambda t: t.pop(key)))

    def reshape(t):
        t[key] = np.zeros((64, 31), np.float32)

    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(64, 31\).*needs \(64, 32\)"):
        hf.load_pretrained(rewrite(src, tmp_path / "shape", reshape))

    def extra(t):
        t["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)

    with pytest.raises(ValueError, match="unexpected keys: model.layers.0.mystery.weight"):
        hf.load_pretrained(rewrite(src, tmp_path / "extra", extra))


def test_unsupported_model_type_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 't5'.*gpt2.*llama.*qwen2"):
        models.config_from_hf({"model_type": "t5"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="supported: bert, gpt2, llama, mistral, qwen2"):
        hf.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_embd": 32, "n_head": 4})
    )
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        hf.load_pretrained(str(tmp_path / "nope"))


def test_new_if_missing_params_are_initialised_on_their_sharding(
    ckpts, tmp_path, monkeypatch, capsys
):
    # The BERT path (fresh classifier head) exercised on GPT-2 by declaring ln_f optional.
    from sevjax.models import gpt2

    monkeypatch.setattr(gpt2, "HF_NEW_IF_MISSING", ("ln_f.",))
    src = rewrite(
        ckpts["gpt2"],
        tmp_path / "no_ln_f",
        lambda t: [t.pop(k) for k in ("transformer.ln_f.weight", "transformer.ln_f.bias")],
    )
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    m, _ = hf.load_pretrained(src, mesh=mesh)
    assert "ln_f.scale is not in" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(m.ln_f.scale.get_value()), np.ones(32, np.float32))
    assert m.ln_f.scale.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert m.wte.embedding.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_read_config_needs_only_config_json_and_abstract_model(ckpts, tmp_path):
    (tmp_path / "config.json").write_text((ckpts["llama"] / "config.json").read_text())
    config = hf.read_config(tmp_path)  # no weights in this directory
    assert config == hf.load_pretrained(ckpts["llama"])[1]
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        hf.read_config(tmp_path / "nope")
    for options in (None, SCANNED):
        abstract = nnx.eval_shape(
            lambda o=options: models.model_class(config)(
                config,
                dtype=jnp.bfloat16,
                param_dtype=jnp.float32,
                options=o,
                rngs=nnx.Rngs(0),
            )
        )
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_legacy_layernorm_gamma_beta_names_load_like_transformers(tmp_path):
    """Old BERT checkpoints (bert-base-multilingual-cased) name LayerNorm weights ``gamma`` /
    ``beta``; transformers renames them on load, and so does our importer (safetensors and .bin)."""
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    tm = fx.randomize(transformers.BertForSequenceClassification(config))
    tm.save_pretrained(tmp_path / "new")
    expected = params(hf.load_pretrained(tmp_path / "new")[0])
    tensors = load_file(tmp_path / "new" / "model.safetensors")
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in tensors.items()
    }
    assert sum(k.endswith(("LayerNorm.gamma", "LayerNorm.beta")) for k in legacy) == 6
    for name in ("safetensors", "bin"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
        if name == "safetensors":
            save_file(legacy, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        else:
            state = {k: torch.from_numpy(v) for k, v in legacy.items()}
            torch.save(state, tmp_path / name / "pytorch_model.bin")
        got = params(hf.load_pretrained(tmp_path / name)[0])
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k], expected[k]) for k in expected), name
