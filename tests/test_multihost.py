"""Multi-host for real on one machine: two JAX processes with 4 CPU devices each, a 127.0.0.1
coordinator and gloo collectives, form one 8-device job through ``python train.py`` and the
documented environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Its
losses equal one process with 8 devices, and after one process is killed the job resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _lm_fixtures as lm_fixtures
import pytest

from sevjax import pipeline
from sevjax.config import load
from sevjax.schema import TrainConfig

REPO = Path(__file__).parents[1]
DIE_AT = 4
# python train.py, except that process 1 SIGKILLs itself once checkpoint DIE_AT is written
MAYBE_DIE = textwrap.dedent(
    f"""
    import os, signal, sys
    from sevjax import checkpoint, cli

    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == {DIE_AT} and os.environ.get("SEVJAX_TEST_DIE") == os.environ["JAX_PROCESS_ID"]:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    checkpoint.Checkpointer.save = save_then_die
    sys.exit(cli.train_main(sys.argv[1:]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log_dir: Path, die: str = "") -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
            "SEVJAX_TEST_DIE": die,
        }
        log = open(log_dir / f"process{i}.log", "w")  # noqa: SIM115 (closed with the process)
        cmd = [sys.executable, "-c", MAYBE_DIE, *sum((["--set", a] for a in args), [])]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log))
    return procs


def _losses(run_dir: Path) -> dict:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"]): r["loss"] for r in rows}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return lm_fixtures.make_annotated(tmp_path_factory.mktemp("data"))


def test_two_processes_equal_one_process_and_resume_after_a_kill(data, tmp_path):
    sets = ["mesh.data=-1", "log.progress=false", "export_hf=true", "steps=6"]
    one = lm_fixtures.overrides(data, tmp_path / "one", *sets)
    single = pipeline.train(load(TrainConfig, overrides=one))  # this process: 8 devices
    ref = _losses(tmp_path / "one")

    killed = lm_fixtures.overrides(data, tmp_path / "killed", *sets)
    procs = _launch(killed, tmp_path, die="1")
    assert procs[1].wait(timeout=600) == -signal.SIGKILL
    time.sleep(5)  # process 0 is stuck in a collective with a dead peer: the job is gone
    procs[0].kill()
    procs[0].wait()
    saved = sorted(
        int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert saved and max(saved) <= DIE_AT
    procs = _launch(killed, tmp_path)  # the same command again, both processes
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], (tmp_path / "process0.log").read_text()[-3000:]
    log = (tmp_path / "process0.log").read_text()
    assert "[checkpoint] resumed from step" in log
    # steps before the kill (first launch) and after it (second launch) equal one process
    got = _losses(tmp_path / "killed")
    assert set(got) == set(ref)
    for key in ref:
        assert abs(got[key] - ref[key]) <= 1e-5, (key, got[key], ref[key])
    assert abs(single["val_loss_end"] - ref[(6, "validation")]) <= 1e-9
    exported = json.loads((tmp_path / "killed" / "hf" / "config.json").read_text())
    assert exported["n_embd"] == 32  # process 0 wrote the export once
