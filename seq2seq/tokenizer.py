"""Tokenizers: SentencePiece (BPE or unigram), a character vocabulary, and two kinds that carry
an imported Hugging Face model's vocabulary, all with fixed special ids.

A :class:`Tokenizer` holds one model shared by source and target (``joint``) or one per side.
Every kind reserves the same four special ids, so batches and search never need to ask:

    PAD_ID=0  UNK_ID=1  BOS_ID=2  EOS_ID=3

``encode_*`` return pieces only (no BOS/EOS); ``data.py`` adds them. ``decode_*`` drop PAD, BOS and
EOS wherever they appear; callers truncate at the first EOS themselves. A saved tokenizer is a
directory holding ``tokenizer.json`` plus ``spm.model`` (joint) or ``source.model`` and
``target.model`` (SentencePiece), or just ``tokenizer.json`` (characters); each side's model
writes its own files (:meth:`Side.save_files`).

Imported models keep their own vocabularies in our id order: the kinds ``spm_vocab`` (Marian)
and ``byte_bpe`` (GPT-2) live in :mod:`seq2seq.hf_tokenizer`, which :meth:`Tokenizer.load` loads
only for such a tokenizer.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import sentencepiece as spm

from seq2seq.textio import atomic_write_bytes

if TYPE_CHECKING:
    from seq2seq.config import DataConfig

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
N_SPECIAL = 4
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
UNK_TEXT = "\u2047"  # what SentencePiece prints for an unknown piece
DROPPED_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))  # what decode_* leave out
_META_FILE = "tokenizer.json"
_FORMAT_VERSION = 1
KINDS = ("bpe", "unigram", "char", "spm_vocab", "byte_bpe")


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded; the message names the file or setting."""


class CharVocab:
    """One id per character (newline and space included); ids start after the specials."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise TokenizerError("a character vocabulary holds single characters only")
        self._ids = {c: i + N_SPECIAL for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + len(self.chars)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[self._ids.get(c, UNK_ID) for c in text] for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        out = []
        for i in ids:
            if i >= N_SPECIAL and i - N_SPECIAL < len(chars):
                out.append(chars[i - N_SPECIAL])
            elif i not in DROPPED_IDS:
                out.append(UNK_TEXT)
        return "".join(out)

    def save_files(self, directory: Path, side: str, joint: bool) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "chars": self.chars}

    def state(self) -> tuple:
        return ("char", tuple(self.chars))


class SentencePieceModel:
    """A SentencePiece processor kept together with its serialized model (for saving)."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        for name, expected in SPECIAL_IDS.items():
            actual = getattr(self.processor, f"{name}_id")()
            if actual != expected:
                raise TokenizerError(f"SentencePiece model has {name}_id={actual}, need {expected}")

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts)

    def sample(self, texts: list[str], alpha: float, seed: int) -> list[list[int]]:
        """One segmentation of each text drawn at ``alpha`` (BPE-dropout for BPE models), the
        same for the same ``seed`` within a process and its forked workers (SentencePiece 0.2
        draws others in a new process): one encoding thread, because SentencePiece seeds each of
        its threads' generators alike and hands them texts in no fixed order."""
        spm.set_random_generator_seed(seed)
        return self.processor.encode(
            texts, enable_sampling=True, alpha=alpha, nbest_size=-1, num_threads=1
        )

    def decode(self, ids: Iterable[int]) -> str:
        size = self.vocab_size
        # A model may pad its vocabulary past ours; an id we never issued decodes as unknown.
        kept = [i if i < size else UNK_ID for i in ids if i not in DROPPED_IDS]
        return self.processor.decode(kept)

    def save_files(self, directory: Path, side: str, joint: bool) -> dict[str, Any]:
        name = model_file_name(side, joint)
        atomic_write_bytes(directory / name, self.model_proto)
        return {"vocab_size": self.vocab_size, "model_file": name}

    def state(self) -> tuple:
        return ("spm", self.model_proto)


def model_file_name(side: str, joint: bool) -> str:
    """The SentencePiece model file of one side in a saved tokenizer directory."""
    return "spm.model" if joint else f"{side}.model"


class Side(Protocol):
    """One side's model, of any kind: :class:`CharVocab`, :class:`SentencePieceModel`, or an
    imported model's (:mod:`seq2seq.hf_tokenizer`)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save_files(self, directory: Path, side: str, joint: bool) -> dict[str, Any]:
        """Write this side's file(s) into ``directory``; return its ``tokenizer.json`` entry."""
        ...

    def state(self) -> tuple:
        """Equal for two models exactly when they give every text the same ids."""
        ...


