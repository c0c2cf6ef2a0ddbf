"""The trainer on a toy task: the finite-update guard, early stopping and the best checkpoint,
resume without building the model, and activation sharding that holds under the mesh."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sevjax import loop, sharding, trainer
from sevjax.schema import CheckpointSection, LogSection, OptimSection

ROWS = 8


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = sharding.param(jnp.zeros((4, 1)), ("embed", None))

    def __call__(self, x):
        return sharding.constrain(x, ("batch", "embed")) @ self.w[...]


class ToyTask:
    """Least squares on fixed data; ``loss_sums`` may take a square root to make NaN gradients."""

    score = ("loss", "min")
    loss_label = "MSE"
    unit = "examples"
    train_rows = eval_rows = ROWS

    def __init__(self, *, sqrt: bool = False, scores: list[float] | None = None):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(64, 4)).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32))[:, None]
        self.sqrt, self.scores, self.evals = sqrt, scores, 0

    def loss_sums(self, model, batch, rng):
        err = jnp.sum((model(batch["x"]) - batch["y"]) ** 2)
        return {"sq": jnp.sqrt(jnp.sum(model.w[...] ** 2)) + err if self.sqrt else err,
                "n": jnp.float32(batch["x"].shape[0])}  # fmt: skip

    def loss_terms(self, sums):
        return sums["sq"], sums["n"]

    def eval_sums(self, model, batch):
        return {"sq": jnp.sum((model(batch["x"]) - batch["y"]) ** 2), "n": jnp.float32(ROWS)}

    def train_batch(self, position, rows):
        epoch, index = position
        idx = np.arange(index, index + ROWS) % 64
        batch = {"x": self.x[idx][None, rows], "y": self.y[idx][None, rows]}
        return batch, (epoch + (index + ROWS) // 64, (index + ROWS) % 64)

    def eval_batches(self, rows):
        yield {"x": self.x[:ROWS][rows], "y": self.y[:ROWS][rows]}

    def train_record(self, sums):
        return {}

    def eval_record(self, sums):
        self.evals += 1
        if self.scores is not None:  # a scripted validation curve
            return {"loss": self.scores[min(self.evals - 1, len(self.scores) - 1)]}
        return {"loss": float(sums["sq"]) / float(sums["n"])}

    def describe(self, record):
        return f"loss {record['loss']:.4f}"

    def count(self, batch):
        return ROWS


def _source(calls=None):
    def load():
        if calls is not None:
            calls.append("load")
        return sharding.create_sharded(lambda: Toy(nnx.Rngs(0)), MESH[0])

    return trainer.ModelSource(lambda: Toy(nnx.Rngs(0)), load)


MESH: list = []


@pytest.fixture(autouse=True)
def mesh():
    MESH[:] = [sharding.make_mesh(2, 2, 2)]
    return MESH[0]


def _fit(task, run_dir, mesh, calls=None, **kw):
    loop_kw = dict(
        steps=6, eval_every=1, log=LogSection(every=1, tensorboard=False, progress=False)
    )
    loop_kw.update(checkpoint=CheckpointSection(every=1, keep=2, async_save=False), **kw)
    optim = OptimSection(lr=0.1, warmup_steps=0, schedule="constant")
    return loop.fit(
        task, _source(calls), run_dir=run_dir, mesh=mesh, optim_cfg=optim,
        loop=loop.Loop(**loop_kw), seed=0, config={"toy": 1},
    )  # fmt: skip


def test_a_finite_loss_with_a_nan_gradient_is_not_applied(tmp_path, mesh):
    # sqrt(|w|^2) at w = 0: the loss is finite, its gradient is NaN
    with pytest.raises(loop.NonFiniteStep, match=r"non-finite gradient at step 1 \(loss [0-9.]+"):
        _fit(ToyTask(sqrt=True), tmp_path, mesh)
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_early_stopping_keeps_and_returns_the_best(tmp_path, mesh):
    # validation losses after steps 1..6: best at step 2, then 2 evaluations without progress
    scores = [9.0, 5.0, 4.0, 6.0, 7.0, 8.0, 9.0]  # the first is the step-0 reference
    task = ToyTask(scores=scores)
    result = _fit(task, tmp_path, mesh, patience=2, keep_best=True)
    assert result.stopped_early and result.steps == 4 and result.best == {"step": 2, "score": 4.0}
    best = trainer.split(result.model, nnx.Param)[1]
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "validation"] == [0, 1, 2, 3, 4]
    # the best parameters are step 2's: rerunning 2 steps from scratch gives them
    again = _fit(ToyTask(), tmp_path / "two", mesh, steps=2)
    np.testing.assert_array_equal(
        np.asarray(best["w"]), np.asarray(trainer.split(again.model, nnx.Param)[1]["w"])
    )
    # a rerun of the stopped run stops at once (the checkpoint remembers)
    rerun = _fit(ToyTask(scores=scores), tmp_path, mesh, patience=2, keep_best=True)
    assert rerun.start == 4 and rerun.steps == 4 and rerun.stopped_early


def test_resume_restores_without_building_the_model(tmp_path, mesh):
    calls = []
    first = _fit(ToyTask(), tmp_path, mesh, calls=calls)
    assert calls == ["load"]
    again = _fit(ToyTask(), tmp_path, mesh, calls=calls, steps=8)  # resumes from step 6
    assert calls == ["load"] and again.start == 6 and again.steps == 8
    w6 = np.asarray(trainer.split(first.model, nnx.Param)[1]["w"])
    assert np.abs(np.asarray(trainer.split(again.model, nnx.Param)[1]["w"]) - w6).max() > 0


def _activation_constraints(text: str) -> int:
    """Sharding constraints splitting dimension 0 over the data axes (the toy's activation)."""
    return len(re.findall(r'sharding_constraint [^\n]*\[\{"data", "fsdp"\}', text))


def test_activation_constraints_apply_only_under_the_mesh(mesh):
    source = _source()
    s = trainer.setup(source, mesh=mesh, optim_cfg=OptimSection(), steps=10, trainable=nnx.Param)
    task = ToyTask()
    batch, _ = task.train_batch((0, 0), slice(None))
    batch_sh = trainer.batch_shardings(batch, mesh, lead=1)
    args = (s.state, s.fixed, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch),
            jax.ShapeDtypeStruct((2,), jnp.uint32))  # fmt: skip
    with jax.set_mesh(mesh):
        inside = trainer.make_train_step(task, s, batch_sh).lower(*args).as_text()
    outside = trainer.make_train_step(task, s, batch_sh).lower(*args).as_text()
    # the model's activation constraint applies only under the mesh (the train loop sets it)
    assert _activation_constraints(inside) >= 1 and _activation_constraints(outside) == 0
    # the gradient accumulators are constrained to the parameter shardings either way
    assert len(re.findall(r'sharding_constraint [^\n]*\[\{"fsdp"\}, \{\}\]', outside)) >= 2
