"""Prompt formatting, loss masks, truncation, bucketing, packing and the resumable iterator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import PreTrainedTokenizerFast

from sevjax import lm_data, models
from sevjax import loss as L
from sevjax import tokenizer as tok_lib

WORDS = "ألم صداع حمى سعال دواء طبيب مريض راحة ماء نوم قلب ضغط سكر دم عين أذن".split()
TEMPLATE = "الشكوى: {complaint}\nالرد: "


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(0)
    return [
        {"complaint": _sentence(rng, 3 + i % 5), "response": _sentence(rng, 4 + (7 * i) % 9)}
        for i in range(24)
    ]


@pytest.fixture(scope="module")
def tokenizer(examples, tmp_path_factory):
    texts = [ex["complaint"] for ex in examples] + [ex["response"] for ex in examples]
    return tok_lib.train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def encoded(examples, tokenizer):
    n = len(examples)
    weights = np.linspace(1.0, 2.0, n).astype(np.float32)
    severity = np.arange(n) % 3
    return lm_data.encode_examples(
        examples, tokenizer, weights, severity, template=TEMPLATE, chat_template=True, max_length=64
    )


def test_bpe_is_deterministic_and_reloads(examples, tokenizer, tmp_path):
    texts = [ex["complaint"] for ex in examples] + [ex["response"] for ex in examples]
    again = tok_lib.train_bpe_tokenizer(texts, 300, tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    text = examples[0]["response"]
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded(text).input_ids[0] == loaded.bos_token_id  # HF callers get the training format


def test_loss_only_on_response_and_eos(examples, tokenizer):
    prompt, answer = lm_data.format_example(
        tokenizer, "صداع", "دواء وراحة", template=TEMPLATE, chat_template=True
    )
    assert prompt[0] == tokenizer.bos_token_id and answer[-1] == tokenizer.eos_token_id
    data = lm_data.Encoded(
        [np.array(prompt + answer, np.int32)], np.array([len(prompt)]), np.ones(1), np.zeros(1)
    )
    b = lm_data.rows_to_batch(data, [[0]], 32)
    n = len(prompt) + len(answer) - 1
    targets = b["labels"][0][b["loss_mask"][0] == 1]
    np.testing.assert_array_equal(targets, answer)  # exactly the response tokens + EOS
    assert b["loss_mask"][0, n:].sum() == 0 and b["segment_ids"][0, n:].sum() == 0
    np.testing.assert_array_equal(b["input_ids"][0, :n], (prompt + answer)[:-1])


def test_chat_template_is_used_when_present(tokenizer):
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt, answer = lm_data.format_example(
        tok, "صداع", "راحة", template=TEMPLATE, chat_template=True
    )
    assert tok.decode(prompt) == "<user>صداع</s><assistant>"
    assert tok.decode(answer) == "راحة</s>"
    plain, _ = lm_data.format_example(tok, "صداع", "راحة", template=TEMPLATE, chat_template=False)
    assert tok.decode(plain) == TEMPLATE.format(complaint="صداع")


def test_truncation_is_counted_and_prompt_only_rows_dropped(examples, tokenizer, capsys):
    w, s = np.ones(len(examples)), np.zeros(len(examples))
    prompts = [
        len(
            lm_data.format_example(
                tokenizer, ex["complaint"], "", template=TEMPLATE, chat_template=False
            )[0]
        )
        for ex in examples
    ]
    limit = int(np.median(prompts))  # about half the prompts fill the whole length
    enc = lm_data.encode_examples(
        examples, tokenizer, w, s, template=TEMPLATE, chat_template=False, max_length=limit,
        min_prompt=10**6,  # prompts may not be shortened: those filling the length are dropped
    )  # fmt: skip
    assert 0 < len(enc) < len(examples)
    out = capsys.readouterr().out
    assert "truncated" in out and "dropped" in out
    assert max(enc.length(i) for i in range(len(enc))) <= limit
    assert all(enc.starts[i] < len(enc.tokens[i]) for i in range(len(enc)))


def test_bucketing():
    assert lm_data.bucket_length(5, (16, 8, 32)) == 8
    assert lm_data.bucket_length(9, (8, 16, 32)) == 16
    with pytest.raises(ValueError, match="largest bucket"):
        lm_data.bucket_length(33, (8, 16, 32))


def test_iterator_is_deterministic_and_resumable(encoded):
    batcher = lm_data.Batcher(encoded, batch_size=4, accum=2, buckets=(32, 64), pack=False, seed=3)
    position, seen = (0, 0), []
    for _ in range(7):  # 24 examples / 8 per step: crosses two epoch boundaries
        batch, nxt = batcher.batch_at(*position)
        again, _ = batcher.batch_at(*position)  # same position -> same batch
        for k in batch:
            np.testing.assert_array_equal(batch[k], again[k])
        assert batch["input_ids"].shape[:2] == (2, 4) and batch["input_ids"].shape[2] in (32, 64)
        seen.append((position, batch))
        position = nxt
    assert position == (2, 8)
    epoch0 = np.sort(np.concatenate([b["input_ids"][..., 0].ravel() for p, b in seen[:3]]))
    assert len(epoch0) == 24  # every example once per epoch
    assert not np.array_equal(batcher.order(0), batcher.order(1))


def test_packing_layout(encoded):
    batcher = lm_data.Batcher(encoded, batch_size=2, accum=1, buckets=(128,), pack=True, seed=0)
    batch, (epoch, index) = batcher.batch_at(0, 0)
    assert index > 2  # several examples per row
    order = batcher.order(0)[:index]
    for r in range(2):
        seg = batch["segment_ids"][0, r]
        for s in range(1, seg.max() + 1):
            cols = np.flatnonzero(seg == s)
            assert np.all(np.diff(cols) == 1)  # contiguous
            np.testing.assert_array_equal(batch["positions"][0, r, cols], np.arange(len(cols)))
            weights = batch["weights"][0, r, cols]
            assert np.all(weights == weights[0])  # one weight per example, on all its tokens
            assert weights[0] in encoded.weights[order]
    assert batch["weights"][batch["segment_ids"] == 0].sum() == 0


def test_packed_rows_do_not_attend_across_examples(encoded):
    """A packed batch gives the same per-token loss sums as the examples one per row."""
    config = models.config_from_hf(
        {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 2,
            "vocab_size": 300,
            "n_positions": 128,
        }
    )
    model = models.build(config, seed=0)
    batcher = lm_data.Batcher(encoded, batch_size=2, accum=1, buckets=(128,), pack=True, seed=0)
    packed, (_, index) = batcher.batch_at(0, 0)
    members = [int(i) for i in batcher.order(0)[:index]]
    single = lm_data.rows_to_batch(encoded, [[i] for i in members], 64)

    graphdef, state = nnx.split(model)

    @jax.jit
    def aux_of(state, b):
        m = nnx.merge(graphdef, state)
        logits = m(b["input_ids"], position_ids=b["positions"], segment_ids=b["segment_ids"])
        return L.severity_weighted_cross_entropy(logits, b["labels"], b["loss_mask"], b["weights"])[
            1
        ]

    def sums(b):
        flat = {k: jnp.asarray(v.reshape(-1, v.shape[-1])) for k, v in b.items()}
        return jax.device_get(aux_of(state, flat))

    a, b = sums(packed), sums(single)
    for k in ("nll_sum", "weighted_nll_sum", "token_count", "weight_sum"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_truncation_policy_shortens_the_prompt_before_the_response():
    bos, eos = 1, 2
    prompt, answer = [bos, *range(10, 30)], [*range(40, 50), eos]  # 21 + 11 tokens
    # room for all: unchanged
    assert lm_data.fit_to_length(prompt, answer, 32, min_prompt=8, long_responses="drop") == (
        prompt, answer, "")  # fmt: skip
    # 24 tokens: the prompt loses its start (BOS kept), the response keeps its EOS
    p, a, what = lm_data.fit_to_length(
        prompt, answer, 24, min_prompt=8, long_responses="drop", bos=bos
    )
    assert what == "prompt" and a == answer and p == [bos, *range(18, 30)] and len(p + a) == 24
    # 15 tokens: the prompt stops at min_prompt; the response is cut (no EOS) or the row dropped
    p, a, what = lm_data.fit_to_length(
        prompt, answer, 15, min_prompt=8, long_responses="truncate", bos=bos
    )
    assert what == "response" and p == [bos, *range(23, 30)] and a == answer[:7]
    assert eos not in a and len(p + a) == 15
    assert (
        lm_data.fit_to_length(prompt, answer, 15, min_prompt=8, long_responses="drop")[2] == "drop"
    )


def test_long_responses_config_reaches_the_encoder(examples, tokenizer, capsys):
    w, s = np.ones(len(examples)), np.zeros(len(examples))
    kw = dict(template=TEMPLATE, chat_template=False, max_length=24, min_prompt=8)
    cut = lm_data.encode_examples(examples, tokenizer, w, s, long_responses="truncate", **kw)
    assert len(cut) == len(examples)
    assert "data.long_responses=truncate" in capsys.readouterr().out
    dropped = lm_data.encode_examples(examples, tokenizer, w, s, long_responses="drop", **kw)
    assert len(dropped) < len(examples)
    for i in range(len(dropped)):  # every kept example ends with its EOS
        assert dropped.tokens[i][-1] == tokenizer.eos_token_id
