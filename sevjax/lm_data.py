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
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sevjax import loss as sevloss
from sevjax.schema import TrainConfig
from sevjax.tokenizer import train_bpe_tokenizer

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

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        position = (0, 0)
        while True:
            batch, position = self.batch_at(*position)
            yield batch


def eval_batches(
    data: Encoded, batch_size: int, buckets: Sequence[int]
) -> Iterator[dict[str, np.ndarray]]:
    """All examples in order, one per row, ``[B, T]`` batches; the last is padded with empty rows."""
    for start in range(0, len(data), batch_size):
        ids = list(range(start, min(start + batch_size, len(data))))
        rows = [[i] for i in ids] + [[] for _ in range(batch_size - len(ids))]
        t = bucket_length(max(data.length(i) for i in ids), buckets)
        yield rows_to_batch(data, rows, t)


# ----------------------------------------------------------------------------------------------
# The training run's data: annotated examples, tokenizer, severity weights
# ----------------------------------------------------------------------------------------------


def _probs_of(examples: list[dict[str, Any]]) -> np.ndarray | None:
    keys = [f"p_{s}" for s in sevloss.SEVERITIES]
    if not has_probabilities(examples):
        return None
    return sevloss.validate_severity_probs(np.array([[ex[k] for k in keys] for ex in examples]))


def _severity_of(examples: list[dict[str, Any]], probs: np.ndarray | None) -> np.ndarray:
    """Class index per example: gold ``severity`` when every example has one, else argmax(p)."""
    if all(ex.get("severity") in sevloss.SEVERITIES for ex in examples):
        return np.array([sevloss.SEVERITIES.index(ex["severity"]) for ex in examples], np.int32)
    if probs is not None:
        return probs.argmax(axis=1).astype(np.int32)
    return np.full(len(examples), -1, np.int32)


def has_probabilities(examples: list[dict[str, Any]]) -> bool:
    """Whether every example carries p_mild, p_moderate and p_critical."""
    keys = [f"p_{s}" for s in sevloss.SEVERITIES]
    return bool(examples) and all(ex.get(k) is not None for ex in examples for k in keys)


def training_splits(cfg: TrainConfig, examples: list[dict[str, Any]]) -> dict[str, list]:
    """Train / validation examples (``data.max_*_examples`` applied).

    Raises:
        ValueError: the severity-weighted loss is asked for but the examples have no severity
            probabilities (the message says how to annotate them), or a split is empty.
    """
    from sevjax import data as data_lib

    if cfg.loss.mode == "severity" and not has_probabilities(examples):
        source = cfg.data.path or "the embedded data set"
        raise ValueError(
            f"{source} has no severity probabilities (p_mild, p_moderate, p_critical). "
            "Annotate it with the severity classifier first:\n"
            "  python classify.py train\n"
            f"  python classify.py annotate --set data.path={cfg.data.path} "
            "--set output=annotated.jsonl\n"
            "then train with --set data.path=annotated.jsonl (or use --set loss.mode=ce)"
        )
    splits = data_lib.split_examples(examples)
    out = {"train": splits["train"], "validation": splits["validation"]}
    for name, limit in (
        ("train", cfg.data.max_train_examples),
        ("validation", cfg.data.max_eval_examples),
    ):
        if not out[name]:
            raise ValueError(f"{cfg.data.path or 'the data'} has no {name!r} split (field 'split')")
        out[name] = out[name][:limit] if limit is not None else out[name]
    return out


