"""Language-model data: prompt template, tokenization, bucketing, packing and batching.

Each example becomes one token sequence ``[bos] prompt response eos``; only response tokens and
the EOS carry loss. Batches are NumPy dicts of ``[A, B, T]`` arrays (A micro-batches for gradient
accumulation, B rows, T a bucketed length), always with ``segment_ids`` and ``positions`` so that
packed and unpacked rows go through one model call:

- ``input_ids``, ``labels`` (already shifted: ``labels[t]`` is the target of ``input_ids[t]``),
  ``positions`` (restart at 0 per segment), ``segment_ids`` (0 = padding, 1..n = example in row),
  int32;
- ``loss_mask`` (1 on response tokens and EOS), ``weights`` (the example's severity weight on
  each of its tokens), float32;
- ``severity`` (class index 0..2 of the example on each of its tokens, -1 on padding), int32.

The iterator is a pure function of ``(epoch, index)``: the order of an epoch is a permutation
drawn from ``(seed, epoch)``, and ``index`` counts the examples of that permutation already used,
so saving the two integers in a checkpoint resumes the data stream exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

BATCH_KEYS = ("input_ids", "labels", "positions", "segment_ids", "loss_mask", "weights", "severity")


def format_example(
    tokenizer: Any, complaint: str, response: str, *, template: str, chat_template: bool
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the response (response ends with EOS).

    With ``chat_template`` and a tokenizer that has one, the prompt is the user turn plus the
    generation prompt and the response is the rest of the rendered conversation. Otherwise the
    prompt is ``template.format(complaint=...)`` preceded by BOS when the tokenizer has one.

    Returns:
        ``(prompt_ids, response_ids)``.
    """
    eos = tokenizer.eos_token_id
    if chat_template and getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": complaint}]
        prompt_text = tokenizer.apply_chat_template(
            user, add_generation_prompt=True, tokenize=False
        )
        full_text = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the tokenizer's chat template does not extend the prompt; "
                "set data.chat_template=false"
            )
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
        answer = tokenizer.encode(full_text[len(prompt_text) :], add_special_tokens=False)
    else:
        prompt = tokenizer.encode(template.format(complaint=complaint), add_special_tokens=False)
        if tokenizer.bos_token_id is not None:
            prompt = [tokenizer.bos_token_id] + prompt
        answer = tokenizer.encode(response, add_special_tokens=False)
    if eos is not None and (not answer or answer[-1] != eos):
        answer = answer + [eos]
    return prompt, answer


@dataclasses.dataclass
class Encoded:
    """Tokenized examples: ``tokens[i]`` int32 ``[L_i + 1]``, loss from position ``starts[i]``."""

    tokens: list[np.ndarray]
    starts: np.ndarray  # [N] int: index of the first response token in tokens[i]
    weights: np.ndarray  # [N] float32 severity weights
    severity: np.ndarray  # [N] int32 class index

    def __len__(self) -> int:
        return len(self.tokens)

    def length(self, i: int) -> int:
        """Model input length of example ``i`` (its tokens minus the last)."""
        return len(self.tokens[i]) - 1


def fit_to_length(
    prompt: list[int],
    answer: list[int],
    room: int,
    *,
    min_prompt: int,
    long_responses: str,
    bos: int | None = None,
) -> tuple[list[int], list[int], str]:
    """The truncation policy: make ``prompt + answer`` hold at most ``room`` tokens.

    1. If it is too long, the prompt is shortened first, keeping its *last* tokens (the end of the
       complaint and the answer cue; a leading ``bos`` stays), but never below ``min_prompt``,
       so the response keeps its EOS whenever it can.
    2. If the response alone still does not fit, ``long_responses="truncate"`` keeps its head
       (it then has no EOS: the model learns that the answer goes on) and ``"drop"`` drops the
       example.

    Returns:
        ``(prompt, answer, what)`` with ``what`` in ``"", "prompt", "response", "drop"``.
    """
    if len(prompt) + len(answer) <= room:
        return prompt, answer, ""
    keep = max(min(min_prompt, len(prompt)), room - len(answer))
    if keep < len(prompt):
        head = prompt[:1] if bos is not None and prompt[0] == bos and keep > 1 else []
        prompt = head + prompt[len(prompt) - (keep - len(head)) :]
        if len(prompt) + len(answer) <= room:
            return prompt, answer, "prompt"
    if long_responses == "drop" or room - len(prompt) < 1:
        return prompt, answer, "drop"
    return prompt, answer[: room - len(prompt)], "response"


