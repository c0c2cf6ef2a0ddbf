"""Cached generation (unrolled and scanned KV caches): equals transformers' greedy generate and the
full forward; pads after EOS."""

import _hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _decoder_checks import check_cached_matches_full

from sevjax import hf
from sevjax.generate import _generate, generate
from sevjax.models import ModelOptions

NEW = 16
LAYOUTS = {"unrolled": ModelOptions(), "scanned": ModelOptions(scan_layers=True)}


@pytest.fixture(scope="module")
def all_pairs(tmp_path_factory):
    """layout -> kind -> (torch model, our model)."""
    out = {layout: {} for layout in LAYOUTS}
    for kind, tm in (("gpt2", fx.gpt2()), ("llama", fx.llama("llama"))):
        path = fx.save(tm, tmp_path_factory.mktemp(kind))
        for layout, options in LAYOUTS.items():
            out[layout][kind] = (tm, hf.load_pretrained(path, options=options)[0])
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pairs(request, all_pairs):
    """kind -> (torch model, our model) for one layout."""
    return all_pairs[request.param]


@pytest.fixture(scope="module")
def unrolled(all_pairs):
    """For the tests whose subject (sampling, compile cache) does not depend on the layout."""
    return all_pairs["unrolled"]


@pytest.fixture(scope="module")
def prompts():
    ids, mask, _ = fx.left_padded_batch(batch=3, length=8, seed=3)
    return ids, mask


def hf_greedy(tm, ids, mask, eos):
    with torch.no_grad():
        out = tm.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )[:, ids.shape[1] :].numpy()
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])))  # HF stops once every row is done


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(kind, pairs, prompts):
    tm, m = pairs[kind]
    ids, mask = prompts
    ours = np.asarray(generate(m, ids, mask, max_new_tokens=NEW, eos_token_id=None))
    assert ours.shape == (3, NEW) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, hf_greedy(tm, ids, mask, eos=None))
    # Ending on a token seen mid-way in row 0: that row is padded afterwards, like transformers.
    eos = int(ours[0, 5])
    with_eos = np.asarray(generate(m, ids, mask, max_new_tokens=NEW, eos_token_id=eos))
    np.testing.assert_array_equal(with_eos, hf_greedy(tm, ids, mask, eos=eos))
    first = int(np.argmax(ours[0] == eos))
    assert (with_eos[0, first + 1 :] == 0).all() and with_eos[0, first] == eos


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_decode_logits_equal_full_forward(kind, pairs, prompts):
    _, m = pairs[kind]
    ids, mask = prompts
    new = np.asarray(generate(m, ids, mask, max_new_tokens=4))
    check_cached_matches_full(m, ids, mask, new)


def test_scanned_cache_is_stacked(pairs):
    for _, m in pairs.values():
        cache = m.init_cache(3, 10)
        kh, h = m.kv_heads_and_dim
        if m.options.scan_layers:
            assert [c.shape for c in cache] == [(2, 3, 10, kh, h)] * 2
        else:
            assert len(cache) == 2 and cache[0][0].shape == (3, 10, kh, h)


def test_compiles_once_per_shape(unrolled, prompts):
    _, m = unrolled["gpt2"]
    ids, mask = prompts
    generate(m, ids, mask, max_new_tokens=NEW)
    before = _generate._cache_size()
    other = (ids + 1) * mask
    generate(m, other, mask, max_new_tokens=NEW)
    generate(m, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW)
    assert _generate._cache_size() == before


def test_sampling(unrolled, prompts):
    _, m = unrolled["llama"]
    ids, mask = prompts
    greedy = np.asarray(generate(m, ids, mask, max_new_tokens=8))
    rng = jax.random.key(7)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        out = generate(m, ids, mask, max_new_tokens=8, temperature=1.0, rng=rng, **kw)
        np.testing.assert_array_equal(np.asarray(out), greedy)
    a = generate(m, ids, mask, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, rng=rng)
    b = generate(m, ids, mask, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, rng=rng)
    c = generate(m, ids, mask, max_new_tokens=8, temperature=5.0, rng=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(c), greedy)
    with pytest.raises(ValueError, match="rng"):
        generate(m, ids, mask, max_new_tokens=8, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, ids, mask, max_new_tokens=0)
