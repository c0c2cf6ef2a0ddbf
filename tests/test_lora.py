"""LoRA: adapters trained alone on a frozen base, PEFT adapter export/import, merged export,
checkpoints and resume, sharded scanned adapters, planning; against ``peft`` + ``transformers``."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import _hf_fixtures as hff
import _lm_fixtures as lm_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sevjax import hf, lora, peft, plan, prepare, train, trainer
from sevjax.checkpoint import Checkpointer
from sevjax.config import load
from sevjax.data import load_examples
from sevjax.schema import TrainConfig

REPO = Path(__file__).parents[1]
VOCAB = 320  # >= the fixture tokenizer's 300 tokens
RANK, ALPHA = 4, 8.0
LLAMA_TARGETS = ("q", "v", "o", "down")
GPT2_TARGETS = ("c_attn", "mlp.c_proj")  # the MLP's c_proj only, not the attention's


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    return lm_fixtures.make_annotated(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random HF Llama (untied, llama3 RoPE) and GPT-2 checkpoints on disk."""
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    return {
        "llama": hff.save(hff.llama(vocab_size=VOCAB), root / "llama"),
        "gpt2": hff.save(hff.gpt2(vocab_size=VOCAB), root / "gpt2"),
    }


def _cfg(fixture_data, run_dir, base, targets, *extra) -> TrainConfig:
    lora_keys = [
        f"model.name_or_path={base}", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
        f"model.lora.targets=[{', '.join(targets)}]", "model.lora.base_dtype=float32",
        "optim.lr=2e-2", "optim.warmup_steps=1", "steps=4", "checkpoint.every=2",
    ]  # fmt: skip
    return load(
        TrainConfig, overrides=lm_fixtures.overrides(fixture_data, run_dir, *lora_keys, *extra)
    )


def _finetune(cfg: TrainConfig):
    """tokenize -> fine-tune -> export, as sevjax.pipeline.train does; returns the fit result."""
    run_dir = Path(cfg.run_dir)
    config = train.model_config(cfg)
    mesh = trainer.make_mesh(cfg.mesh)
    tokenizer, data = prepare.prepare(cfg, run_dir, load_examples(cfg.data.path))
    result = train.finetune(cfg, config, data, mesh)
    train.export(result, config, tokenizer, run_dir)
    return result, config


@pytest.fixture(scope="module")
def runs(fixture_data, bases, tmp_path_factory):
    """A LoRA run on the unrolled Llama (one device) and on the scanned GPT-2 (2x2x2 mesh)."""
    out = {}
    for name, targets, extra in (
        ("llama", LLAMA_TARGETS, ["model.scan_layers=false"]),
        ("gpt2", GPT2_TARGETS, ["model.scan_layers=true", "mesh.data=2", "mesh.fsdp=2",
                                "mesh.tensor=2"]),
    ):  # fmt: skip
        run_dir = tmp_path_factory.mktemp(f"lora-{name}")
        cfg = _cfg(fixture_data, run_dir, bases[name], targets, *extra)
        result, config = _finetune(cfg)
        out[name] = dict(cfg=cfg, result=result, config=config, run_dir=run_dir)
    return out