def encode_examples(
    examples: Sequence[dict[str, Any]],
    tokenizer: Any,
    weights: np.ndarray,
    severity: np.ndarray,
    *,
    template: str,
    chat_template: bool,
    max_length: int,
    min_prompt: int = 32,
    long_responses: str = "truncate",
    name: str = "train",
) -> Encoded:
    """Tokenizes examples, fitting each to ``max_length`` model inputs with :func:`fit_to_length`
    (the counts of shortened prompts, truncated responses and dropped examples are printed).

    Args:
        examples: dicts with ``complaint`` and ``response``.
        tokenizer: a ``transformers`` tokenizer.
        weights: ``[N]`` float32 severity weight per example.
        severity: ``[N]`` int class index per example.
        template, chat_template: see :func:`format_example`.
        max_length: T_max, the longest model input (the sequence holds ``T_max + 1`` tokens).
        min_prompt, long_responses: see :func:`fit_to_length`.
        name: split name for the printed summary.
    """
    tokens, starts, keep = [], [], []
    counts = {"prompt": 0, "response": 0, "drop": 0}
    for i, ex in enumerate(examples):
        prompt, answer = format_example(
            tokenizer,
            ex["complaint"],
            ex["response"],
            template=template,
            chat_template=chat_template,
        )
        prompt, answer, what = fit_to_length(
            prompt, answer, max_length + 1, min_prompt=min_prompt,
            long_responses=long_responses, bos=tokenizer.bos_token_id,
        )  # fmt: skip
        if what:
            counts[what] += 1
        if what == "drop":
            continue
        tokens.append(np.asarray(prompt + answer, np.int32))
        starts.append(len(prompt))
        keep.append(i)
    if any(counts.values()):
        print(
            f"[data] {name}: {len(examples)} examples, {max_length} tokens at most: shortened "
            f"{counts['prompt']} prompts (kept their end), truncated {counts['response']} "
            f"responses (no EOS), dropped {counts['drop']} (data.long_responses={long_responses})"
        )
    if not tokens:
        raise ValueError(
            f"{name}: no example keeps a response token within the largest of data.buckets "
            f"({max_length} tokens); raise data.buckets"
        )
    keep = np.asarray(keep, np.int64)
    return Encoded(
        tokens,
        np.asarray(starts, np.int64),
        np.asarray(weights, np.float32)[keep],
        np.asarray(severity, np.int32)[keep],
    )


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= n``."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def _empty(rows: int, t: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((rows, t), np.int32) for k in BATCH_KEYS}
    out["loss_mask"] = np.zeros((rows, t), np.float32)
    out["weights"] = np.zeros((rows, t), np.float32)
    out["severity"] = np.full((rows, t), -1, np.int32)
    return out


def _place(out: dict[str, np.ndarray], row: int, col: int, seg: int, data: Encoded, i: int):
    """Writes example ``i`` into ``out[row, col:col+L]`` as segment ``seg``."""
    seq = data.tokens[i]
    n = len(seq) - 1
    sl = slice(col, col + n)
    out["input_ids"][row, sl] = seq[:-1]
    out["labels"][row, sl] = seq[1:]
    out["positions"][row, sl] = np.arange(n)
    out["segment_ids"][row, sl] = seg
    # labels[t] = seq[t + 1] is a response token (or EOS) when t + 1 >= start
    out["loss_mask"][row, sl] = (np.arange(1, n + 1) >= data.starts[i]).astype(np.float32)
    out["weights"][row, sl] = data.weights[i]
    out["severity"][row, sl] = data.severity[i]


