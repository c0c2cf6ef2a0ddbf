"""Every configuration schema of sevjax, in one place: frozen dataclasses over :mod:`sevjax.config`.

- :class:`TrainConfig`: LM fine-tuning (``python train.py``); its defaults are the tiny CPU run.
- :class:`ClassifyConfig`: the severity classifier (``python classify.py train|evaluate|annotate``).
- :class:`EvalConfig`, :class:`CompareConfig`: generation-based evaluation and the paper's table
  (``python train.py evaluate|compare``).

Sections shared by several schemas (optimizer, mesh, checkpoint, log) are defined once. A trailing
``# comment`` on a field is its help text (``python train.py --print-config`` shows it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from sevjax.config import Section, choice, positive

# ---------------------------------------------------------------------------------------------
# Fine-tuning the LM. Its defaults are the tiny CPU run (configs/tiny.yaml restates them).
# ---------------------------------------------------------------------------------------------

WEIGHTING_PRESETS = ("uniform", "linear", "balanced")


# LoRA target names (sevjax.lora): Llama-family projections, then GPT-2's
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "c_attn", "c_proj", "c_fc")
LORA_TARGET_CHOICES = LORA_TARGETS + ("attn.c_proj", "mlp.c_proj")


@dataclasses.dataclass(frozen=True)
class LoRASection(Section):
    """LoRA adapters on the decoder projections; with ``rank`` > 0 only the adapters are trained,
    the checkpoints hold them alone and the run exports a PEFT adapter plus the merged model."""

    rank: int = 0  # r; 0 = off (full fine-tuning)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # dropout on the adapters' input while training
    targets: tuple[str, ...] = LORA_TARGETS  # projections; names another family lacks are ignored
    base_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # storage of the frozen base weights
    adapter: str | None = None  # a PEFT adapter dir to start from (same rank/alpha/targets)

    def validate(self) -> None:
        positive("model.lora.rank", self.rank, allow_zero=True)
        positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(
                f"model.lora.targets must not be empty; choose from {LORA_TARGET_CHOICES}"
            )
        for t in self.targets:
            choice("model.lora.targets", t, LORA_TARGET_CHOICES)
        if self.adapter is not None and self.rank == 0:
            raise ValueError("model.lora.adapter needs model.lora.rank > 0 (the adapter's r)")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    """The LM: a pretrained checkpoint, or a random-init model of the given sizes."""

    name_or_path: str | None = None  # HF Hub id or local dir; None = random init below
    tokenizer: str | None = None  # default: name_or_path, or a BPE trained on the data
    model_type: Literal["gpt2", "llama", "qwen2"] = "gpt2"  # random init only
    layers: int = 2
    width: int = 128
    heads: int = 4
    kv_heads: int | None = None  # llama/qwen2 only; None = heads
    vocab_size: int = 1024  # random init: also the BPE tokenizer's size
    max_positions: int = 512
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute; params stay float32
    scan_layers: bool | None = None  # one scanned stack of layers; None = on for a checkpoint
    remat: Literal["none", "full", "dots"] = (
        "none"  # recompute per layer: nothing, all, non-matmuls
    )
    attention: Literal["auto", "xla", "cudnn", "splash", "reference"] = "auto"  # kernel
    grad_barrier: bool = True  # XLA:CPU only: a gradient barrier between unrolled layers (faster)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)

    def validate(self) -> None:
        for name in ("layers", "width", "heads", "vocab_size", "max_positions"):
            positive(f"model.{name}", getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be a multiple of heads={self.heads}")
        if self.lora.adapter is not None and self.name_or_path is None:
            raise ValueError("model.lora.adapter needs model.name_or_path (the adapter's base)")


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    """Where the (annotated) examples come from and how they become token batches."""

    path: str | None = None  # csv/json/jsonl/parquet or Hub id; None = the embedded set
    columns: dict[str, str] | None = None  # our field -> the file's column
    template: str = "الشكوى: {complaint}\nالرد: "  # prompt when there is no chat template
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    buckets: tuple[int, ...] = (64, 128, 256)  # padded lengths; the largest is the max length
    min_prompt_tokens: int = 32  # a too-long example shortens its prompt first, down to this
    long_responses: Literal["truncate", "drop"] = "truncate"  # a response longer than the room
    pack: bool = False  # several examples per row (segment ids, per-token weights)
    batch_size: int = 16  # rows per micro-batch, across all devices
    max_train_examples: int | None = None  # a deterministic subset, for quick runs
    max_eval_examples: int | None = None

    def validate(self) -> None:
        if not self.buckets or min(self.buckets) < 2:
            raise ValueError(f"data.buckets must be lengths >= 2, got {self.buckets}")
        positive("data.batch_size", self.batch_size)
        positive("data.min_prompt_tokens", self.min_prompt_tokens)
        if "{complaint}" not in self.template:
            raise ValueError(f"data.template must contain {{complaint}}, got {self.template!r}")


@dataclasses.dataclass(frozen=True)
class LossSection(Section):
    """``ce`` (plain token mean) or ``severity`` (per-example weights from severity probs)."""

    mode: Literal["ce", "severity"] = "severity"
    weighting: str | tuple[float, ...] = "linear"  # uniform | linear | balanced | [w1, w2, w3]
    normalize: Literal["tokens", "weighted", "sequence"] = "tokens"
    z_loss: float = 0.0
    chunked_vocab_threshold: int = 65536  # vocab sizes above this use the chunked loss
    chunk_size: int = 2048  # tokens per chunk of the chunked loss

    def validate(self) -> None:
        if isinstance(self.weighting, str):
            choice("loss.weighting", self.weighting, WEIGHTING_PRESETS + ("<list of 3 numbers>",))
        elif len(self.weighting) != 3 or min(self.weighting) <= 0:
            raise ValueError(f"loss.weighting: expected 3 positive numbers, got {self.weighting}")
        positive("loss.z_loss", self.z_loss, allow_zero=True)
        positive("loss.chunk_size", self.chunk_size)


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
    """AdamW with warmup and decay; gradient accumulation over ``grad_accum`` micro-batches."""

    lr: float = 2e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.01  # not applied to norms, biases and embeddings
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = off
    grad_accum: int = 1

    def validate(self) -> None:
        positive("optim.lr", self.lr)
        positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        positive("optim.grad_accum", self.grad_accum)
        positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    """Device mesh sizes; one may be -1 (the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be >= 1 with at most one -1, got {sizes}")


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
    """Orbax checkpoints under ``<run_dir>/checkpoints``."""

    every: int = 100  # steps; the last step is always saved
    keep: int = 2
    async_save: bool = True
    resume: bool = True  # resume from the latest checkpoint in run_dir
    best: bool = False  # also keep the best checkpoint by validation loss, and export it

    def validate(self) -> None:
        positive("checkpoint.every", self.every)
        positive("checkpoint.keep", self.keep)


@dataclasses.dataclass(frozen=True)
class LogSection(Section):
    """JSONL + TensorBoard every ``every`` steps, a progress bar and a loss-curve PNG."""

    every: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def validate(self) -> None:
        positive("log.every", self.every)


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    """Validation loss / perplexity, overall and per severity."""

    every: int = 50  # steps; also before the first step and after the last
    batch_size: int = 32
    patience: int = 0  # stop after this many evaluations without a better loss; 0 = never

    def validate(self) -> None:
        positive("eval.every", self.every)
        positive("eval.batch_size", self.batch_size)
        positive("eval.patience", self.patience, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """Severity-aware LM fine-tuning (``python train.py``; defaults = the tiny CPU run)."""

    run_dir: str = "runs/tiny"
    seed: int = 0
    steps: int = 200
    export_hf: bool = True  # write <run_dir>/hf at the end
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def validate(self) -> None:
        positive("steps", self.steps)
        if self.data.pack and self.loss.normalize == "sequence":
            raise ValueError(
                "loss.normalize='sequence' needs one example per row; "
                "set data.pack=false or another loss.normalize"
            )
        if self.model.name_or_path is None and max(self.data.buckets) > self.model.max_positions:
            raise ValueError(
                f"max(data.buckets)={max(self.data.buckets)} exceeds "
                f"model.max_positions={self.model.max_positions}"
            )


# ---------------------------------------------------------------------------------------------
# The severity classifier
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassifierModelSection(Section):
    """An HF BERT checkpoint (encoder kept, head new), or a tiny random BERT of these sizes."""

    name_or_path: str | None = None  # e.g. aubmindlab/bert-base-arabertv02; None = tiny
    layers: int = 2
    width: int = 64
    heads: int = 4
    mlp: int = 256
    vocab_size: int = 3000  # the WordPiece tokenizer trained on the corpus
    max_length: int = 128  # tokens, [CLS] and [SEP] included
    dropout: float = 0.1
    scan_layers: bool | None = None  # one scanned stack of layers; None = on for a checkpoint
    remat: Literal["none", "full", "dots"] = (
        "none"  # recompute per layer: nothing, all, non-matmuls
    )
    attention: Literal["auto", "xla", "cudnn", "splash", "reference"] = "auto"  # kernel

    def validate(self) -> None:
        for name in ("layers", "width", "heads", "mlp", "vocab_size", "max_length"):
            positive(f"model.{name}", getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be a multiple of heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class ClassifierDataSection(Section):
    """The examples; training labels from the rule labeler (the paper's setting) or gold."""

    path: str | None = None  # csv/json/jsonl/parquet or Hub id; None = the embedded set
    columns: dict[str, str] | None = None  # our field -> the file's column
    drop_bad: bool = False
    labels: Literal["rule", "gold"] = "rule"
    text: Literal["complaint", "complaint+response"] = "complaint"


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(Section):
    """Severity classifier (``python classify.py train|evaluate|annotate``; defaults: tiny CPU)."""

    run_dir: str = "runs/classify"
    seed: int = 0
    epochs: int = 25
    patience: int = 8  # epochs without a better validation macro-F1 before stopping
    batch_size: int = 32
    class_weighted: bool = False  # "balanced" class weights in the cross-entropy
    ece_bins: int = 15
    folds: int = 5  # annotate the training data out of fold with K fold models; 0 = full model
    output: str | None = None  # annotate: .jsonl or .parquet; default <run_dir>/annotated.jsonl
    overwrite: bool = False  # annotate: replace an existing output (also --overwrite)
    progress: bool = True  # show a progress bar while training
    model: ClassifierModelSection = dataclasses.field(default_factory=ClassifierModelSection)
    data: ClassifierDataSection = dataclasses.field(default_factory=ClassifierDataSection)
    optim: OptimSection = dataclasses.field(
        default_factory=lambda: OptimSection(lr=2e-3, warmup_steps=30, b2=0.999, min_lr_ratio=0.0)
    )
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(
        default_factory=lambda: CheckpointSection(keep=1)
    )  # saved every epoch; the best epoch is kept too

    def validate(self) -> None:
        for name in ("epochs", "patience", "batch_size", "ece_bins"):
            positive(name, getattr(self, name))
        positive("folds", self.folds, allow_zero=True)
        if self.folds == 1:
            raise ValueError("config key 'folds': 1 fold leaves nothing out; use 0 or >= 2")
        if self.output is not None:
            choice("output extension", Path(self.output).suffix.lower(), (".jsonl", ".parquet"))
        if self.optim.grad_accum != 1:
            raise ValueError("optim.grad_accum must be 1 for the classifier")


# ---------------------------------------------------------------------------------------------
# Generation-based evaluation and the comparison table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationSection(Section):
    """Decoding settings (greedy by default)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 16
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256)  # left-padded prompt lengths
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0

    def validate(self) -> None:
        positive("generation.max_new_tokens", self.max_new_tokens)
        positive("generation.temperature", self.temperature, allow_zero=True)
        positive("generation.batch_size", self.batch_size)
        if not self.prompt_buckets or min(self.prompt_buckets) < 1:
            raise ValueError(f"generation.prompt_buckets: lengths >= 1, got {self.prompt_buckets}")


@dataclasses.dataclass(frozen=True)
class ScorerSection(Section):
    """BERTScore model; ``layer`` is required with ``model_path`` (bert-score: mBERT cased, 9)."""

    model_path: str | None = None  # local HF BERT dir; None = the tiny classifier (pipeline check)
    layer: int | None = None  # hidden_states index; None only without model_path (= top - 1)
    idf: bool = False
    baseline_path: str | None = None  # bert-score rescale file (LAYER,P,R,F)
    batch_size: int = 32

    def validate(self) -> None:
        if self.model_path is not None and self.layer is None:
            raise ValueError(
                "scorer.layer is required with scorer.model_path (bert-score's default for "
                "Arabic is bert-base-multilingual-cased with layer 9)"
            )
        if self.layer is not None:
            positive("scorer.layer", self.layer, allow_zero=True)
        positive("scorer.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class BootstrapSection(Section):
    """Paired percentile bootstrap of severity - CE."""

    n_resamples: int = 1000
    seed: int = 0
    alpha: float = 0.05

    def validate(self) -> None:
        positive("bootstrap.n_resamples", self.n_resamples)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"bootstrap.alpha must be in (0, 1), got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Generate and score one model (``python train.py evaluate --run DIR``)."""

    run: str | None = None  # a train run dir, an HF causal-LM dir or a Hub id
    out_dir: str | None = None  # default <run>/eval (train run) or runs/eval/<model name>
    split: Literal["train", "validation", "test"] = "test"
    max_examples: int | None = None
    data: DataSection = dataclasses.field(default_factory=DataSection)  # when run is no train run
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    scorer: ScorerSection = dataclasses.field(default_factory=ScorerSection)


@dataclasses.dataclass(frozen=True)
class CompareModel(Section):
    """One compared LM, trained from its train config (random init when it names no model)."""

    name: str = "tiny-gpt2"
    name_or_path: str | None = None  # None = model.name_or_path of the train config
    train_config: str | None = None  # this model's TrainConfig YAML; None = the shared one
    overrides: tuple[str, ...] = ()  # extra train --set lines for this model (e.g. optim.lr=5e-5)


@dataclasses.dataclass(frozen=True)
class CompareRow(Section):
    """One fine-tuned row of the table: a name and the train --set lines that make it."""

    name: str = "ce"
    label: str | None = None  # shown in the table; default: the name
    overrides: tuple[str, ...] = ()  # e.g. ["loss.mode=severity", "loss.weighting=balanced"]


DEFAULT_ROWS = (
    CompareRow("ce", "CE", ("loss.mode=ce",)),
    CompareRow("severity", "severity-weighted", ("loss.mode=severity",)),
)


@dataclasses.dataclass(frozen=True)
class CompareConfig(Section):
    """No fine-tuning vs CE vs severity-weighted, per model (``... compare --config X``)."""

    out_dir: str = "runs/compare-tiny"
    train_config: str | None = None  # TrainConfig YAML overlay shared by every run
    train_overrides: tuple[str, ...] = ()  # train --set lines shared by every run
    seeds: tuple[int, ...] = (0,)  # every row is trained once per seed; CIs are over seeds
    steps: int = 300
    models: tuple[CompareModel, ...] = (CompareModel(),)
    rows: tuple[CompareRow, ...] = DEFAULT_ROWS  # fine-tuned rows; "none" is always added
    baseline: str = "ce"  # the row every other fine-tuned row is compared with
    split: Literal["validation", "test"] = "test"
    max_examples: int | None = None
    generation: GenerationSection = dataclasses.field(default_factory=GenerationSection)
    scorer: ScorerSection = dataclasses.field(default_factory=ScorerSection)
    bootstrap: BootstrapSection = dataclasses.field(default_factory=BootstrapSection)

    def validate(self) -> None:
        positive("steps", self.steps)
        names = [m.name for m in self.models]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"models must be a non-empty list with distinct names, got {names}")
        rows = [r.name for r in self.rows]
        if len(set(rows)) != len(rows) or "none" in rows:
            raise ValueError(f"rows must have distinct names other than 'none', got {rows}")
        if self.baseline not in rows:
            raise ValueError(f"baseline {self.baseline!r} is not one of the rows {rows}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {self.seeds}")