def _peft_model(base_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def _batch():
    ids, mask, _ = hff.left_padded_batch()
    return ids, mask


def _ours(model, ids, mask) -> np.ndarray:
    return np.asarray(hff.forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def _close(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lora_logits_match_peft_on_base_and_the_merged_export(runs, bases, name):
    from transformers import AutoModelForCausalLM

    r = runs[name]
    ids, mask = _batch()
    ours = _ours(r["result"].model, ids, mask)
    with_peft = hff.torch_logits(_peft_model(bases[name], r["run_dir"] / "adapter"), ids, mask)
    merged = AutoModelForCausalLM.from_pretrained(r["run_dir"] / "hf", attn_implementation="eager")
    base = AutoModelForCausalLM.from_pretrained(bases[name], attn_implementation="eager")
    assert _close(ours, with_peft, mask) <= 1e-4
    assert _close(ours, hff.torch_logits(merged, ids, mask), mask) <= 1e-4
    # not vacuous: the trained adapters moved the logits away from the base's
    assert _close(ours, hff.torch_logits(base, ids, mask), mask) > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_only_adapters_train_and_are_checkpointed(runs, bases, name):
    r = runs[name]
    model = r["result"].model
    adapters = list(lora.lora_denses(model))
    targets = LLAMA_TARGETS if name == "llama" else GPT2_TARGETS
    assert {rel.rsplit(".", 1)[-1] for _, rel, _ in adapters} == (
        {"q_proj", "v_proj", "o_proj", "down_proj"} if name == "llama" else {"c_attn", "c_proj"}
    )
    assert all(any(lora.matches(rel, t) for t in targets) for _, rel, _ in adapters)
    for _, rel, dense in adapters:  # B starts at zero: training moved every adapter
        assert np.abs(np.asarray(dense.lora.lora_b.get_value())).min(axis=-2).max() > 0, rel
    # the frozen base is the checkpoint's, bit for bit
    base, _ = hf.load_pretrained(bases[name], options=model.options)
    ours = hff.flat_params(nnx.state(model, nnx.Param))
    theirs = hff.flat_params(base)
    frozen = {k: v for k, v in ours.items() if ".lora." not in k}
    assert frozen.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(frozen[k], theirs[k], err_msg=k)
    # the checkpoints hold the adapters (and their Adam moments) alone
    ckpt = Checkpointer(r["run_dir"] / "checkpoints", every=1, keep=2)
    meta = ckpt.state_metadata(4)
    ckpt.close()
    saved = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(meta)[0]}
    param_keys = {k for k in saved if k.startswith("['params']")}
    assert param_keys and all(k.endswith(("['lora_a']", "['lora_b']")) for k in param_keys)
    assert len(param_keys) == 2 * len(adapters)
    n_adapter = sum(int(np.prod(v.shape)) for k, v in ours.items() if ".lora." in k)
    n_saved = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(meta["params"], is_leaf=_is_array_meta)
    )
    assert n_saved == n_adapter
    moments = [x for x in jax.tree.leaves(meta["opt_state"], is_leaf=_is_array_meta) if x.shape]
    assert sum(int(np.prod(x.shape)) for x in moments) == 2 * n_adapter  # Adam's mu and nu


def _is_array_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def test_scanned_adapters_are_stacked_and_sharded(runs):
    model = runs["gpt2"]["result"].model
    c_attn = model.layers.attn.c_attn.lora  # scanned: [L, ...]
    a, b = c_attn.lora_a.get_value(), c_attn.lora_b.get_value()
    assert a.shape == (2, 32, RANK) and b.shape == (2, RANK, 96)
    assert c_attn.lora_a.get_metadata()["axes"] == ("layers", "embed", None)
    mlp = model.layers.mlp.c_proj.lora  # B [L, r, D] (None, embed): D over fsdp
    assert _spec(mlp.lora_a) == (None, "tensor", None)  # A [L, F, r]: F over tensor
    assert _spec(mlp.lora_b) == (None, None, "fsdp")  # B [L, r, D]: D over fsdp
    assert model.layers.attn.c_proj.lora is None  # "mlp.c_proj" only


def _spec(var) -> tuple:
    x = var.get_value()
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def test_adapter_files_match_peft_own_save(runs, bases, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    for name, modules in (("llama", ["q_proj", "v_proj", "o_proj", "down_proj"]),
                          ("gpt2", ["c_attn", "mlp.c_proj"])):  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(bases[name])
        settings = LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=modules, task_type="CAUSAL_LM",
            fan_in_fan_out=name == "gpt2",
        )  # fmt: skip
        get_peft_model(base, settings).save_pretrained(tmp_path / name)
        theirs = load_file(tmp_path / name / peft.WEIGHTS_FILE)
        ours = load_file(runs[name]["run_dir"] / "adapter" / peft.WEIGHTS_FILE)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        assert {v.dtype for v in ours.values()} == {np.dtype(np.float32)}
        want = json.loads((tmp_path / name / peft.CONFIG_FILE).read_text())
        got = json.loads((runs[name]["run_dir"] / "adapter" / peft.CONFIG_FILE).read_text())
        assert sorted(got["target_modules"]) == sorted(want["target_modules"])
        for k in ("peft_type", "task_type", "r", "lora_alpha", "fan_in_fan_out", "bias"):
            assert got[k] == want[k], (name, k)
        assert got["base_model_name_or_path"] == str(bases[name])


def test_resume_matches_uninterrupted(runs, tmp_path):
    """Step 4's checkpoint lost: the rerun resumes at step 2 and ends where the run did."""
    ref = runs["llama"]
    run_dir = tmp_path / "run"
    shutil.copytree(ref["run_dir"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "4")
    shutil.rmtree(run_dir / "adapter")
    shutil.rmtree(run_dir / "hf")
    cfg = dataclasses.replace(ref["cfg"], run_dir=str(run_dir))
    result, _ = _finetune(cfg)
    assert result.start == 2 and result.steps == 4
    assert abs(result.last_train["loss"] - ref["result"].last_train["loss"]) <= 1e-6
    got = hff.flat_params(nnx.state(result.model, nnx.LoRAParam))
    want = hff.flat_params(nnx.state(ref["result"].model, nnx.LoRAParam))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


def test_import_of_a_peft_adapter_matches_peft(bases, fixture_data, tmp_path):
    """An adapter PEFT saved (random A and B) loaded through model.lora.adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bases["llama"], attn_implementation="eager")
    settings = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        task_type="CAUSAL_LM", init_lora_weights=False,  # B random too
    )  # fmt: skip
    pm = get_peft_model(base, settings).eval()
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask = _batch()
    want = hff.torch_logits(pm, ids, mask)
    for scan in ("false", "true"):
        cfg = _cfg(
            fixture_data, tmp_path / "run", bases["llama"], LLAMA_TARGETS,
            f"model.lora.adapter={tmp_path / 'adapter'}", f"model.scan_layers={scan}",
        )  # fmt: skip
        model = train.model_source(cfg, train.model_config(cfg), None).load()
        assert _close(_ours(model, ids, mask), want, mask) <= 1e-4
    bad = _cfg(fixture_data, tmp_path / "run", bases["llama"], LLAMA_TARGETS,
               f"model.lora.adapter={tmp_path / 'adapter'}", "model.lora.rank=8")  # fmt: skip
    with pytest.raises(ValueError, match="r=4 but model.lora.rank=8"):
        train.model_source(bad, train.model_config(bad), None).load()
    fewer = _cfg(fixture_data, tmp_path / "run", bases["llama"], ("q", "v"),
                 f"model.lora.adapter={tmp_path / 'adapter'}")  # fmt: skip
    with pytest.raises(ValueError, match="does not match model.lora.targets"):
        train.model_source(fewer, train.model_config(fewer), None).load()


def test_targets_that_match_nothing_are_an_error(bases, fixture_data, tmp_path):
    cfg = _cfg(fixture_data, tmp_path, bases["llama"], ("c_attn", "c_fc"))
    with pytest.raises(ValueError, match="match none of this model's projections"):
        train.model_source(cfg, train.model_config(cfg), None).load()


def test_plan_counts_adapters_as_the_trainable_params(bases, fixture_data, tmp_path):
    cfg = _cfg(fixture_data, tmp_path, bases["llama"], LLAMA_TARGETS, "model.scan_layers=true",
               "mesh.data=1", "mesh.fsdp=8", "model.lora.base_dtype=bfloat16")  # fmt: skip
    report = plan.plan(cfg)
    d, f, n, k, h = 32, 64, 4, 2, 8  # the tiny Llama: q, v, o, down adapters on 2 layers
    per_layer = RANK * ((d + n * h) + (d + k * h) + (n * h + d) + (f + d))
    assert report["trainable_params"] == 2 * per_layer
    assert (
        report["params"]
        == report["trainable_params"] + hff.llama(vocab_size=VOCAB).num_parameters()
    )
    assert report["lora"]["rank"] == RANK and report["fits"] is True


@pytest.mark.parametrize("name", ["llama-3.1-8b-lora.yaml", "gemma-2-9b-lora.yaml"])
def test_shipped_lora_configs_load(name):
    cfg = load(TrainConfig, REPO / "configs" / name)
    assert cfg.model.lora.rank == 16 and cfg.model.lora.base_dtype == "bfloat16"
    assert cfg.model.remat == "full" and cfg.model.scan_layers is True


def test_dropout_only_while_training_and_reseeded():
    from sevjax import models
    from sevjax.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = models.build(config, options=models.ModelOptions(scan_layers=True))  # stacked keys
    lora.apply(model, lora.LoRASpec(RANK, ALPHA, dropout=0.5, targets=("q", "down")), seed=0)
    a = np.asarray(model.layers.self_attn.q_proj.lora.lora_a.get_value())  # [L, D, r]
    bound = 1 / np.sqrt(32)  # PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A [r, D]
    assert 0.9 * bound < np.abs(a).max() <= bound and not np.array_equal(a[0], a[1])
    for i, (_, _, dense) in enumerate(lora.lora_denses(model)):  # B = 0 would hide dropout
        b = dense.lora.lora_b
        b.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(i), b.get_value().shape))
    ids = jnp.arange(24).reshape(2, 12) % 64
    merged = np.asarray(hff.forward(lora.merged(model), ids))
    assert np.abs(np.asarray(hff.forward(model, ids)) - merged).max() <= 1e-5  # eval: no dropout

    @nnx.jit
    def train_forward(m, key):
        nnx.reseed(m, dropout=key, policy="match_shape")
        return m(ids)

    model.train()
    a, b, again = (np.asarray(train_forward(model, jax.random.PRNGKey(k))) for k in (1, 2, 1))
    np.testing.assert_array_equal(a, again)  # the mask follows the key
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - merged).max() > 1e-3


def test_lora_bench_runs(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import lora_bench

    tiny = ["--set", "model.layers=1", "--set", "model.width=32", "--set", "model.vocab_size=128", "--set",
            "data.batch_size=2", "--set", "data.buckets=[32]"]  # fmt: skip
    out = lora_bench.main(["--rank", "2", "--steps", "2", "--warmup", "1", *tiny])
    assert out["full_step_s"] > 0 and out["lora_step_s"] > 0
    assert out["trainable"]["lora"] < out["trainable"]["full"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"lora/full step-time ratio: {out['ratio']:.2f}"


FAMILIES = {  # the families added beside Llama and GPT-2, tiny; (HF overrides, scanned)
    "qwen3": (dict(head_dim=16), True),
    "gemma2": (dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0), False),
    "gemma3_text": (dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5), True),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_get_peft_adapters_for_free(family, tmp_path):
    """No training: random A and B on every projection, written, loaded by PEFT, read back."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from sevjax import models

    overrides, scan = FAMILIES[family]
    hf_config = AutoConfig.for_model(
        family, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    base = hff.randomize(AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager"))
    base.save_pretrained(tmp_path / "base")
    options = models.ModelOptions(scan_layers=scan)
    model, config = hf.load_pretrained(tmp_path / "base", options=options)
    lora.apply(model, lora.LoRASpec(RANK, ALPHA, targets=LLAMA_TARGETS + ("k", "gate", "up")))
    for i, (_, _, dense) in enumerate(lora.lora_denses(model)):
        b = dense.lora.lora_b
        b.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(i), b.get_value().shape))
    peft.save_adapter(model, config, tmp_path / "adapter")
    ids, mask = _batch()
    want = hff.torch_logits(PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), ids, mask)
    assert _close(_ours(model, ids, mask), want, mask) <= 1e-4
    assert _close(_ours(lora.merged(model), ids, mask), want, mask) <= 1e-4
    again, _ = hf.load_pretrained(tmp_path / "base", options=options)
    lora.apply(again, model.lora_spec, seed=1)  # other A; B zeros
    peft.load_adapter(again, config, tmp_path / "adapter")
    got, ref = (hff.flat_params(nnx.state(m, nnx.LoRAParam)) for m in (again, model))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
