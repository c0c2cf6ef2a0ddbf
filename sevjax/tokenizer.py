"""Tokenizer training: the LM's byte-level BPE and the classifier's WordPiece, both deterministic.

Used when a run starts from a random init (the tiny default) and has no pretrained tokenizer:
:func:`train_bpe_tokenizer` for the causal LM, :func:`train_wordpiece` for the BERT classifier.
The same texts always give the same vocabulary, in every process, so a multi-process run can
train its tokenizer on every host and write it from one.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sevjax.arabic import tokenizer_normalizer

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path | None = None):
    """Trains a byte-level BPE tokenizer deterministically and wraps it for ``transformers``.

    Special tokens are ``<pad>`` (id 0), ``<s>`` (1) and ``</s>`` (2); ``tokenizer(text)`` prepends
    ``<s>`` (``add_special_tokens=False`` does not). The same texts in the same order always give
    the same vocabulary and merges.

    Args:
        texts: training corpus.
        vocab_size: target vocabulary size (at least 256 bytes + 3 special tokens).
        out_dir: when given, the tokenizer is saved there with ``save_pretrained``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 259:
        raise ValueError(
            f"BPE vocab_size must be >= 259 (256 bytes + 3 specials), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # tokenizer(text) starts with <s> like our prompts, so HF pipelines see the training format
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def _wordpiece_vocab(word_counts: Counter, vocab_size: int) -> list[str]:
    """BPE merges with WordPiece "##" continuation pieces, ties broken by the pair's text.

    ``tokenizers``' WordPiece trainer breaks count ties by hash order, which changes from one
    process to the next; this loop (a heap of pair counts with lazy deletion) does not.
    """
    words = sorted(word_counts)
    seqs = [[w[0], *("##" + c for c in w[1:])] for w in words]
    freq = [word_counts[w] for w in words]
    vocab = list(WORDPIECE_SPECIALS) + sorted({p for s in seqs for p in s})
    known = set(vocab)
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, s in enumerate(seqs):
        for pair in zip(s, s[1:]):
            pairs[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        n, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -n or n == 0:
            continue  # stale entry: a fresher one with the current count is in the heap
        a, b = best
        merged = a + b[2:] if b.startswith("##") else a + b
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        touched = set()
        for i in sorted(where.pop(best, ())):
            s, old = seqs[i], list(zip(seqs[i], seqs[i][1:]))
            for pair in old:
                pairs[pair] -= freq[i]
                where.get(pair, set()).discard(i)
            j, out = 0, []
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
            for pair in zip(out, out[1:]):
                pairs[pair] += freq[i]
                where.setdefault(pair, set()).add(i)
            touched |= set(old) | set(zip(out, out[1:]))
        pairs.pop(best, None)
        for pair in sorted(touched - {best}):
            heapq.heappush(heap, (-pairs[pair], pair))
    return vocab


def train_wordpiece(texts: Sequence[str], vocab_size: int) -> Any:
    """A BERT-style WordPiece tokenizer trained deterministically on ``texts``.

    Its normalizer is :func:`sevjax.arabic.tokenizer_normalizer` (:func:`sevjax.arabic.normalize`
    without repeat collapsing), so the exported tokenizer works on raw text; ``[CLS] text [SEP]`` is added on encoding. The
    vocabulary is the alphabet plus BPE merges (see :func:`_wordpiece_vocab`): the same texts
    give the same tokenizer in every process.

    Args:
        texts: training corpus (any order-independent bag of texts gives the same vocabulary).
        vocab_size: target size, specials and alphabet included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with [PAD]=0, [UNK], [CLS], [SEP], [MASK].
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    normalizer = tokenizer_normalizer()
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = _wordpiece_vocab(counts, vocab_size)
    tok = Tokenizer(tok_models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
