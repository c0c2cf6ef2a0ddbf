"""One thin Orbax wrapper: save, list, validate and restore training checkpoints, never pickling.

A checkpoint ``<directory>/<step>/`` holds three items:

- ``state``: an array tree (the trainer saves ``{params, opt_state, step, rng}``), OCDBT arrays;
- ``meta``: a JSON dict (the trainer's data position and early-stopping bookkeeping);
- ``config``: the resolved run config as JSON.

Saves run in the background where Orbax supports it (``async_save``); only the last ``keep``
checkpoints are kept, and partially written ones (a killed process) are ignored and cleaned up.
Restoring takes *abstract* targets (``jax.ShapeDtypeStruct`` with the current shardings), so a
checkpoint loads onto any mesh shape without the state ever being built first.

:meth:`Checkpointer.restore_latest` is what a resuming run calls: it refuses a checkpoint of
another configuration (naming the keys whose shapes differ), and falls back past a damaged or
non-finite newest checkpoint to the previous good one, moving the damaged step directory aside to
``<directory>-damaged/`` (nothing is deleted).

Typical use::

    ckpt = Checkpointer(run_dir / "checkpoints", every=100, keep=2)
    found = ckpt.restore_latest(abstract_state)   # None, or (step, state, meta)
    ...
    ckpt.save(step, state, {"epoch": 0, "index": 64}, config_dict)
    ckpt.close()
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No usable checkpoint: every one is damaged, or they belong to another configuration."""


def abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` (with sharding) for every array or struct leaf of ``tree``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _key_path(path: tuple[Any, ...]) -> str:
    """``a/b/0/mu`` from a tree path (dict keys, sequence indices and attribute names alike)."""
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return "/".join(str(p) for p in parts)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
    """Saves every ``every`` steps (or when forced), keeps the last ``keep``.

    Args:
        directory: where step directories go (created).
        every: save interval in steps.
        keep: number of checkpoints kept.
        async_save: write in a background thread.
    """

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        meta: dict[str, Any],
        config: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (array tree), the JSON ``meta`` and the ``config`` dict.

        Returns:
            Whether a save was started (off-interval steps are skipped unless ``force``).
        """
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores step ``step`` onto the shapes, dtypes and shardings of ``target``.

        Args:
            step: a step from :meth:`latest_step` / :meth:`all_steps`.
            target: a tree like the saved state, of arrays or ``jax.ShapeDtypeStruct`` with
                ``sharding`` set (the current mesh; it may differ from the saving one).

        Returns:
            ``(state, meta)``.
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(target)), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def restore_config(self, step: int) -> dict[str, Any]:
        """The config dict saved with step ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def state_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (``shape``, ``dtype``), without reading it."""
        return self.manager.item_metadata(step)["state"]

    def mismatches(self, step: int, target: Any) -> list[str]:
        """Keys where step ``step``'s saved state and ``target`` differ in presence or shape.

        Returns:
            Lines like ``"params/h/0/attn/kernel: saved (64, 192), now (32, 96)"``; empty when the
            checkpoint fits ``target``. An unreadable metadata file gives one line saying so.
        """
        try:
            saved = self.state_metadata(step)
        except Exception as e:  # damaged metadata: report, let restore_latest fall back
            return [f"<metadata unreadable: {_first_line(e)}>"]

        def flat(tree: Any) -> dict[str, tuple[int, ...]]:
            leaves = jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
            )
            return {_key_path(path): tuple(x.shape) for path, x in leaves}

        a, b = flat(saved), flat(target)
        lines = [
            f"{k}: saved {a[k]}, now {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]
        ]
        lines += [
            f"{k}: saved {a[k]}, not in this configuration" for k in sorted(a.keys() - b.keys())
        ]
        lines += [f"{k}: not in the checkpoint, now {b[k]}" for k in sorted(b.keys() - a.keys())]
        return lines

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest restorable checkpoint, falling back past damaged ones.

        Args:
            target: the abstract state (see :meth:`restore`).

        Returns:
            ``(step, state, meta)``, or None when there is no checkpoint.

        Raises:
            CheckpointError: the newest checkpoint belongs to another configuration (its keys
                or shapes differ; the message lists them), or no checkpoint can be read.
        """
        problems = []
        for step in reversed(self.all_steps()):
            wrong = self.mismatches(step, target)
            if wrong and not wrong[0].startswith("<metadata unreadable"):
                shown = "\n  ".join(wrong[:12]) + ("\n  ..." if len(wrong) > 12 else "")
                raise CheckpointError(
                    f"{self.directory} holds checkpoints of another configuration (step {step}):"
                    f"\n  {shown}\nUse a new run_dir for this configuration, or move "
                    f"{self.directory} away to start this run over."
                )
            try:
                if wrong:
                    raise ValueError(wrong[0])
                state, meta = self.restore(step, target)
                if not bool(_all_finite(state)):
                    raise ValueError("it holds NaN or inf values")
            except Exception as e:  # any read failure means this step is damaged
                problems.append(f"step {step}: {_first_line(e)}")
                self._set_aside(step, problems[-1])
                continue
            return step, state, meta
        if problems:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: {'; '.join(problems)}. The damaged "
                f"steps were moved to {self._damaged_dir()}; rerun to start from scratch."
            )
        return None

    def _damaged_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + "-damaged")

    def _set_aside(self, step: int, why: str) -> None:
        """Moves a damaged step directory out of the manager's way (kept, never deleted)."""
        print(f"[checkpoint] {self.directory / str(step)} is damaged ({why}); trying an older one")
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            dest = self._damaged_dir() / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
            print(f"[checkpoint] moved it to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"sevjax-set-aside-{step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until background saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def host_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with NumPy scalars turned into plain Python numbers (JSON-safe)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in meta.items()}
