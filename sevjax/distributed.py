"""Multi-process start-up: ``jax.distributed.initialize`` from the launch environment.

Called by the command lines before anything else touches JAX. One process per host (GPU
servers) or per TPU VM, started by hand, by SLURM, by Open MPI or on a TPU slice:

- ``JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` (all three);
- a SLURM job with more than one task, an Open MPI launch (``OMPI_COMM_WORLD_SIZE`` > 1) or a
  multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` with several hosts): JAX's own detection.

A single process with none of these is left alone.
"""

from __future__ import annotations

import os


def initialize() -> None:
    """Initializes the multi-process runtime when the environment describes one (idempotent).

    Raises:
        ValueError: ``JAX_COORDINATOR_ADDRESS`` without ``JAX_NUM_PROCESSES`` and
            ``JAX_PROCESS_ID`` (or with non-integer values).
    """
    import jax

    if jax.distributed.is_initialized():
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three"
            )
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
        return
    if (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    ):
        jax.distributed.initialize()


def is_main() -> bool:
    """Whether this is process 0 (the one that writes files other than checkpoints)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op for a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
