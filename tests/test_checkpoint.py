"""Orbax wrapper: round trip, iterator position, keep-last-K, restore onto another mesh, no pickle;
restore_latest falls back past damaged or non-finite steps and refuses another configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sevjax import models
from sevjax.checkpoint import Checkpointer
from sevjax.optim import make_optimizer, opt_state_shardings
from sevjax.schema import OptimSection
from sevjax.sharding import make_mesh

CONFIG = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 4,
    "vocab_size": 64,
    "n_positions": 16,
}


_BASE: dict = {}


def _state(mesh, seed):
    """A train state {params, opt_state, step, rng} sharded on ``mesh``, offset by ``seed``."""
    key = tuple(mesh.devices.shape)
    if key not in _BASE:  # build (and compile) once per mesh shape
        model = models.build(models.config_from_hf(CONFIG), seed=0, mesh=mesh)
        params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
        tx, _ = make_optimizer(OptimSection(), 10, params)
        rep = NamedSharding(mesh, PartitionSpec())
        shardings = opt_state_shardings(tx, params, jax.tree.map(lambda x: x.sharding, params), rep)
        _BASE[key] = {
            "params": params,
            "opt_state": jax.jit(tx.init, out_shardings=shardings)(params),
            "step": jax.device_put(jnp.int32(0), rep),
            "rng": jax.device_put(jax.random.PRNGKey(0), rep),
        }
    # distinct, sharding-preserving values per seed
    return jax.tree.map(lambda x: x + jnp.asarray(seed, x.dtype), _BASE[key])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ckpt = Checkpointer(directory, every=1, keep=2, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, _state(mesh, step), {"epoch": step, "index": 10 * step}, {"steps": step})
    ckpt.close()
    return directory, _state(mesh, 3)


def test_keeps_last_k_and_restores_position_and_config(saved):
    directory, _ = saved
    ckpt = Checkpointer(directory, every=1, keep=2)
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    mesh = make_mesh(data=8)
    _, meta = ckpt.restore(3, _state(mesh, 0))
    assert meta == {"epoch": 3, "index": 30}
    assert ckpt.restore_config(3) == {"steps": 3}
    ckpt.close()


@pytest.mark.parametrize("sizes", [(1, 1, 1), (1, 4, 2), (8, 1, 1)])
def test_restore_onto_another_mesh(saved, sizes):
    directory, original = saved
    n = int(np.prod(sizes))
    mesh = make_mesh(*sizes, devices=jax.devices()[:n])
    target = _state(mesh, 0)
    ckpt = Checkpointer(directory, every=1, keep=2)
    restored, _ = ckpt.restore(3, target)
    ckpt.close()
    flat_r = jax.tree_util.tree_leaves_with_path(restored)
    flat_t = jax.tree.leaves(target)
    flat_o = jax.tree.leaves(original)
    assert len(flat_r) == len(flat_o)
    for (path, r), t, o in zip(flat_r, flat_t, flat_o):
        assert r.sharding == t.sharding, path  # lands on the current mesh
        np.testing.assert_array_equal(np.asarray(r), np.asarray(o), err_msg=str(path))


def test_never_pickles(saved):
    directory, _ = saved
    for f in directory.rglob("*"):
        if f.is_file():
            head = f.read_bytes()[:2]
            assert not (
                head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
            ), f
            assert f.suffix not in (".pkl", ".pickle"), f


def test_partial_checkpoint_is_ignored(saved, tmp_path):
    import shutil

    directory = tmp_path / "c"
    shutil.copytree(saved[0], directory)
    (directory / "4.orbax-checkpoint-tmp-123").mkdir()  # what a killed save leaves behind
    ckpt = Checkpointer(directory, every=1, keep=2)
    assert ckpt.latest_step() == 3
    ckpt.close()


def _damage(directory, step):
    """Truncates the largest array file of ``step`` (what a full disk or a bad copy leaves)."""
    import os

    data = directory / str(step) / "state" / "ocdbt.process_0" / "d"
    os.truncate(max(data.iterdir(), key=lambda p: p.stat().st_size), 100)


def _copy(saved, tmp_path):
    import shutil

    directory = tmp_path / "checkpoints"
    shutil.copytree(saved[0], directory)
    return directory


def test_restore_latest_falls_back_past_nan_and_damaged_steps(saved, tmp_path, capsys):
    directory = _copy(saved, tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ckpt = Checkpointer(directory, every=1, keep=3, async_save=False)
    bad = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else x,
                       _state(mesh, 4))  # fmt: skip
    ckpt.save(4, bad, {"epoch": 4, "index": 40}, {"steps": 4})
    ckpt.wait()
    _damage(directory, 3)
    step, state, meta = ckpt.restore_latest(_state(mesh, 0), {"steps": 2})
    ckpt.close()
    assert (step, meta) == (2, {"epoch": 2, "index": 20})
    for r, o in zip(jax.tree.leaves(state), jax.tree.leaves(_state(mesh, 2))):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(o))
    out = capsys.readouterr().out
    assert f"step 4 in {directory} is damaged (its state holds NaN or inf values)" in out
    assert f"step 3 in {directory} is damaged (" in out and f"{directory / '3' / 'state'}" in out
    damaged = directory.with_name("checkpoints-damaged")
    assert sorted(p.name.split("-")[0] for p in damaged.iterdir()) == ["3", "4"]  # kept, moved
    assert sorted(p.name for p in directory.iterdir()) == ["2"]


def test_restore_latest_unreadable_metadata_is_damage(saved, tmp_path, capsys):
    directory = _copy(saved, tmp_path)
    (directory / "3" / "state" / "_METADATA").write_text("garbage")
    ckpt = Checkpointer(directory, every=1, keep=2)
    step, _, _ = ckpt.restore_latest(_state(make_mesh(data=8), 0))
    ckpt.close()
    out = capsys.readouterr().out
    assert step == 2 and f"step 3 in {directory} is damaged (unreadable metadata: " in out


def test_restore_latest_refuses_another_configuration(saved, tmp_path):
    from sevjax.checkpoint import CheckpointError, abstract

    directory = _copy(saved, tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    target = abstract(_state(make_mesh(data=8), 0))
    emb = target["params"]["wte"]["embedding"]
    target["params"]["wte"]["embedding"] = jax.ShapeDtypeStruct((64, 16), emb.dtype)
    ckpt = Checkpointer(directory, every=1, keep=2)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(target, {"steps": 5, "run_dir": "elsewhere"})
    ckpt.close()
    message = str(e.value)
    assert f"{directory} holds checkpoints of another configuration (step 3)" in message
    assert "config keys that differ: steps (saved 3, now 5)" in message  # run_dir is ignored
    assert "params/wte/embedding: saved (64, 32), now (64, 16)" in message
    assert "\n" not in message and "nothing was changed" in message
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_restore_latest_all_damaged_and_empty(saved, tmp_path):
    from sevjax.checkpoint import CheckpointError

    directory = _copy(saved, tmp_path)
    for step in (2, 3):
        _damage(directory, step)
    target = _state(make_mesh(data=8), 0)
    ckpt = Checkpointer(directory, every=1, keep=2)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*step 3: .*; step 2: "):
        ckpt.restore_latest(target)
    assert ckpt.all_steps() == [] and ckpt.restore_latest(target) is None  # a rerun starts over
    ckpt.close()
    assert len(list(directory.with_name("checkpoints-damaged").iterdir())) == 2
