"""Tokenizer: training, fixed special ids, save/load round trips, joint vs separate, characters."""

from __future__ import annotations

import random

import pytest

from seq2seq.config import DataConfig
from seq2seq.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    TokenizerError,
    train_tokenizer,
)

GERMAN = "der die das ein eine haus katze hund baum auto fährt schnell rot blau grün groß".split()
ENGLISH = "the a house cat dog tree car drives fast slow red blue green big small on under".split()


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    return sentences(GERMAN, 400, 1), sentences(ENGLISH, 400, 2)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_save_load_round_trip_gives_identical_ids(tmp_path, corpus, kind):
    src, tgt = corpus
    data = DataConfig(tokenizer=kind, vocab_size=60)
    tokenizer = train_tokenizer(data, src, tgt, tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    probe = ["der hund fährt schnell.", "the red car is under a big tree."]
    assert [tokenizer.encode_source(t) for t in probe] == [loaded.encode_source(t) for t in probe]
    assert [tokenizer.encode_target(t) for t in probe] == [loaded.encode_target(t) for t in probe]
    assert loaded.kind == kind and loaded.is_joint
    assert loaded.encode_source_batch(probe) == [loaded.encode_source(t) for t in probe]
    for text in src[:20] + tgt[:20]:
        assert loaded.decode_target(loaded.encode_target(text)) == text
        assert loaded.decode_source(loaded.encode_source(text)) == text


def test_special_ids_are_fixed_and_dropped_when_decoding(tmp_path, corpus):
    tokenizer = train_tokenizer(DataConfig(vocab_size=80), *corpus, tmp_path)
    processor = tokenizer.source.processor
    pieces = [processor.id_to_piece(i) for i in range(4)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    ids = tokenizer.encode_target("the cat.")
    assert min(ids) >= 4  # pieces only, no BOS/EOS added
    assert tokenizer.decode_target([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "the cat."
    assert UNK_ID in tokenizer.encode_target("the 猫")  # a character never seen in training
    # an id past the vocabulary (a model may pad its output layer) decodes as unknown
    assert tokenizer.decode_target([*ids, tokenizer.tgt_vocab_size + 5]).startswith("the cat.")


def test_joint_and_separate_vocabularies(tmp_path, corpus):
    src, tgt = corpus
    joint = train_tokenizer(DataConfig(vocab_size=90, joint_vocab=True), src, tgt, tmp_path / "j")
    separate = train_tokenizer(
        DataConfig(vocab_size=60, joint_vocab=False), src, tgt, tmp_path / "s"
    )
    assert joint.is_joint and joint.src_vocab_size == joint.tgt_vocab_size == 90
    assert not separate.is_joint
    assert separate.src_vocab_size == separate.tgt_vocab_size == 60
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "source.model",
        "target.model",
        "tokenizer.json",
    ]
    # each side's model saw only its own language: English has no "k" or "z"
    assert UNK_ID not in separate.encode_source("katze")
    assert UNK_ID in separate.encode_target("katze")
    assert UNK_ID not in joint.encode_target("katze")
    loaded = Tokenizer.load(tmp_path / "s")
    assert not loaded.is_joint
    assert loaded.encode_target("the big dog.") == separate.encode_target("the big dog.")
    assert loaded.encode_source("der hund.") == separate.encode_source("der hund.")


def test_char_tokenizer_keeps_newlines_and_spaces(tmp_path):
    text = "First Citizen:\nBefore we proceed  any further,\n\nhear me speak.\n"
    tokenizer = train_tokenizer(DataConfig(tokenizer="char"), [text], None, tmp_path)
    ids = tokenizer.encode_target(text)
    assert len(ids) == len(text) and min(ids) >= 4
    assert tokenizer.vocab_size == 4 + len(set(text))
    assert tokenizer.decode_target(ids) == text
    assert tokenizer.encode_target("Z") == [UNK_ID]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == "char" and loaded.is_joint
    assert loaded.encode_target(text) == ids
    assert loaded.decode_target([BOS_ID, *ids, EOS_ID]) == text


def test_lm_sentencepiece_ids_do_not_depend_on_where_text_is_cut(tmp_path):
    lines = [line + "\n" for line in sentences(ENGLISH, 300, 3)]
    text = "".join(lines)
    tokenizer = train_tokenizer(DataConfig(vocab_size=100), lines, None, tmp_path)
    whole = tokenizer.encode_target(text)
    cut = len(text) // 2
    cut = text.index("\n", cut) + 1
    assert tokenizer.encode_target(text[:cut]) + tokenizer.encode_target(text[cut:]) == whole
    assert tokenizer.decode_target(whole) == text  # newlines survive


def test_vocabulary_too_large_gives_a_clear_error(tmp_path, corpus):
    with pytest.raises(TokenizerError, match="smaller data.vocab_size"):
        train_tokenizer(DataConfig(vocab_size=5000), *corpus, tmp_path)


def test_load_from_a_directory_without_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