def load_tokenizer(cfg: TrainConfig, run_dir: Path, train_examples: list[dict[str, Any]]) -> Any:
    """The pretrained tokenizer, ``<run_dir>/tokenizer`` (a resumed run), or (random init) a new
    BPE trained on the training texts, not yet saved (:func:`prepare` saves it).

    Raises:
        FileNotFoundError: the configured tokenizer is a path that does not exist.
        ValueError: the configured tokenizer cannot be loaded (the message names the key and
            path) or has no eos token.
    """
    if cfg.model.tokenizer is not None or cfg.model.name_or_path is not None:
        from transformers import AutoTokenizer

        key = "model.tokenizer" if cfg.model.tokenizer is not None else "model.name_or_path"
        source = cfg.model.tokenizer or cfg.model.name_or_path
        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
            raise FileNotFoundError(f"{key}={source}: no such directory")
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as e:  # transformers raises many types (KeyError for a bad JSON file)
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            raise ValueError(
                f"{key}={source}: could not load a tokenizer from it ({type(e).__name__}: "
                f"{reason}); expected an HF model or tokenizer directory, or a Hub id"
            ) from e
        if tok.eos_token_id is None:
            raise ValueError(f"{key}={source}: the tokenizer has no eos token; the loss needs one")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    texts = [cfg.data.template.format(complaint=ex["complaint"]) for ex in train_examples]
    texts += [ex["response"] for ex in train_examples]
    # deterministic, so every process trains the same one; only process 0 writes it (prepare)
    tok = train_bpe_tokenizer(texts, cfg.model.vocab_size)
    print(f"[data] trained a {len(tok)}-token byte-level BPE tokenizer -> {tok_dir}")
    return tok


def check_batch_sizes(cfg: TrainConfig, rows: int) -> None:
    """Raises ``ValueError`` unless the train and eval batch sizes divide over ``rows`` devices
    (``data x fsdp`` of the mesh): checked before anything is tokenized or written."""
    sizes = {"data.batch_size": cfg.data.batch_size, "eval.batch_size": cfg.eval.batch_size}
    for key, size in sizes.items():
        if size % rows:
            raise ValueError(f"{key}={size} must divide over data x fsdp = {rows} devices")


def example_weights(cfg: TrainConfig, train: list, probs: np.ndarray | None) -> np.ndarray:
    """Per-example severity weights (all ones for ``loss.mode=ce``)."""
    if cfg.loss.mode == "ce":
        return np.ones(len(train), np.float32)
    freq = probs.sum(axis=0) if cfg.loss.weighting == "balanced" else None
    cw = sevloss.class_weights(cfg.loss.weighting, class_frequencies=freq)
    print(
        f"[loss] severity class weights {dict(zip(sevloss.SEVERITIES, np.round(cw, 3).tolist()))}"
    )
    return np.asarray(sevloss.severity_weights(probs, cw), np.float32)


def encode(cfg: TrainConfig, splits: dict, tokenizer: Any) -> dict[str, Encoded]:
    """Tokenized train and validation sets."""
    out = {}
    for name, examples in splits.items():
        probs = _probs_of(examples)
        weights = example_weights(cfg, examples, probs) if name == "train" else None
        out[name] = encode_examples(
            examples,
            tokenizer,
            weights if weights is not None else np.ones(len(examples), np.float32),
            _severity_of(examples, probs),
            template=cfg.data.template,
            chat_template=cfg.data.chat_template,
            max_length=max(cfg.data.buckets),
            min_prompt=cfg.data.min_prompt_tokens,
            long_responses=cfg.data.long_responses,
            name=name,
        )
    return out


def prepare(
    cfg: TrainConfig, run_dir: Path, examples: list[dict[str, Any]]
) -> tuple[Any, dict[str, Encoded]]:
    """The tokenize stage: ``(tokenizer, {"train": Encoded, "validation": Encoded})``.

    Writes ``<run_dir>/tokenizer`` when it trains a tokenizer (random-init models only), after
    the train and validation sets encoded.
    """
    splits = training_splits(cfg, examples)
    tok_dir = Path(run_dir) / "tokenizer"
    trains = cfg.model.tokenizer is None and cfg.model.name_or_path is None
    trains = trains and not (tok_dir / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(cfg, run_dir, splits["train"])
    data = encode(cfg, splits, tokenizer)
    if trains and jax.process_index() == 0:  # written once the data is known to encode
        tokenizer.save_pretrained(str(tok_dir))
    return tokenizer, data
