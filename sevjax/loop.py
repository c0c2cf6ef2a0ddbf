"""The training loop: :func:`fit` runs a :class:`sevjax.trainer.Task` to the end, resumably.

It owns periodic evaluation, logging (:mod:`sevjax.logs`), checkpoints with the data position
(:mod:`sevjax.checkpoint`), resume, a stop on the first non-finite step, and, when asked, early
stopping and the best checkpoint by the task's validation score. The state, the jitted steps and
all gradient code are in :mod:`sevjax.trainer`.

Step ``t`` checkpoints (every ``checkpoint.every`` steps and at the end) hold ``{params,
opt_state, step, rng}`` plus JSON ``meta``: the data position ``(epoch, index)`` after step ``t``
and the early-stopping bookkeeping, so a run killed at any moment resumes exactly. A checkpoint
is written only after every step up to it has been checked finite on the host.

Typical use (see :func:`sevjax.train.run`)::

    result = fit(task, source, run_dir=run_dir, mesh=mesh, optim_cfg=cfg.optim,
                 loop=Loop(steps=200, eval_every=50), seed=0, config=to_dict(cfg))
    result.model  # eval mode, final (or best) parameters
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sevjax.checkpoint import Checkpointer
from sevjax.distributed import is_main
from sevjax.logs import RunLog
from sevjax.rundir import changed_keys, write_config
from sevjax.schema import CheckpointSection, LogSection, OptimSection
from sevjax.trainer import (
    ModelSource,
    Position,
    Task,
    add_sums,
    batch_shardings,
    evaluate,
    initial_state,
    make_eval_step,
    make_train_step,
    process_rows,
    put,
    restored_fixed,
    setup,
)


@dataclasses.dataclass(frozen=True)
class Loop:
    """The loop's settings (plain values, settled before tracing)."""

    steps: int
    eval_every: int = 50
    patience: int = 0  # evaluations without a better score before stopping; 0 = never
    keep_best: bool = False  # keep the best checkpoint by score; the result holds its params
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()


@dataclasses.dataclass
class Fit:
    """What :func:`fit` returns."""

    model: nnx.Module  # eval mode, final parameters (best ones with ``keep_best``)
    start: int  # step the run started from (0, or the resumed checkpoint's)
    steps: int  # steps done
    first_eval: dict[str, Any] | None  # before training (None when resumed)
    last_eval: dict[str, Any] | None
    best: dict[str, Any] | None  # {"step", "score"} among evaluations after training steps
    stopped_early: bool
    last_train: dict[str, Any]
    units_per_s: float | None
    checkpoints: Path


class NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient was NaN/inf; its update was not applied."""


def fit(
    task: Task,
    source: ModelSource,
    *,
    run_dir: Path,
    mesh: Mesh,
    optim_cfg: OptimSection,
    loop: Loop,
    seed: int,
    config: dict[str, Any],
    trainable: Any = nnx.Param,
) -> Fit:
    """Trains ``task`` (or resumes it from ``<run_dir>/checkpoints``); see the module docstring.

    Writes ``<run_dir>/checkpoints/`` (and ``best/`` with ``loop.keep_best``) and, on process 0,
    ``config.json`` (``config``; only once the checkpoints in ``run_dir`` are known to fit, so a
    refused rerun leaves the previous one as it was), ``metrics.jsonl`` and ``tb/``.

    Raises:
        NonFiniteStep: a step's loss or gradient was NaN/inf (its update was not applied; the
            last checkpoint, saved after finite steps only, is named in the message).
        sevjax.checkpoint.CheckpointError: ``run_dir`` holds checkpoints of another
            configuration, or none of them can be read.
    """
    s = setup(source, mesh=mesh, optim_cfg=optim_cfg, steps=loop.steps, trainable=trainable)
    c = loop.checkpoint
    ckpt = Checkpointer(
        run_dir / "checkpoints", every=c.every, keep=c.keep, async_save=c.async_save
    )
    best = (
        Checkpointer(run_dir / "best", every=1, keep=1, async_save=False)
        if loop.keep_best
        else None
    )
    try:
        with jax.set_mesh(mesh):
            found = ckpt.restore_latest(s.checkpoint_target(), config) if c.resume else None
            if found is not None:
                start, state, meta = found
                rng = state.pop("rng")
                fixed = restored_fixed(source, s, trainable=trainable)
                print(f"[checkpoint] resumed from step {start} in {ckpt.directory}")
                _note_config_change(ckpt, start, config)
            else:
                if ckpt.all_steps():
                    raise ValueError(
                        f"{ckpt.directory} already holds checkpoints and checkpoint.resume=false: "
                        "use a new run_dir (nothing there was changed)"
                    )
                start, meta, rng = 0, {"epoch": 0, "index": 0}, s.rng(seed)
                state, fixed = initial_state(source, s, trainable=trainable)
            if is_main():  # the inputs loaded and the checkpoints fit: commit
                write_config(run_dir, config)
            runner = _Runner(task, s, loop, run_dir, ckpt, best, config, state, fixed, rng)
            return runner.run(start, meta)
    finally:
        ckpt.close()
        if best is not None:
            best.close()


def _note_config_change(ckpt: Checkpointer, step: int, config: dict[str, Any]) -> None:
    changed = changed_keys(ckpt.restore_config(step), config, ignore=("run_dir",))
    if changed:
        print(f"[checkpoint] note: config differs from the checkpoint's in {', '.join(changed)}")


class _Runner:
    """The mutable state of one :func:`fit` loop, split into small steps."""

    def __init__(self, task, s, loop, run_dir, ckpt, best, config, state, fixed, rng):
        self.task, self.s, self.loop, self.run_dir = task, s, loop, Path(run_dir)
        self.ckpt, self.best_ckpt, self.config = ckpt, best, config
        self.state, self.fixed, self.rng = state, fixed, rng
        self.main = is_main()
        self.eval_step = make_eval_step(task, s)
        self.train_step = None
        self.units, self.seconds = 0, 0.0
        self.last_train: dict[str, Any] = {}

    def run(self, start: int, meta: dict[str, Any]) -> Fit:
        loop, task = self.loop, self.task
        position = (int(meta["epoch"]), int(meta["index"]))
        self.best = (
            None
            if meta.get("best_step") is None
            else {"step": meta["best_step"], "score": meta["best_score"]}
        )
        self.since_best = int(meta.get("since_best", 0))
        self.log = RunLog(
            self.run_dir, total=loop.steps, start=start, active=self.main,
            tensorboard=loop.log.tensorboard, progress=loop.log.progress,
        )  # fmt: skip
        first = last = None
        done = start
        try:
            if start == 0:
                first = last = self._evaluate(0, train=None)
            stopped = self._stop()
            pending: list = []
            rows = process_rows(self.s.mesh, task.train_rows)
            t0 = time.time()
            for step in range(start, loop.steps):
                if stopped:
                    break
                batch, position = task.train_batch(position, rows)
                if self.train_step is None:
                    sh = batch_shardings(batch, self.s.mesh, lead=1)
                    self.batch_sh, self.train_step = sh, make_train_step(task, self.s, sh)
                batch_on = put(batch, self.batch_sh, task.train_rows, 1)
                self.state, metrics = self.train_step(self.state, self.fixed, batch_on, self.rng)
                done = step + 1
                pending.append((done, metrics, task.count(batch)))
                self.log.bar.update(1)
                if step == start:  # the first step compiles: time the rest
                    jax.block_until_ready(metrics)
                    pending[-1] = (done, metrics, 0)
                    t0 = time.time()
                save = done % loop.checkpoint.every == 0 or done == loop.steps
                evaluate = done % loop.eval_every == 0 or done == loop.steps
                if done % loop.log.every and not (save or evaluate):
                    continue
                self._flush(pending, t0)
                pending = []
                if evaluate:
                    last = self._evaluate(done, train=self.last_train)
                    stopped = self._stop()
                if save or stopped:
                    self._save(done, position, stopped)
                t0 = time.time()
            if last is None:  # resumed a finished run: still report the validation metrics
                last = self._evaluate(done, train=None, record=False)
        except NonFiniteStep as e:
            self.ckpt.wait()
            last = self.ckpt.latest_step()
            where = (
                f"The last good checkpoint is step {last} in {self.ckpt.directory}"
                if last is not None
                else "No checkpoint had been saved"
            )
            raise NonFiniteStep(f"{e}; stopped. {where}") from None
        finally:
            self.log.close()
        return self._result(start, done, first, last, stopped)

    def _flush(self, pending: list, t0: float) -> None:
        """Fetches pending step metrics, stops on a non-finite step, logs the interval."""
        host = jax.device_get([m for _, m, _ in pending])
        seconds = time.time() - t0
        for (step, _, _), m in zip(pending, host):
            if not m["finite"]:
                what = (
                    "loss" if not np.isfinite(m["loss"])
                    else "gradient" if not np.isfinite(m["grad_norm"])
                    else "update"
                )  # fmt: skip
                hint = (
                    "; the learning rate times the gradient overflowed" if what == "update" else ""
                )
                raise NonFiniteStep(
                    f"non-finite {what} at step {step} (loss {float(m['loss'])}, gradient norm "
                    f"{float(m['grad_norm'])}{hint}); its update was not applied"
                )
        sums: dict[str, Any] = {}
        for m in host:
            add_sums(sums, m["sums"])
        numerator, denominator = self.task.loss_terms(sums)
        units = sum(u for _, _, u in pending) * jax.process_count()
        self.units, self.seconds = self.units + units, self.seconds + seconds
        record = {
            "step": pending[-1][0],
            "split": "train",
            "loss": float(numerator) / float(denominator),
            **self.task.train_record(sums),
            "grad_norm": float(host[-1]["grad_norm"]),
            "lr": float(host[-1]["lr"]),
            f"{self.task.unit}_per_s": units / seconds if units and seconds > 0 else None,
        }
        self.last_train = record
        self.log.write(record)
        shown = {self.task.loss_label: f"{record['loss']:.4f}"}
        shown.update({k: f"{record[k]:.4f}" for k in ("nll",) if record.get(k) is not None})
        self.log.bar.set_postfix(shown)

    def _evaluate(self, step: int, *, train: dict | None, record: bool = True) -> dict[str, Any]:
        params = self.state["params"]
        metrics = evaluate(self.task, self.eval_step, params, self.fixed, self.s.mesh)
        if not record:
            return metrics
        self.log.write({"step": step, "split": "validation", **metrics})
        self.log.note(f"[eval] step {step}: {self.task.describe(metrics)}")
        if train is None:  # before training: a reference, not a candidate for "best"
            return metrics
        key, mode = self.task.score
        score = float(metrics[key])
        better = self.best is None or (
            score < self.best["score"] if mode == "min" else score > self.best["score"]
        )
        if better:
            self.best, self.since_best = {"step": step, "score": score}, 0
            if self.best_ckpt is not None:
                meta = {"step": step, "score": score}
                self.best_ckpt.save(step, {"params": params}, meta, self.config, force=True)
        else:
            self.since_best += 1
        return metrics

    def _stop(self) -> bool:
        return bool(self.loop.patience) and self.since_best >= self.loop.patience

    def _save(self, step: int, position: Position, stopped: bool) -> None:
        meta = {"epoch": int(position[0]), "index": int(position[1]), "since_best": self.since_best}
        meta.update(best_step=None, best_score=None, stopped=stopped)
        if self.best is not None:
            meta.update(best_step=self.best["step"], best_score=self.best["score"])
        state = {**self.state, "rng": self.rng}
        self.ckpt.save(step, state, meta, self.config, force=True)

    def _result(self, start, done, first, last, stopped) -> Fit:
        params = self.state["params"]
        if self.best_ckpt is not None and self.best is not None:
            self.best_ckpt.wait()
            target = {"params": self.s.state["params"]}
            params = self.best_ckpt.restore(self.best["step"], target)[0]["params"]
        model = self.s.graph.merge(params, self.fixed, train=False)
        return Fit(
            model=model,
            start=start,
            steps=done,
            first_eval=first,
            last_eval=last,
            best=self.best,
            stopped_early=stopped,
            last_train=self.last_train,
            units_per_s=self.units / self.seconds if self.seconds else None,
            checkpoints=self.ckpt.directory,
        )