class Tokenizer:
    """Source and target tokenization for one run.

    Args:
        kind: one of :data:`KINDS`.
        source: the source-side model (also the target's when ``target`` is None).
        target: the target-side model for separate vocabularies, else None (joint).
    """

    def __init__(self, kind: str, source: Side, target: Side | None = None) -> None:
        if kind not in KINDS:
            raise TokenizerError(f"unknown tokenizer kind {kind!r}")
        self.kind = kind
        self.source = source
        self.target = source if target is None else target

    @property
    def is_joint(self) -> bool:
        return self.source is self.target

    @property
    def src_vocab_size(self) -> int:
        return self.source.vocab_size

    @property
    def tgt_vocab_size(self) -> int:
        return self.target.vocab_size

    @property
    def vocab_size(self) -> int:
        """The target vocabulary size (the only one for a decoder-only model)."""
        return self.target.vocab_size

    def encode_source(self, text: str) -> list[int]:
        return self.source.encode([text])[0]

    def encode_target(self, text: str) -> list[int]:
        return self.target.encode([text])[0]

    def encode_source_batch(self, texts: list[str]) -> list[list[int]]:
        return self.source.encode(list(texts))

    def encode_target_batch(self, texts: list[str]) -> list[list[int]]:
        return self.target.encode(list(texts))

    def sample_batch(self, side: str, texts: list[str], alpha: float, seed: int) -> list[list[int]]:
        """Sampled segmentations of ``texts`` on ``side`` ("source" or "target"), for subword
        regularization; reproducible by ``seed``.

        Raises:
            TokenizerError: this kind of tokenizer has one segmentation only.
        """
        model = self.source if side == "source" else self.target
        if not isinstance(model, SentencePieceModel):
            raise TokenizerError(f"a {self.kind} tokenizer cannot sample segmentations")
        return model.sample(list(texts), alpha, seed)

    def decode_source(self, ids: Iterable[int]) -> str:
        return self.source.decode(_as_ints(ids))

    def decode_target(self, ids: Iterable[int]) -> str:
        return self.target.decode(_as_ints(ids))

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and the model file(s) into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sides = {"source": self.source, "target": self.target}
        meta: dict = {
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "joint": self.is_joint,
            "special_ids": SPECIAL_IDS,
        }
        for side, model in sides.items():
            meta[side] = model.save_files(directory, side, self.is_joint)
        text = json.dumps(meta, indent=1, ensure_ascii=True) + "\n"
        atomic_write_bytes(directory / _META_FILE, text.encode("utf-8"))
        return directory

    def same_as(self, other: Tokenizer) -> bool:
        """True when ``other`` turns every text into the same ids (same kind, same models)."""

        return (self.kind, self.source.state(), self.target.state()) == (
            other.kind,
            other.source.state(),
            other.target.state(),
        )

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            TokenizerError: the directory lacks the files or they do not fit together.
        """
        directory = Path(directory)
        meta_path = directory / _META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise TokenizerError(f"{meta_path}: no tokenizer here (file missing)") from error
        except (OSError, ValueError) as error:
            raise TokenizerError(f"{meta_path}: cannot read tokenizer metadata: {error}") from error
        if not isinstance(meta, dict):
            raise TokenizerError(
                f"{meta_path}: malformed metadata: expected a JSON object, got {type(meta).__name__}"
            )
        version = meta.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise TokenizerError(
                f"{meta_path}: format_version must be an integer, got {version!r} "
                f"({type(version).__name__})"
            )
        if version > _FORMAT_VERSION:
            raise TokenizerError(
                f"{meta_path}: format_version {version} is newer than this code ({_FORMAT_VERSION})"
            )
        if meta.get("kind") not in KINDS:
            raise TokenizerError(
                f"{meta_path}: unknown tokenizer kind {meta.get('kind')!r} (known: {', '.join(KINDS)})"
            )
        if meta.get("special_ids") != SPECIAL_IDS:
            raise TokenizerError(
                f"{meta_path}: special ids {meta.get('special_ids')} != {SPECIAL_IDS}"
            )
        if not isinstance(meta.get("joint"), bool):
            raise TokenizerError(
                f"{meta_path}: malformed metadata: 'joint' must be true or false, "
                f"got {meta.get('joint')!r}"
            )
        if not all(isinstance(meta.get(key), dict) for key in ("source", "target")):
            raise TokenizerError(f"{meta_path}: malformed metadata (no source/target entries)")
        models = {}
        for side in ("source", "target"):
            entry = meta[side]
            if meta["joint"] and side == "target":
                models[side] = models["source"]
                continue
            models[side] = _load_side(directory, meta_path, side, entry)
        target = None if meta["joint"] else models["target"]
        return cls(meta["kind"], models["source"], target)


def _load_side(directory: Path, meta_path: Path, side: str, entry: dict) -> Side:
    """One side's model from its ``tokenizer.json`` entry; errors name the file at fault."""
    if "bpe_file" in entry:
        from seq2seq.hf_tokenizer import load_bpe  # the optional kinds load only when used

        return load_bpe(directory, meta_path, side, entry)
    if "chars" in entry:
        chars = entry["chars"]
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise TokenizerError(f"{meta_path}: {side}.chars must be a list of characters")
        try:
            return CharVocab(chars)
        except TokenizerError as error:
            raise TokenizerError(f"{meta_path}: {side}: {error}") from None
    name = entry.get("model_file")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise TokenizerError(
            f"{meta_path}: {side}.model_file must name a file in {directory}, got {name!r}"
        )
    path = directory / name
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise TokenizerError(f"{path}: cannot read model: {error.strerror}") from error
    if not payload:
        raise TokenizerError(f"{path}: empty file, not a SentencePiece model")
    pieces = entry.get("pieces")
    if pieces is not None and (
        not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces)
    ):
        raise TokenizerError(f"{meta_path}: {side}.pieces must be a list of strings")
    try:
        if pieces is None:
            return SentencePieceModel(payload)
        from seq2seq.hf_tokenizer import PieceVocab

        return PieceVocab(payload, pieces)
    except RuntimeError as error:
        raise TokenizerError(f"{path}: not a SentencePiece model: {error}") from error
    except TokenizerError as error:
        raise TokenizerError(f"{path}: {error}") from None


