"""The LM pipeline end to end on tiny configs: pulse, exact resume after SIGKILL, 8-device
equality, compile-once, gradient accumulation, validation loss going down, non-finite steps."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import _lm_fixtures as lm_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sevjax import data as data_lib
from sevjax import lm_data, loop, optim, pipeline, prepare, train, trainer
from sevjax.checkpoint import Checkpointer
from sevjax.config import load
from sevjax.schema import TrainConfig

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """A small annotated JSONL (random severity probabilities) and a 300-token BPE for it."""
    return lm_fixtures.make_annotated(tmp_path_factory.mktemp("data"))


_overrides = lm_fixtures.overrides


def _cfg(fixture_data, run_dir, *extra) -> TrainConfig:
    return load(TrainConfig, overrides=_overrides(fixture_data, run_dir, *extra))


def _losses(run_dir, split="train"):
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


@pytest.fixture(scope="module")
def reference(fixture_data, tmp_path_factory):
    """An uninterrupted 6-step single-device run."""
    run_dir = tmp_path_factory.mktemp("ref")
    before = trainer.TRACES["train_step"]
    summary = pipeline.train(_cfg(fixture_data, run_dir))
    return run_dir, summary, trainer.TRACES["train_step"] - before


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
    summary = pipeline.train(_cfg(fixture_data, tmp_path, *extra))
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
    from sevjax import checkpoint, pipeline
    from sevjax.config import load
    from sevjax.schema import TrainConfig

    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == 4:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    checkpoint.Checkpointer.save = save_then_die
    pipeline.train(load(TrainConfig, overrides=sys.argv[1:]))
    """
)


def test_resume_after_sigkill_matches_uninterrupted(fixture_data, reference, tmp_path):
    args = _overrides(fixture_data, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *args], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(_losses(tmp_path)) == 4
    summary = pipeline.train(load(TrainConfig, overrides=args))  # the same command again
    assert summary["val_loss_start"] is None  # resumed, not restarted
    ref, got = _losses(reference[0]), _losses(tmp_path)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
    assert abs(summary["val_loss_end"] - reference[1]["val_loss_end"]) <= 1e-6


def test_eight_devices_match_one_compile_once_and_restore_on_one(fixture_data, reference, tmp_path):
    assert len(jax.devices()) == 8
    before = trainer.TRACES["train_step"]
    summary = pipeline.train(
        _cfg(fixture_data, tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    )
    assert trainer.TRACES["train_step"] - before == 1
    ref, got = _losses(reference[0]), _losses(tmp_path)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    assert abs(summary["val_loss_end"] - reference[1]["val_loss_end"]) <= 1e-5
    # the same command on one device restores the 8-device checkpoint (finished: eval + export)
    again = pipeline.train(_cfg(fixture_data, tmp_path, "mesh.data=1"))
    assert abs(again["val_loss_end"] - summary["val_loss_end"]) <= 1e-5


@pytest.fixture(scope="module")
def small_model(fixture_data, tmp_path_factory):
    """(cfg, data, graph, params, fixed, one [1, 8, T] batch) of the tiny test model."""
    run_dir = tmp_path_factory.mktemp("accum")
    cfg = _cfg(fixture_data, run_dir)
    tok, data = prepare.prepare(cfg, run_dir, data_lib.load_examples(cfg.data.path))
    source = train.model_source(cfg, train.model_config(cfg, tok), None)
    graph, params, fixed = trainer.split(source.factory(), nnx.Param)
    batcher = lm_data.Batcher(
        data["train"], batch_size=8, accum=1, buckets=(64,), pack=False, seed=0
    )
    batch, _ = batcher.batch_at(0, 0)
    return cfg, data, graph, params, fixed, batch


def _loss_and_grads(small_model, accum, *overrides, chunked=False):
    cfg, data, graph, params, fixed, batch = small_model
    cfg = load(TrainConfig, overrides=[f"run_dir={cfg.run_dir}", *overrides])
    task = train.LMTask(cfg, data, chunked=chunked)
    split = {k: jnp.asarray(v.reshape(accum, 8 // accum, -1)) for k, v in batch.items()}
    fn = jax.jit(lambda p, b: trainer.accumulate(task, graph, p, fixed, b, jax.random.key(0)))
    eval_fn = jax.jit(lambda p, b: task.eval_sums(graph.merge(p, fixed, train=False), b))
    return fn(params, split), eval_fn(params, {k: jnp.asarray(v[0]) for k, v in batch.items()})


@pytest.mark.parametrize("normalize", ["tokens", "weighted", "sequence"])
def test_gradient_accumulation_equals_big_batch(small_model, normalize):
    sets = (f"loss.normalize={normalize}", "loss.z_loss=1e-3")
    (loss, _, grads), _ = _loss_and_grads(small_model, 1, *sets)  # one batch of 8 rows
    (acc_loss, _, acc_grads), _ = _loss_and_grads(small_model, 4, *sets)  # 4 micro-batches of 2
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_path_matches_full_logits(small_model):
    sets = ("loss.normalize=tokens", "loss.chunk_size=48")
    (full, full_eval) = _loss_and_grads(small_model, 1, *sets, chunked=False)
    (chunk, chunk_eval) = _loss_and_grads(small_model, 1, *sets, chunked=True)
    np.testing.assert_allclose(chunk[0], full[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(chunk[2]), jax.tree.leaves(full[2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for k in full_eval:
        np.testing.assert_allclose(chunk_eval[k], full_eval[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("warmup", [0, 1000])
def test_nonfinite_step_stops_and_never_saves_it(fixture_data, tmp_path, warmup):
    """lr=1e30: without warmup the first update overflows (the loss of that step is still
    finite); with a long warmup the parameters become huge but finite, and a later loss is not.
    Either way the bad step is named, its update is not applied and every checkpoint is finite."""
    import orbax.checkpoint as ocp

    cfg = _cfg(
        fixture_data,
        tmp_path,
        "optim.lr=1e30",
        f"optim.warmup_steps={warmup}",
        "optim.grad_clip=0",
        "checkpoint.every=1",
        "steps=4",
    )
    with pytest.raises(loop.NonFiniteStep, match=r"non-finite \w+ at step (\d)") as e:
        pipeline.train(cfg)
    bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, bad_step))
    if not saved:
        assert "No checkpoint had been saved" in str(e.value)
    else:
        assert f"last good checkpoint is step {bad_step - 1}" in str(e.value)
    for step in saved:
        state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_missing_probabilities_say_to_annotate(fixture_data, tmp_path):
    path = tmp_path / "plain.jsonl"
    rows = [json.loads(r) for r in fixture_data[0].read_text().splitlines()]
    keep = ("id", "complaint", "response", "split")
    path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    cfg = _cfg(fixture_data, tmp_path, f"data.path={path}")
    with pytest.raises(ValueError, match="classify.py annotate"):
        pipeline.train(cfg)


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
    summary = pipeline.train(cfg)
    assert summary["val_loss_end"] < 0.97 * summary["val_loss_start"]


def test_weight_decay_mask_and_schedule(small_model):
    params = small_model[3]
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
