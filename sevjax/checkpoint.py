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
another configuration (naming the config keys and array shapes that differ, before reading any
array), and falls back past a damaged or non-finite checkpoint to the previous good one, moving
the damaged step directory aside to ``<directory>-damaged/`` (nothing is deleted). Its messages
name the step, the directory and the file or array that failed.

Typical use::

    ckpt = Checkpointer(run_dir / "checkpoints", every=100, keep=2)
    found = ckpt.restore_latest(abstract_state, config_dict)  # None or (step, state, meta)
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
import orbax.checkpoint as ocp

from sevjax.distributed import barrier, is_main


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


def _reason(error: BaseException) -> str:
    """The root cause's first line: Orbax wraps TensorStore's precise error (which names the
    array and the file) in an exception whose text is an unprintable object."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


_ORBAX_NOISE = ("Event loop is closed", "Encountered error while reading array index")


def _quiet_failed_reads() -> None:
    """Drops the echoes of a failed Orbax read that arrive after it was reported.

    A failed restore leaves Orbax's other concurrent array reads running; when they finish on
    TensorStore threads after the event loop closed, or are garbage-collected, Python prints
    "Event loop is closed" and "Exception ignored in <coroutine ...>" tracebacks, and asyncio
    logs "Task exception was never retrieved". Only those (the failure :meth:`restore_latest`
    already named) are dropped; everything else reaches the previous hooks. Installed once.
    """
    import logging
    import sys

    if getattr(sys.unraisablehook, "_sevjax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(args: Any) -> None:
        if not any(text in str(args.exc_value) for text in _ORBAX_NOISE):
            previous(args)

    hook._sevjax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not any(text in record.getMessage() for text in _ORBAX_NOISE)
    )


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
            checkpoint fits ``target``.
        """

        def flat(tree: Any) -> dict[str, tuple[int, ...]]:
            leaves = jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
            )
            return {_key_path(path): tuple(x.shape) for path, x in leaves}

        def order(keys: set[str]) -> list[str]:  # parameters first: they tell the story
            return sorted(keys, key=lambda k: (not k.startswith("params"), k))

        a, b = flat(self.state_metadata(step)), flat(target)
        lines = [
            f"{k}: saved {a[k]}, now {b[k]}" for k in order(a.keys() & b.keys()) if a[k] != b[k]
        ]
        lines += [
            f"{k}: saved {a[k]}, not in this configuration" for k in order(a.keys() - b.keys())
        ]
        lines += [f"{k}: not in the checkpoint, now {b[k]}" for k in order(b.keys() - a.keys())]
        return lines

    def restore_latest(
        self, target: Any, config: dict[str, Any] | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest restorable checkpoint, falling back past damaged ones.

        A step whose files cannot be read, or whose state holds NaN or inf, is moved to
        ``<directory>-damaged/<step>-<time>`` (printed) and the next older one is tried.

        Args:
            target: the abstract state (see :meth:`restore`).
            config: the current run's config dict; when given, a refusal names the config keys
                that differ from the checkpoint's saved config.

        Returns:
            ``(step, state, meta)``, or None when there is no checkpoint.

        Raises:
            CheckpointError: the newest checkpoint belongs to another configuration (array keys
                or shapes differ; nothing is moved), or no checkpoint can be read (all moved).
        """
        problems = []
        for step in reversed(self.all_steps()):
            try:
                wrong = self.mismatches(step, target)
            except Exception as e:  # unreadable metadata: this step is damaged
                problems.append(self._set_aside(step, f"unreadable metadata: {_reason(e)}"))
                continue
            if wrong:
                raise CheckpointError(self._foreign(step, wrong, config))
            try:
                state, meta = self.restore(step, target)
                finite = bool(_all_finite(state))
            except Exception as e:  # any read failure means this step is damaged
                _quiet_failed_reads()
                problems.append(self._set_aside(step, _reason(e)))
                continue
            if not finite:
                problems.append(self._set_aside(step, "its state holds NaN or inf values"))
                continue
            return step, state, meta
        if problems:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: {'; '.join(problems)}. All of them "
                f"were moved to {self._damaged_dir()}; rerun to start this run from step 0 "
                "(or put an intact copy back into the checkpoints directory first)"
            )
        return None

    def _foreign(self, step: int, wrong: list[str], config: dict[str, Any] | None) -> str:
        """The refusal of a checkpoint of another configuration, in one line."""
        from sevjax.rundir import changed_keys

        arrays = f"{len(wrong)} array(s) differ, e.g. {wrong[0]}"
        try:
            saved = self.restore_config(step) if config is not None else None
        except Exception:  # the config item is damaged: the array shapes still tell the story
            saved = None
        if saved is not None:
            keys = changed_keys(saved, config, ignore=("run_dir",))
            shown = ", ".join(f"{k} (saved {_get(saved, k)!r}, now {_get(config, k)!r})"
                              for k in keys[:8])  # fmt: skip
            if keys:
                arrays = (
                    f"config keys that differ: {shown}{' ...' if len(keys) > 8 else ''}; " + arrays
                )
        return (
            f"{self.directory} holds checkpoints of another configuration (step {step}): {arrays}. "
            "Use a new run_dir for this configuration (--set run_dir=...), or rerun with the "
            "checkpoint's settings to resume it; nothing was changed"
        )

    def _damaged_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + "-damaged")

    def _set_aside(self, step: int, why: str) -> str:
        """Moves a damaged step directory out of the manager's way (kept, never deleted).

        Returns:
            ``"step <step>: <why>"``.
        """
        self.manager.wait_until_finished()
        if is_main():
            stamp, k = time.strftime("%Y%m%d-%H%M%S"), 1
            dest = self._damaged_dir() / f"{step}-{stamp}"
            while dest.exists():  # the same step set aside twice within a second
                k += 1
                dest = self._damaged_dir() / f"{step}-{stamp}-{k}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
            print(
                f"[checkpoint] step {step} in {self.directory} is damaged ({why}); moved to {dest}"
            )
        barrier(f"sevjax-set-aside-{step}")
        self.manager.reload()
        return f"step {step}: {why}"

    def wait(self) -> None:
        """Blocks until background saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _get(config: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config
