"""Layer stacks: remat policies (and the CPU gradient barrier) give the gradients of no remat and
really save less; the scanned stack carries a leading ``layers`` axis."""

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sevjax.models import ModelOptions, build
from sevjax.models.bert import BertConfig
from sevjax.models.llama import LlamaConfig

LLAMA = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
BERT = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
)
IDS = jnp.asarray(np.random.RandomState(0).randint(1, 64, (2, 12)), jnp.int32)
MASK = jnp.ones((2, 12), jnp.int32).at[1, :3].set(0)


def lm_loss(params, graphdef, rest):
    logits = nnx.merge(graphdef, params, rest)(IDS, MASK)
    return jax.nn.log_softmax(logits)[..., 5].mean()


def bert_loss(params, graphdef, rest):
    # fresh RNG Variables at this trace level (NNX refuses mutating ones from another level)
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
    return jax.nn.log_softmax(model(IDS, MASK))[:, 1].mean()


def _count_saved(loss, *args) -> int:
    """Number of residuals the backward pass keeps (one line each from print_saved_residuals)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, *args)
    return len(out.getvalue().splitlines())


def _split(config, options, train=False):
    model = build(config, seed=0, options=options)
    if train:  # dropout on; RBG keys compile far faster than threefry on XLA:CPU
        model = nnx.view(model, deterministic=False)
        nnx.reseed(model, dropout=jax.random.key(3, impl="rbg"), policy="match_shape")
    return nnx.split(model, nnx.Param, ...)


@pytest.mark.parametrize(
    "family,scan,variants",
    [
        ("llama", True, ("dots", "full")),
        ("llama", False, ("full+barrier",)),
        ("bert-train", True, ("full",)),
    ],
)
def test_remat_gives_the_same_gradients_and_saves_less(family, scan, variants):
    """Same gradients (1e-6) with remat "dots"/"full" (and the CPU gradient barrier) as without,
    and fewer saved residuals: full < dots < none.

    BERT runs in train mode: a recomputed block must redraw the same dropout masks.
    """
    config, loss = (LLAMA, lm_loss) if family == "llama" else (BERT, bert_loss)
    grads, saved = {}, {}
    for variant in ("none", *variants):
        remat, _, barrier = variant.partition("+")
        options = ModelOptions(scan_layers=scan, remat=remat, grad_barrier=barrier == "barrier")
        graphdef, params, rest = _split(config, options, train=family == "bert-train")
        f = jax.jit(jax.value_and_grad(loss), static_argnums=1)
        grads[variant] = jax.tree.leaves(f(params, graphdef, rest))
        saved[variant] = _count_saved(loss, params, graphdef, rest)
    for variant in variants:
        for a, b in zip(grads[variant], grads["none"], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    chain = [saved[v] for v in ("full", "full+barrier", "dots", "none") if v in saved]
    assert chain == sorted(set(chain)), saved  # strictly increasing


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_scanned_params_have_a_leading_layers_axis(family):
    config = LLAMA if family == "llama" else BERT
    scanned = build(config, options=ModelOptions(scan_layers=True))
    unrolled = build(config)
    flat_s = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(scanned, nnx.Param))}
    flat_u = {
        ".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))
    }
    for path, var in flat_u.items():
        if path.startswith("layers.0."):
            stacked = flat_s["layers." + path[len("layers.0.") :]]
            assert stacked.shape == (2, *var.shape)
            assert stacked.get_metadata()["axes"] == ("layers", *var.get_metadata()["axes"])
        elif not path.startswith("layers."):
            assert flat_s[path].shape == var.shape
    assert len(flat_s) == len([p for p in flat_u if not p.startswith("layers.1.")])