def train_tokenizer(
    data: DataConfig,
    source_texts: Iterable[str],
    target_texts: Iterable[str] | None,
    out_dir: str | Path,
    num_threads: int = 1,
) -> Tokenizer:
    """Train the tokenizer that ``data`` describes and save it into ``out_dir``.

    With ``data.joint_vocab`` one model is trained on both sides; otherwise one per side. Without
    target texts (a language model) one model is trained on ``source_texts``, taken to be the lines
    of one text stream: it then keeps every space and adds no word-boundary marker at the start,
    so that text encoded in pieces cut after a newline gives the same ids as encoded whole.
    SentencePiece models always hold ``"\n"`` as a piece. The iterables are read once each.
    ``num_threads`` is SentencePiece's training threads.

    Raises:
        TokenizerError: SentencePiece rejected the settings, e.g. a vocabulary too large for
            the text.
    """
    if target_texts is None:
        tokenizer = Tokenizer(
            data.tokenizer, _train_one(data, source_texts, "joint", num_threads, stream=True)
        )
    elif data.joint_vocab:
        texts = _interleave(source_texts, target_texts)
        tokenizer = Tokenizer(data.tokenizer, _train_one(data, texts, "joint", num_threads))
    else:
        source = _train_one(data, source_texts, "source", num_threads)
        target = _train_one(data, target_texts, "target", num_threads)
        tokenizer = Tokenizer(data.tokenizer, source, target)
    tokenizer.save(out_dir)
    return tokenizer


def _train_one(
    data: DataConfig, texts: Iterable[str], side: str, num_threads: int, stream: bool = False
) -> SentencePieceModel | CharVocab:
    if data.tokenizer == "char":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return CharVocab(chars)
    reader = _CapturingIterator(texts)
    model = io.BytesIO()
    options = dict(
        model_type=data.tokenizer,
        vocab_size=data.vocab_size,
        character_coverage=data.character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=max(1, num_threads),
        max_sentence_length=1 << 16,  # bytes; long documents (summarization) are kept
        minloglevel=2,
        user_defined_symbols=["\n"],  # keeps line breaks (dialogues, poems) as a piece of their own
    )
    if stream:
        # Language-model text is encoded in chunks cut after a newline; with every space kept and
        # no dummy prefix, the ids do not depend on where the chunks were cut.
        options.update(remove_extra_whitespaces=False, add_dummy_prefix=False)
    if data.input_sentence_size > 0:
        options.update(input_sentence_size=data.input_sentence_size, shuffle_input_sentence=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(reader), model_writer=model, **options
        )
    except RuntimeError as error:
        if reader.error is not None:
            raise reader.error from None
        message = str(error).split("] ", 1)[-1].rstrip(".")
        hint = ""
        if "Vocabulary size" in message:
            hint = " Set a smaller data.vocab_size for this corpus."
        raise TokenizerError(
            f"training the {side} SentencePiece model failed: {message}.{hint}"
        ) from None
    if reader.error is not None:
        raise reader.error
    return SentencePieceModel(model.getvalue())


class _CapturingIterator:
    """Keeps an exception raised while SentencePiece pulls text, which it would otherwise mangle."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = texts
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.texts
        except Exception as error:  # re-raised by _train_one once SentencePiece returns
            self.error = error


def _interleave(first: Iterable[str], second: Iterable[str]) -> Iterator[str]:
    for pair in itertools.zip_longest(first, second):
        yield from (text for text in pair if text is not None)


def _as_ints(ids: Iterable[int]) -> list[int]:
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
