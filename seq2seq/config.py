"""Run configuration: frozen dataclasses loaded from YAML plus dotted ``key=value`` overrides.

A run is described by one :class:`RunConfig` with six sections (``model``, ``data``, ``prepare``,
``batch``, ``train``, ``decode``). Defaults live here and nowhere else. ``model.preset`` names one of :data:`PRESETS`;
its values are applied first, and any key given explicitly wins over the preset.

    cfg = load_config("recipes/configs/multi30k.yaml", ["train.max_steps=2000", "model.dropout=0.2"])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seq2seq.yamlconfig import ConfigError, apply_override, build, check_choice, to_plain
from seq2seq.yamlconfig import replace as replace  # edited configs are built through seq2seq.config

FORMAT_VERSION = 2  # 2: batching and preparation settings left the data section (see migrate)

# format_version 1 -> 2: data.<key> became <section>.<name>
_MOVED_FROM_DATA = {
    "max_tokens": ("batch", "max_tokens"),
    "block_size": ("batch", "block_size"),
    "batch_size": ("batch", "batch_size"),
    "eval_batches": ("batch", "eval_batches"),
    "prepared_dir": ("prepare", "out_dir"),
    "num_workers": ("prepare", "num_workers"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Network shape. Defaults are the paper's base model (Vaswani et al. 2017, Table 3)."""

    preset: str = ""
    arch: str = "transformer"  # "transformer" (encoder-decoder), "gpt" (decoder-only) or "bigram"
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # inside the FFN; the paper has none (tensor2tensor adds it)
    # "relu" (paper), "gelu" (exact erf form), "gelu_tanh" (the tanh approximation of GPT-2's
    # "gelu_new") or "silu" (x * sigmoid(x), Marian's "swish")
    activation: str = "relu"
    norm_first: bool = False  # False: post-norm LayerNorm(x + Sublayer(x)), as in the paper
    positions: str = "sinusoidal"  # "sinusoidal" (paper, section 3.5) or "learned"
    max_positions: int = 1024
    share_embeddings: bool = True  # one embedding for source, target and output (section 3.4)
    tie_output: bool = True  # output projection = target embedding transposed
    layer_norm_eps: float = 1e-5
    # Token embeddings multiplied by sqrt(d_model) (section 3.4); false leaves them unscaled, as
    # GPT-2 and Marian with scale_embedding=false do.
    scale_embedding: bool = True
    # A fixed (not trained) vector added to the output logits: Marian's final_logits_bias, and
    # -1e4 on vocabulary rows an imported model lacks, so they never take probability mass.
    output_bias: bool = False
    # Additive biases in every linear layer and LayerNorm; false drops them all, as nanoGPT's
    # default and PaLM do (the output projection never has one).
    bias: bool = True
    # "xavier": Xavier-uniform linear layers, token embeddings N(0, 1/d_model) (the Transformer's
    # usual choice); "gpt2": every weight and embedding N(0, 0.02), the projections back into the
    # residual stream N(0, 0.02 / sqrt(residual sums of the stack)) (GPT-2, section 2.3; nanoGPT).
    init: str = "xavier"

    def validate(self) -> None:
        check_choice("model.arch", self.arch, ("transformer", "gpt", "bigram"))
        check_choice("model.init", self.init, ("xavier", "gpt2"))
        check_choice("model.activation", self.activation, ("relu", "gelu", "gelu_tanh", "silu"))
        check_choice("model.positions", self.positions, ("sinusoidal", "learned"))
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        for name in ("d_model", "n_heads", "d_ff", "n_decoder_layers", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.arch == "transformer" and self.n_encoder_layers <= 0:
            raise ConfigError("model.n_encoder_layers must be positive for arch=transformer")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must lie in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class DataConfig:
    """What the prepared data is: the corpus, its tokenizer and its length filter.

    ``prepare`` fingerprints this whole section: change any field and the data is prepared again
    (settings that leave the prepared files unchanged belong in :class:`PrepareConfig` or
    :class:`BatchConfig`).

    ``format`` decides how ``path`` is read:
      - ``text``: a folder with ``{split}.{lang}`` files (optionally ``.gz``), one sentence a line;
      - ``tsv``: a folder with ``{split}.tsv`` (source, tab, target);
      - ``jsonl``: a folder with ``{split}.jsonl``; ``src_field``/``tgt_field`` pick the fields;
      - ``hf``: a Hugging Face ``datasets`` name (or local dataset folder) with ``hf_config``;
        fields may be dotted, e.g. ``translation.de``;
      - ``lm``: one plain-text file for decoder-only language modelling; the last
        ``valid_fraction`` of it is held out for validation.
    """

    # corpus
    format: str = "text"
    path: str = ""
    src_lang: str = "de"
    tgt_lang: str = "en"
    src_field: str = ""
    tgt_field: str = ""
    hf_config: str = ""
    train_split: str = "train"
    valid_split: str = "val"
    test_split: str = "test"
    # tokenizer
    tokenizer: str = "bpe"  # "bpe" or "unigram" (SentencePiece), or "char" (one id per character)
    vocab_size: int = 8000
    joint_vocab: bool = True
    character_coverage: float = 1.0
    input_sentence_size: int = 0  # sentences sampled to train SentencePiece; 0 = all
    # what is kept
    max_source_len: int = 256  # pieces + EOS; longer training examples are dropped or truncated
    max_target_len: int = 256  # pieces + BOS
    truncate: bool = False  # over-long examples: False drops them, True truncates them
    valid_fraction: float = 0.1  # language modelling: the held-out tail of the text
    # Subword regularization of the training split: prepare writes ``subword_samples`` extra
    # segmentations of it, each drawn by SentencePiece's sampling, and epoch e trains on sample
    # (e - 1) mod subword_samples. bpe: BPE-dropout (Provilkov et al. 2020), the probability of
    # skipping each merge (their 0.1 makes Multi30k ~40% longer in pieces); unigram: the
    # smoothing exponent of Kudo (2018). Validation, test and decoding never sample. 0 = off.
    subword_alpha: float = 0.0
    subword_samples: int = 8

    def validate(self) -> None:
        check_choice("data.format", self.format, ("text", "tsv", "jsonl", "hf", "lm"))
        check_choice("data.tokenizer", self.tokenizer, ("bpe", "unigram", "char"))
        if self.format == "jsonl" and not (self.src_field and self.tgt_field):
            raise ConfigError("data.format=jsonl needs data.src_field and data.tgt_field")
        if self.format == "hf" and not (self.src_field and self.tgt_field):
            raise ConfigError("data.format=hf needs data.src_field and data.tgt_field")
        for name in ("vocab_size", "max_source_len", "max_target_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError("data.valid_fraction must lie in (0, 1)")
        if not 0.0 <= self.subword_alpha < 1.0:
            raise ConfigError(f"data.subword_alpha must lie in [0, 1), got {self.subword_alpha}")
        if self.subword_alpha > 0:
            if self.tokenizer == "char" or self.format == "lm":
                raise ConfigError(
                    "data.subword_alpha needs a SentencePiece tokenizer (bpe or unigram) and "
                    f"parallel data; this is tokenizer={self.tokenizer}, format={self.format}"
                )
            if self.subword_samples < 1:
                raise ConfigError(
                    f"data.subword_samples must be >= 1 with subword_alpha > 0, got "
                    f"{self.subword_samples}"
                )

    def sampled_splits(self) -> list[str]:
        """The prepared splits holding the training split's sampled segmentations, in epoch
        order; empty when ``subword_alpha`` is 0."""
        if self.subword_alpha == 0:
            return []
        return [f"{self.train_split}.sample{k}" for k in range(1, self.subword_samples + 1)]


@dataclass(frozen=True)
class PrepareConfig:
    """Where ``prepare`` writes and how many processes it uses; never what it writes."""

    out_dir: str = ""  # binarized data; empty means "<train.out_dir>/data"
    num_workers: int = 2  # encoding processes (and SentencePiece training threads)

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"prepare.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class BatchConfig:
    """How prepared examples are batched; changing it never prepares the data again."""

    max_tokens: int = 4096  # per batch, padding included, source or target whichever is longer
    # language modelling
    block_size: int = 256
    batch_size: int = 32
    eval_batches: int = 20  # fixed validation batches per evaluation

    def validate(self) -> None:
        for name in ("max_tokens", "block_size", "batch_size", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"batch.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, evaluation cadence and checkpointing."""

    out_dir: str = "runs/default"
    seed: int = 1
    max_steps: int = 100_000  # optimizer updates; 0 = no limit
    max_epochs: int = 0  # 0 = no limit
    # Wall-clock budget of the run, not of the process: the time already trained is saved in
    # each checkpoint and a resume spends only what is left. 0 = no limit.
    max_minutes: float = 0.0
    update_freq: int = 1  # batches accumulated per update
    # Ranks that ``seq2seq train`` starts on this machine (torchrun's launcher, gloo on CPU), each
    # with cores / processes threads; each takes its own batches, so an update sees processes x
    # update_freq of them. Ignored inside torchrun and by ``train()`` called from Python.
    processes: int = 1
    lr_schedule: str = "noam"  # "noam" | "inverse_sqrt" | "cosine" | "constant"
    lr: float = 1.0  # noam: multiplier of d_model^-0.5 * min(...); others: the peak rate
    min_lr: float = 0.0  # floor of cosine and of the cooldown
    # The last fraction of the run (of max_steps, or of max_minutes when the budget is time;
    # whichever ends the run first) over which the rate falls linearly to min_lr, whatever the
    # schedule; 0 = none. A wall-clock budget never knows its number of updates in advance.
    cooldown: float = 0.0
    warmup_steps: int = 4000
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # 0 = no clipping
    label_smoothing: float = 0.1
    # "auto" | "fp32" | "bf16" | "fp16". auto: bf16 where the device computes it natively, fp16 with
    # loss scaling on CUDA without bf16, else fp32 (seq2seq.hardware.resolve_precision); it is
    # resolved again on each start, so a resume on other hardware chooses afresh.
    precision: str = "auto"
    compile: bool = False
    tf32: bool = True
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default
    deterministic: bool = False
    log_every: int = 100  # updates between progress lines; a line also comes after 30 s of silence
    eval_every: int = 1000  # updates; 0 = at the end of each epoch
    eval_bleu: bool = False
    eval_bleu_sentences: int = 200
    best_metric: str = "valid_loss"  # "valid_loss" or "bleu"
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    save_every: int = 1000  # updates; 0 = at each evaluation only
    keep_last: int = 5
    # Existing checkpoints in out_dir: "auto" resumes from the newest loadable one (and stops if
    # there are some but none loads); "must" stops when there is none; "never" starts from update
    # 0 after moving the old checkpoints/ aside.
    resume: str = "auto"
    allow_config_change: bool = False  # resume although the checkpoint's config differs
    # A model directory (e.g. from ``seq2seq import``) whose weights start the run, with a fresh
    # optimizer; its tokenizer encodes the data and its model section must equal this run's
    # (dropout rates aside). A checkpoint to resume from wins over it. "" = random init.
    init_from: str = ""

    def validate(self) -> None:
        check_choice(
            "train.lr_schedule", self.lr_schedule, ("noam", "inverse_sqrt", "cosine", "constant")
        )
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if not 0.0 <= self.cooldown <= 1.0:
            raise ConfigError(f"train.cooldown must be between 0 and 1, got {self.cooldown}")
        if self.cooldown > 0 and self.max_steps <= 0 and self.max_minutes <= 0:
            raise ConfigError(
                "train.cooldown needs the run's length: set train.max_steps or train.max_minutes"
            )
        check_choice("train.best_metric", self.best_metric, ("valid_loss", "bleu"))
        check_choice("train.resume", self.resume, ("auto", "must", "never"))
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir must not be empty")
        if self.eval_bleu and self.eval_bleu_sentences < 1:
            raise ConfigError(
                f"train.eval_bleu_sentences must be >= 1 with train.eval_bleu=true, "
                f"got {self.eval_bleu_sentences}"
            )
        if self.update_freq < 1:
            raise ConfigError("train.update_freq must be >= 1")
        if self.processes < 1:
            raise ConfigError(f"train.processes must be >= 1, got {self.processes}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("train.label_smoothing must lie in [0, 1)")
        if self.best_metric == "bleu" and not self.eval_bleu:
            raise ConfigError("train.best_metric=bleu needs train.eval_bleu=true")


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings; the paper used beam 4 and length penalty 0.6 (section 6.1)."""

    beam_size: int = 4
    length_penalty: float = 0.6  # GNMT: score / ((5 + length) / 6) ** alpha
    max_len_a: float = 1.0  # output length limit = a * source_length + b
    max_len_b: int = 50
    min_len: int = 1
    no_repeat_ngram_size: int = 0
    nbest: int = 1
    batch_tokens: int = 4096
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 500

    def validate(self) -> None:
        if self.beam_size < 1:
            raise ConfigError(f"decode.beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ConfigError(
                f"decode.nbest must lie between 1 and decode.beam_size ({self.beam_size}), "
                f"got {self.nbest}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("decode.top_p must lie in (0, 1]")
        for name in ("length_penalty", "max_len_a", "temperature"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(
                    f"decode.{name} must be a finite number, got {getattr(self, name)}"
                )
        if self.max_len_b < 0 or self.temperature < 0:
            raise ConfigError("decode.max_len_b and decode.temperature must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.prepare.validate()
        self.batch.validate()
        self.train.validate()
        self.decode.validate()
        if self.model.arch != "transformer" and self.data.format != "lm":
            raise ConfigError(f"model.arch={self.model.arch} needs data.format=lm")
        if self.model.arch == "transformer" and self.data.format == "lm":
            raise ConfigError("data.format=lm needs model.arch=gpt or bigram")
        if self.model.share_embeddings and not self.data.joint_vocab and self.model.arch != "gpt":
            raise ConfigError("model.share_embeddings=true needs data.joint_vocab=true")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    def prepared_dir(self) -> Path:
        """Directory holding the tokenizer and binarized corpus for this run."""
        return Path(self.prepare.out_dir or Path(self.train.out_dir) / "data")


# Named architectures. Transformer sizes are the paper's Table 3; GPT sizes follow nanoGPT's
# character-level Shakespeare model and GPT-2 small (Radford et al. 2019).
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "transformer_base": dict(
        arch="transformer", d_model=512, n_heads=8, d_ff=2048,
        n_encoder_layers=6, n_decoder_layers=6, dropout=0.1,
    ),
    "transformer_big": dict(
        arch="transformer", d_model=1024, n_heads=16, d_ff=4096,
        n_encoder_layers=6, n_decoder_layers=6, dropout=0.3,
    ),
    "transformer_small": dict(
        arch="transformer", d_model=256, n_heads=4, d_ff=1024,
        n_encoder_layers=3, n_decoder_layers=3, dropout=0.1,
    ),
    "transformer_tiny": dict(
        arch="transformer", d_model=64, n_heads=4, d_ff=128,
        n_encoder_layers=2, n_decoder_layers=2, dropout=0.1,
    ),
    "gpt_shakespeare": dict(
        arch="gpt", d_model=384, n_heads=6, d_ff=1536, n_encoder_layers=0, n_decoder_layers=6,
        dropout=0.2, activation="gelu", norm_first=True, positions="learned", max_positions=256,
    ),
    "gpt_mini": dict(
        arch="gpt", d_model=128, n_heads=4, d_ff=512, n_encoder_layers=0, n_decoder_layers=4,
        dropout=0.0, activation="gelu", norm_first=True, positions="learned", max_positions=64,
    ),
    "gpt2_small": dict(
        arch="gpt", d_model=768, n_heads=12, d_ff=3072, n_encoder_layers=0, n_decoder_layers=12,
        dropout=0.1, activation="gelu", norm_first=True, positions="learned", max_positions=1024,
    ),
}
# fmt: on


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply ``section.key=value`` overrides, validate.

    Raises:
        ConfigError: unknown key, wrong type, unknown preset, or inconsistent settings.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config: {error.strerror}") from error
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested plain data (as YAML gives)."""
    raw = migrate(raw)
    model_raw = raw.get("model")
    if model_raw is None:
        model_raw = {}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"model: expected a mapping of settings, got {model_raw!r}")
    model_raw = dict(model_raw)
    preset = model_raw.get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
        model_raw = {**PRESETS[preset], **model_raw}
    raw["model"] = model_raw
    config = build(RunConfig, raw, "")
    config.validate()
    return config


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring a config saved by an older version (``format_version`` < current) up to date.

    A config without ``format_version`` is taken to be current, and a key that has moved since
    is an error naming its new place.

    Raises:
        ConfigError: a moved key in a current config.
    """
    raw = dict(raw)
    version = raw.get("format_version", FORMAT_VERSION)
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(version, int):
        return raw
    moved = sorted(set(data) & set(_MOVED_FROM_DATA))
    if moved and version >= 2:
        section, name = _MOVED_FROM_DATA[moved[0]]
        raise ConfigError(f"data.{moved[0]}: moved to {section}.{name} (format_version 2)")
    if version < 2:
        raw["data"] = data = dict(data)
        for key in moved:
            section, name = _MOVED_FROM_DATA[key]
            raw[section] = {**(raw.get(section) or {}), name: data.pop(key)}
        raw["format_version"] = FORMAT_VERSION
    return raw


def save_config(
    config: RunConfig, path: str | Path, comments: dict[str, str] | None = None
) -> None:
    """Write ``config`` as YAML; ``comments`` maps dotted keys (``train.precision``) to a note
    written as a YAML comment at the end of that key's line (``load_config`` ignores it)."""
    lines = yaml.safe_dump(config.to_dict(), sort_keys=False).splitlines()
    section = ""
    for i, line in enumerate(lines):
        if not line.startswith(" "):
            section = line.split(":", 1)[0]
            key = section
        else:
            key = f"{section}.{line.strip().split(':', 1)[0]}"
        if comments and key in comments:
            lines[i] = f"{line}  # {' '.join(comments[key].splitlines())}"
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