def rows_to_batch(data: Encoded, rows: Sequence[Sequence[int]], t: int) -> dict[str, np.ndarray]:
    """Builds ``[len(rows), t]`` arrays; each row holds the listed examples one after another."""
    out = _empty(len(rows), t)
    for r, members in enumerate(rows):
        col = 0
        for seg, i in enumerate(members, start=1):
            _place(out, r, col, seg, data, i)
            col += data.length(i)
    return out


class Batcher:
    """Deterministic, resumable batches over :class:`Encoded` examples.

    Args:
        data: the encoded training set.
        batch_size: rows per micro-batch (B).
        accum: micro-batches per step (A).
        buckets: allowed padded lengths T; each step uses the smallest bucket that fits.
        pack: put several examples per row (rows of the largest bucket).
        seed: shuffling seed; epoch ``e`` uses ``default_rng([seed, e]).permutation``.
    """

    def __init__(
        self,
        data: Encoded,
        *,
        batch_size: int,
        accum: int,
        buckets: Sequence[int],
        pack: bool,
        seed: int,
    ):
        self.data, self.batch_size, self.accum = data, batch_size, accum
        self.buckets, self.pack, self.seed = tuple(sorted(buckets)), pack, seed
        self.rows = batch_size * accum
        longest = max(data.length(i) for i in range(len(data)))
        if longest > self.buckets[-1]:
            raise ValueError(f"an example has {longest} tokens, above the largest bucket")
        if not pack and len(data) < self.rows:
            raise ValueError(
                f"the training set has {len(data)} examples, fewer than one step's "
                f"batch_size x grad_accum = {self.rows}"
            )

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def batch_at(
        self, epoch: int, index: int, rows: slice = slice(None)
    ) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        """The step that starts at ``(epoch, index)`` and the position after it.

        Args:
            epoch, index: the position.
            rows: the rows of each micro-batch to build (a process builds only its own); the
                padded length T is still the step's global one.

        Returns:
            ``(batch, (epoch, index))`` with batch arrays shaped ``[A, len(rows), T]``.
        """
        order = self.order(epoch)
        if self.pack:
            members, index = self._pack(order, index)
        else:
            if index + self.rows > len(order):  # drop the epoch's incomplete tail
                epoch, index = epoch + 1, 0
                order = self.order(epoch)
            members = [[int(i)] for i in order[index : index + self.rows]]
            index += self.rows
        longest = max(sum(self.data.length(i) for i in r) for r in members if r)
        t = bucket_length(longest, self.buckets)
        local = range(self.batch_size)[rows]
        picked = [members[a * self.batch_size + b] for a in range(self.accum) for b in local]
        flat = rows_to_batch(self.data, picked, t)
        batch = {k: v.reshape(self.accum, len(local), t) for k, v in flat.items()}
        if index >= len(order):
            epoch, index = epoch + 1, 0
        return batch, (epoch, index)

    def _pack(self, order: np.ndarray, index: int) -> tuple[list[list[int]], int]:
        """Greedy packing in epoch order into ``rows`` rows of the largest bucket."""
        cap = self.buckets[-1]
        rows: list[list[int]] = [[]]
        used = 0
        while index < len(order):
            i = int(order[index])
            n = self.data.length(i)
            if used + n > cap:
                if len(rows) == self.rows:
                    break
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
            index += 1
        rows += [[] for _ in range(self.rows - len(rows))]
        return rows, index


def eval_batches(
    data: Encoded, batch_size: int, buckets: Sequence[int]
) -> Iterator[dict[str, np.ndarray]]:
    """All examples in order, one per row, ``[B, T]`` batches; the last is padded with empty rows."""
    for start in range(0, len(data), batch_size):
        ids = list(range(start, min(start + batch_size, len(data))))
        rows = [[i] for i in ids] + [[] for _ in range(batch_size - len(ids))]
        t = bucket_length(max(data.length(i) for i in ids), buckets)
        yield rows_to_batch(data, rows, t)
