"""One thin Orbax wrapper: save / find / restore training checkpoints, never pickling.

A checkpoint ``<directory>/<step>/`` holds three items:

- ``state``: the array tree ``{params, opt_state, step, rng}`` (OCDBT/tensorstore arrays);
- ``data``: the data-iterator position ``{"epoch": int, "index": int}`` as JSON;
- ``config``: the resolved run config as JSON.

Saves run in the background where Orbax supports it (``async_save``); only the last ``keep``
checkpoints are kept, and partially written ones (a killed process) are ignored and cleaned up.
Restoring takes the *current* target shardings, so a checkpoint written on one mesh shape loads
onto another.

Typical use::

    ckpt = Checkpointer(run_dir / "checkpoints", every=100, keep=2)
    if (step := ckpt.latest_step()) is not None:
        state, position = ckpt.restore(step, state)
    ...
    ckpt.save(step, state, position, config_dict)
    ckpt.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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
                "data": ocp.JsonCheckpointHandler(),
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
        state: dict[str, Any],
        position: tuple[int, int],
        config: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (array tree), the iterator ``position`` and the ``config`` dict.

        Returns:
            Whether a save was started (off-interval steps are skipped unless ``force``).
        """
        epoch, index = position
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"epoch": int(epoch), "index": int(index)}),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, tuple[int, int]]:
        """Restores step ``step`` onto the shapes, dtypes and shardings of ``target``.

        Args:
            step: a step from :meth:`latest_step` / :meth:`all_steps`.
            target: a tree like the saved state, of arrays or ``jax.ShapeDtypeStruct`` with
                ``sharding`` set (the current mesh; it may differ from the saving one).

        Returns:
            ``(state, (epoch, index))``.
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        data = restored["data"]
        return restored["state"], (int(data["epoch"]), int(data["index"]))

    def restore_config(self, step: int) -> dict[str, Any]:
        """The config dict saved with step ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def state_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (``shape``, ``dtype``), without reading it."""
        return self.manager.item_metadata(step)["state"]

    def wait(self) -> None:
        """Blocks until background saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
