"""The tokenizer kinds of imported Hugging Face models, with our fixed special ids.

Imported models (``seq2seq.hf_import``) keep their own vocabularies in our id order:
  - ``spm_vocab`` (Marian): SentencePiece cuts text into pieces, and a piece table (our id ->
    piece, ``pieces`` in ``tokenizer.json``) gives the ids, as ``MarianTokenizer``'s
    ``vocab.json`` does; pieces not in the table are UNK;
  - ``byte_bpe`` (GPT-2): a ``tokenizers`` byte-level BPE (``bpe.json``) gives its own
    ids, which ``hf_ids`` (our id -> its id, -1 for a row it lacks) maps to ours. It needs the
    optional ``tokenizers`` package, imported only when such a tokenizer is loaded.

:class:`seq2seq.tokenizer.Tokenizer` saves and loads both (``tokenizer.json`` names the kind);
this module is imported only when such a tokenizer is built or loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from seq2seq.textio import atomic_write_bytes
from seq2seq.tokenizer import DROPPED_IDS, UNK_ID, TokenizerError, model_file_name


class PieceVocab:
    """SentencePiece pieces looked up in a piece table, as Marian does (module doc).

    Args:
        model_proto: the serialized SentencePiece model that cuts text into pieces.
        pieces: the piece of each of our ids; "" for an id no text encodes to (a row the
            imported model lacks).
    """

    def __init__(self, model_proto: bytes, pieces: list[str]) -> None:
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pieces = list(pieces)
        self._ids = {piece: i for i, piece in enumerate(self.pieces) if piece}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            code: list[str] = []
            end = text.find("<<") if text.startswith(">>") else -1
            if end != -1:  # a multilingual model's target-language token, e.g. ">>fr<<"
                code, text = [text[: end + 2]], text[end + 2 :]
            pieces = code + self.processor.encode(text, out_type=str)
            out.append([self._ids.get(piece, UNK_ID) for piece in pieces])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        size, pieces = self.vocab_size, self.pieces
        kept = [pieces[i] if i < size else pieces[UNK_ID] for i in ids if i not in DROPPED_IDS]
        return self.processor.decode_pieces([piece for piece in kept if piece])

    def save_files(self, directory: Path, side: str, joint: bool) -> dict[str, Any]:
        name = model_file_name(side, joint)
        atomic_write_bytes(directory / name, self.model_proto)
        return {"vocab_size": self.vocab_size, "model_file": name, "pieces": self.pieces}

    def state(self) -> tuple:
        return ("pieces", self.model_proto, tuple(self.pieces))


class ByteLevelBPE:
    """A ``tokenizers`` byte-level BPE (GPT-2's) with its ids mapped to ours (module doc).

    Args:
        definition: the ``tokenizers`` JSON serialization (``Tokenizer.to_str()``).
        hf_ids: the BPE's id for each of our ids, -1 for a row it lacks.

    Raises:
        TokenizerError: ``tokenizers`` is not installed or rejects ``definition``.
    """

    def __init__(self, definition: str, hf_ids: list[int]) -> None:
        try:
            from tokenizers import Tokenizer as BPETokenizer
        except ImportError:
            raise TokenizerError(
                "a byte_bpe tokenizer needs the optional package 'tokenizers': "
                "pip install 'seq2seq[hf]'"
            ) from None
        try:
            self.bpe = BPETokenizer.from_str(definition)
        except Exception as error:  # tokenizers raises plain Exceptions for malformed JSON
            raise TokenizerError(f"not a tokenizers definition: {error}") from None
        self.definition = definition
        self.hf_ids = list(hf_ids)
        self._ours = {hf: ours for ours, hf in enumerate(self.hf_ids) if hf >= 0}

    @property
    def vocab_size(self) -> int:
        return len(self.hf_ids)

    def encode(self, texts: list[str]) -> list[list[int]]:
        encoded = self.bpe.encode_batch(list(texts), add_special_tokens=False)
        return [[self._ours.get(i, UNK_ID) for i in item.ids] for item in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        size, hf_ids = self.vocab_size, self.hf_ids
        kept = [hf_ids[i] for i in ids if i not in DROPPED_IDS and i < size and hf_ids[i] >= 0]
        return self.bpe.decode(kept, skip_special_tokens=False)

    def save_files(self, directory: Path, side: str, joint: bool) -> dict[str, Any]:
        name = "bpe.json" if joint else f"{side}.bpe.json"
        atomic_write_bytes(directory / name, self.definition.encode("utf-8"))
        return {"vocab_size": self.vocab_size, "bpe_file": name, "hf_ids": self.hf_ids}

    def state(self) -> tuple:
        return ("bpe", self.definition, tuple(self.hf_ids))


def load_bpe(directory: Path, meta_path: Path, side: str, entry: dict) -> ByteLevelBPE:
    """One side's :class:`ByteLevelBPE` from its ``tokenizer.json`` entry (``bpe_file``,
    ``hf_ids``).

    Raises:
        TokenizerError: the entry or the file it names is malformed; the message names it.
    """
    name, hf_ids = entry.get("bpe_file"), entry.get("hf_ids")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise TokenizerError(
            f"{meta_path}: {side}.bpe_file must name a file in {directory}, got {name!r}"
        )
    if not isinstance(hf_ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in hf_ids
    ):
        raise TokenizerError(f"{meta_path}: {side}.hf_ids must be a list of integers")
    path = directory / name
    try:
        definition = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path}: cannot read the BPE definition: {error}") from error
    try:
        return ByteLevelBPE(definition, hf_ids)
    except TokenizerError as error:
        raise TokenizerError(f"{path}: {error}") from None
