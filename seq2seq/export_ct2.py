"""Export a trained encoder-decoder to CTranslate2 (``seq2seq export --format ctranslate2``).

CTranslate2 (the ``ct2`` extra) goes through the Marian model: CTranslate2's own Marian loader
turns it into a model spec, which its converter validates, quantizes and saves. Three of that
loader's choices fit the released OPUS-MT models but not ours, so a subclass overrides them: it
starts the decoder from a zero vector where we start from the BOS embedding (``decoder_start`` is
BOS, as in our search), it drops the last vocabulary row (OPUS-MT's appended ``<pad>``; ours is a
real piece), and it uses the source vocabulary on both sides (we may have two).

The command line is ``seq2seq.export``'s, which hands ``--format ctranslate2`` to
:func:`save_ctranslate2`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seq2seq.export import ExportError, to_marian
from seq2seq.model import Transformer
from seq2seq.tokenizer import BOS_ID, EOS_ID, UNK_ID, SentencePieceModel, Tokenizer

if TYPE_CHECKING:
    from transformers import MarianMTModel

CT2_QUANTIZATIONS = (
    "float32",
    "int8",
    "int8_float32",
    "int16",
    "float16",
    "bfloat16",
    "int8_float16",
    "int8_bfloat16",
)


def save_ctranslate2(
    model: Transformer, tokenizer: Tokenizer, out_dir: str | Path, quantization: str = "float32"
) -> Path:
    """Write a CTranslate2 model directory for ``model`` (``ctranslate2.Translator`` loads it).

    The directory gets CTranslate2's ``model.bin``, ``config.json`` and vocabulary file(s), our
    ``tokenizer/``, the SentencePiece models ``source.spm`` and ``target.spm``, and
    ``TOKENIZER.md``. Sources are given to CTranslate2 as pieces followed by ``</s>`` (our EOS).
    Written beside ``out_dir`` and renamed when complete, like :func:`seq2seq.export.save_marian`.

    Args:
        model: a post-norm encoder-decoder :class:`~seq2seq.model.Transformer`.
        tokenizer: its SentencePiece tokenizer (character vocabularies are refused).
        out_dir: the directory to create; it must not exist.
        quantization: a CTranslate2 weight type, one of :data:`CT2_QUANTIZATIONS`.

    Raises:
        ExportError: see :func:`to_marian`; a character tokenizer, an unknown quantization,
            ``ctranslate2`` missing, a conversion CTranslate2 refuses, or ``out_dir`` exists.
    """
    from seq2seq.directory import CheckpointError, write_directory

    if quantization not in CT2_QUANTIZATIONS:
        raise ExportError(
            f"--quantization {quantization!r}: choose one of {', '.join(CT2_QUANTIZATIONS)}"
        )
    if not (
        isinstance(tokenizer.source, SentencePieceModel)
        and isinstance(tokenizer.target, SentencePieceModel)
    ):
        raise ExportError(
            "CTranslate2 export needs SentencePiece vocabularies; this model has character ones"
        )
    converter = _ct2_converter(to_marian(model, tokenizer), tokenizer)

    def write(tmp: Path) -> None:
        try:
            converter.convert(str(tmp), quantization=quantization, force=True)
        except (ValueError, RuntimeError, NotImplementedError) as error:
            raise ExportError(f"CTranslate2 conversion failed: {error}") from error
        tokenizer.save(tmp / "tokenizer")
        (tmp / "source.spm").write_bytes(tokenizer.source.model_proto)
        (tmp / "target.spm").write_bytes(tokenizer.target.model_proto)
        note = [
            "# Tokenizer",
            "",
            "`source.spm`/`target.spm` are the SentencePiece models; `tokenizer/` is the seq2seq",
            "tokenizer (`seq2seq.tokenizer.Tokenizer.load`). Give CTranslate2 the source pieces",
            "followed by `</s>`; it returns target pieces without `</s>`:",
            "",
            "    sp = sentencepiece.SentencePieceProcessor(model_file='source.spm')",
            "    tokens = [sp.encode(line, out_type=str) + ['</s>'] for line in lines]",
            "",
            "Our search has no length penalty at `length_penalty=0`; with `--lenpen A` ours",
            "divides by ((5 + length) / 6) ** A, CTranslate2 by length ** A. Our length limit",
            "counts the final `</s>`, CTranslate2's `max_decoding_length` does not (ours N = N - 1).",
        ]
        (tmp / "TOKENIZER.md").write_text("\n".join(note) + "\n", encoding="utf-8")

    try:
        return write_directory(Path(out_dir), write, replace=False)
    except CheckpointError as error:
        raise ExportError(str(error)) from error


def _ct2_converter(marian: MarianMTModel, tokenizer: Tokenizer) -> Any:
    """A ``ctranslate2`` converter whose spec is CTranslate2's Marian spec of ``marian``, with
    the three overrides of the module doc."""
    try:
        import ctranslate2.converters
        from ctranslate2.converters.transformers import BartLoader, MarianMTLoader
    except ImportError as error:
        raise ExportError(
            "exporting to CTranslate2 needs the optional dependency 'ctranslate2': "
            "pip install 'seq2seq[ct2]'"
        ) from error

    def pieces(model: SentencePieceModel) -> list[str]:
        processor = model.processor
        return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]

    source, target = pieces(tokenizer.source), pieces(tokenizer.target)

    class Loader(MarianMTLoader):
        def get_model_spec(self, model: MarianMTModel) -> Any:
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return BartLoader.get_model_spec(self, model)  # keeps every vocabulary row

        def set_config(self, config: Any, model: MarianMTModel, tokenizer: Any) -> None:
            config.bos_token = target[BOS_ID]
            config.eos_token = target[EOS_ID]
            config.unk_token = target[UNK_ID]
            config.decoder_start_token = target[BOS_ID]

        def set_decoder(self, spec: Any, decoder: Any) -> None:
            BartLoader.set_decoder(self, spec, decoder)  # start from the BOS embedding

        def get_vocabulary(self, model: MarianMTModel, tokenizer: Any) -> list[str]:
            return source

        def set_vocabulary(self, spec: Any, tokens: list[str]) -> None:
            spec.register_source_vocabulary(source)
            spec.register_target_vocabulary(target)

    class Converter(ctranslate2.converters.Converter):
        def _load(self) -> Any:
            with torch.no_grad():
                return Loader()(marian, None)

    return Converter()
