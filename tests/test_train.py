"""train.run end to end on tiny configs: pulse, exact resume after SIGKILL, 8-device equality,
compile-once, gradient accumulation, validation loss going down, non-finite loss handling."""

import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sevjax import data as data_lib
from sevjax import lm_data, optim, tokenizer, train
from sevjax.checkpoint import Checkpointer
from sevjax.config import TrainConfig, load

REPO = Path(__file__).parents[1]


def _short(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """A small annotated JSONL (random severity probabilities) and a 300-token BPE for it."""
    root = tmp_path_factory.mktemp("data")
    splits = data_lib.split_examples(data_lib.load_examples())
    rng = np.random.default_rng(0)
    rows = []
    for ex in splits["train"][:48] + splits["validation"][:16]:
        p = rng.dirichlet([1.0, 1.0, 1.0])
        rows.append(
            {
                "id": ex["id"],
                "complaint": _short(ex["complaint"], 4),
                "response": _short(ex["response"], 8),
                "split": ex["split"],
                "severity": ex["severity"],
                **dict(zip(("p_mild", "p_moderate", "p_critical"), map(float, p / p.sum()))),
            }
        )
    path = root / "annotated.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    texts = [r["complaint"] for r in rows] + [r["response"] for r in rows]
    tokenizer.train_bpe_tokenizer(texts, 300, root / "tokenizer")
    return path, root / "tokenizer"


def _overrides(fixture_data, run_dir, *extra):
    path, tok = fixture_data
    return [
        f"run_dir={run_dir}",
        f"data.path={path}",
        f"model.tokenizer={tok}",
        "model.layers=2",
        "model.width=32",
        "model.heads=2",
        "model.vocab_size=300",
        "model.max_positions=64",
        "data.buckets=[64]",
        "data.batch_size=8",
        "eval.batch_size=8",
        "eval.every=100",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "log.every=1",
        "log.tensorboard=false",
        "log.plot=false",
        "log.progress=false",
        "export_hf=false",
        "checkpoint.every=2",
        "mesh.data=1",
        "steps=6",
        *extra,
    ]


def _cfg(fixture_data, run_dir, *extra) -> TrainConfig:
    return load(TrainConfig, overrides=_overrides(fixture_data, run_dir, *extra))


def _losses(run_dir, split="train"):
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


@pytest.fixture(scope="module")
def reference(fixture_data, tmp_path_factory):
    """An uninterrupted 6-step single-device run."""
    run_dir = tmp_path_factory.mktemp("ref")
    before = train.TRACES["train_step"]
    summary = train.run(_cfg(fixture_data, run_dir))
    return run_dir, summary, train.TRACES["train_step"] - before


def test_reference_compiles_once_and_validation_improves(reference):
    run_dir, summary, traces = reference
    assert traces == 1
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert summary["val_loss_end"] < summary["val_loss_start"]


@pytest.mark.parametrize("mode", ["ce", "severity"])
def test_two_step_pulse(fixture_data, tmp_path, mode):
    extra = ["steps=2", f"loss.mode={mode}"]
    if mode == "ce":  # bf16 compute, float32 parameters and optimizer state
        extra += ["model.dtype=bfloat16"]
    if mode == "severity":  # exercise every output once
        extra += ["export_hf=true", "log.plot=true", "log.tensorboard=true", "data.pack=true"]
    summary = train.run(_cfg(fixture_data, tmp_path, *extra))
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] > 0
        assert {"loss/mild", "loss/moderate", "loss/critical"} <= set(r)
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in val] == [0, 2] and all(np.isfinite(r["perplexity"]) for r in val)
    if mode == "ce":  # unit weights: the loss is the plain token mean
        assert all(abs(r["loss"] - r["nll"]) < 1e-5 for r in steps)
        ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=2)
        meta = ckpt.state_metadata(2)
        ckpt.close()
        dtypes = {str(x.dtype) for x in jax.tree.leaves(meta["params"])}
        assert dtypes == {"float32"}  # master weights stay float32
    else:  # linear weights (1, 1.5, 2) scale the loss up
        assert all(r["loss"] > r["nll"] for r in steps)
        for name in ("hf/config.json", "hf/tokenizer.json", "loss_curve.png", "config.json"):
            assert (tmp_path / name).is_file(), name
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
        assert summary["hf"] == str(tmp_path / "hf")
    assert (tmp_path / "checkpoints" / "2").is_dir()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from sevjax import checkpoint, train
    from sevjax.config import TrainConfig, load

    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == 4:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    checkpoint.Checkpointer.save = save_then_die
    train.run(load(TrainConfig, overrides=sys.argv[1:]))
    """
)


def test_resume_after_sigkill_matches_uninterrupted(fixture_data, reference, tmp_path):
    args = _overrides(fixture_data, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *args], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(_losses(tmp_path)) == 4
    summary = train.run(load(TrainConfig, overrides=args))  # the same command again
    assert summary["val_loss_start"] is None  # resumed, not restarted
    ref, got = _losses(reference[0]), _losses(tmp_path)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
    assert abs(summary["val_loss_end"] - reference[1]["val_loss_end"]) <= 1e-6


def test_eight_devices_match_one_compile_once_and_restore_on_one(fixture_data, reference, tmp_path):
    assert len(jax.devices()) == 8
    before = train.TRACES["train_step"]
    summary = train.run(_cfg(fixture_data, tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    assert train.TRACES["train_step"] - before == 1
    ref, got = _losses(reference[0]), _losses(tmp_path)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    assert abs(summary["val_loss_end"] - reference[1]["val_loss_end"]) <= 1e-5
    # the same command on one device restores the 8-device checkpoint (finished: eval + export)
    again = train.run(_cfg(fixture_data, tmp_path, "mesh.data=1"))
    assert abs(again["val_loss_end"] - summary["val_loss_end"]) <= 1e-5


@pytest.fixture(scope="module")
def small_model(fixture_data, tmp_path_factory):
    """(graphdef, treedef, rest, params, one [1, 8, T] batch) of the tiny test model."""
    run_dir = tmp_path_factory.mktemp("accum")
    cfg = _cfg(fixture_data, run_dir)
    tokenizer, data = lm_data.prepare(cfg, run_dir)
    model, _ = train.build_model(cfg, tokenizer, None)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    batcher = lm_data.Batcher(
        data["train"], batch_size=8, accum=1, buckets=(64,), pack=False, seed=0
    )
    batch, _ = batcher.batch_at(0, 0)
    return graphdef, jax.tree.structure(state), rest, nnx.to_pure_dict(state), batch


@pytest.mark.parametrize("normalize", ["tokens", "weighted", "sequence"])
def test_gradient_accumulation_equals_big_batch(small_model, normalize):
    graphdef, treedef, rest, params, batch = small_model
    aux_fn, _ = train.make_forward(
        graphdef, treedef, rest, chunked=False, chunk_size=64, normalize=normalize, z_loss=1e-3
    )
    results = []
    for accum in (1, 4):  # one batch of 8 rows vs 4 micro-batches of 2
        split = {k: jnp.asarray(v.reshape(accum, 8 // accum, -1)) for k, v in batch.items()}
        fn = jax.jit(lambda p, b: optim.accumulate_gradients(aux_fn, p, b, normalize=normalize))
        results.append(fn(params, split))
    (loss, _, grads), (acc_loss, _, acc_grads) = results
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_path_matches_full_logits(small_model):
    graphdef, treedef, rest, params, batch = small_model
    mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    out = []
    for chunked in (False, True):
        aux_fn, eval_fn = train.make_forward(
            graphdef, treedef, rest, chunked=chunked, chunk_size=48, normalize="tokens", z_loss=0.0
        )
        loss_fn = jax.jit(functools.partial(optim.accumulate_gradients, aux_fn, normalize="tokens"))
        batched = jax.tree.map(lambda x: x[None], mb)  # one micro-batch
        out.append((loss_fn(params, batched), jax.jit(eval_fn)(params, mb)))
    (full, full_eval), (chunk, chunk_eval) = out
    np.testing.assert_allclose(chunk[0], full[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(chunk[2]), jax.tree.leaves(full[2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for k in full_eval:
        np.testing.assert_allclose(chunk_eval[k], full_eval[k], rtol=1e-5, err_msg=k)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(fixture_data, tmp_path):
    cfg = _cfg(
        fixture_data,
        tmp_path,
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.grad_clip=0",
        "checkpoint.every=1",
        "steps=4",
    )
    with pytest.raises(
        train.NonFiniteLoss, match=r"at step (\d).*last good checkpoint is step"
    ) as e:
        train.run(cfg)
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == bad_step - 1


def test_missing_probabilities_say_to_annotate(fixture_data, tmp_path):
    path = tmp_path / "plain.jsonl"
    rows = [json.loads(r) for r in fixture_data[0].read_text().splitlines()]
    keep = ("id", "complaint", "response", "split")
    path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    cfg = _cfg(fixture_data, tmp_path, f"data.path={path}")
    with pytest.raises(ValueError, match="classify.py annotate"):
        train.run(cfg)


def test_tiny_default_validation_loss_goes_down(fixture_data, tmp_path):
    """The default model/tokenizer/optimizer settings on the small fixture, a few steps."""
    path, _ = fixture_data
    cfg = load(
        TrainConfig,
        overrides=[
            f"run_dir={tmp_path}",
            f"data.path={path}",
            "steps=10",
            "optim.warmup_steps=3",
            "log.progress=false",
            "log.tensorboard=false",
            "log.plot=false",
            "export_hf=false",
            "mesh.data=1",
            "data.batch_size=8",
        ],
    )
    summary = train.run(cfg)
    assert summary["val_loss_end"] < 0.97 * summary["val_loss_start"]


def test_weight_decay_mask_and_schedule(small_model):
    _, _, _, params, _ = small_model
    mask = jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))
    decayed = {jax.tree_util.keystr(p) for p, m in mask if m}
    assert decayed and all(p.endswith("['kernel']") for p in decayed)
    skipped = {jax.tree_util.keystr(p) for p, m in mask if not m}
    assert any("wte" in p for p in skipped) and any("ln_f" in p for p in skipped)
    assert any(p.endswith("['bias']") for p in skipped)
    cfg = load(TrainConfig, overrides=["optim.lr=1.0", "optim.warmup_steps=4"]).optim
    lrs = np.array([optim.make_schedule(cfg, 20)(s) for s in range(20)])
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert np.all(np.diff(lrs[4:]) <= 0) and abs(lrs[-1] - cfg.min_lr_ratio) < 1e-6
