"""Orbax wrapper: round trip, iterator position, keep-last-K, restore onto another mesh, no pickle."""

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
