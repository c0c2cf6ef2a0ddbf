"""Sharding rules: a dimension the mesh axis does not divide stays replicated, with one warning
per distinct case naming the parameter path, the dimension and the mesh axis."""

import logging

import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from sevjax import sharding
from sevjax.models import model_class
from sevjax.models.llama import LlamaConfig
from sevjax.sharding import logical_to_spec, make_mesh, state_shardings

# 6 heads do not split over tensor=4 (D = 48 does, so only the heads dims are affected).
CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
)


def test_undivided_dimension_is_replicated_and_warned_once(caplog, monkeypatch):
    monkeypatch.setattr(sharding, "_WARNED", set())
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    abstract = nnx.state(nnx.eval_shape(lambda: model_class(CONFIG)(CONFIG, rngs=nnx.Rngs(0))))
    with caplog.at_level(logging.WARNING, logger="sevjax.sharding"):
        for _ in range(2):  # the second pass repeats every case: no new warnings
            shardings = state_shardings(abstract, mesh)
    q = shardings["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.spec == PartitionSpec("fsdp", None, None)  # [D, N=6, H]: heads replicated
    messages = [r.getMessage() for r in caplog.records]
    q_msgs = [m for m in messages if m.startswith("layers.0.self_attn.q_proj.kernel:")]
    assert q_msgs == [
        "layers.0.self_attn.q_proj.kernel: dimension 6 is not divisible by mesh axis 'tensor' "
        "(size 4); left replicated"
    ]
    assert len(messages) == len(set(messages))
    assert any(m.startswith("layers.1.self_attn.k_proj.kernel: dimension 2") for m in messages)


def test_activation_constraint_warns_with_the_logical_axis(caplog, monkeypatch):
    monkeypatch.setattr(sharding, "_WARNED", set())
    mesh = make_mesh(data=8)
    with caplog.at_level(logging.WARNING, logger="sevjax.sharding"):
        for _ in range(3):
            spec = logical_to_spec(("batch", None), mesh, jnp.zeros((6, 2)).shape)
    assert spec == PartitionSpec(None, None)
    assert [r.getMessage() for r in caplog.records] == [
        "logical axis 'batch': dimension 6 is not divisible by mesh axis 'data' (size 8); "
        "left replicated"
    ]
