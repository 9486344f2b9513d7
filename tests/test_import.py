"""seq2seq.hf_import: tiny random Hugging Face Marian and GPT-2 models, built here from a config
(nothing is downloaded), imported, and compared with the originals: tokenizer ids, logits,
greedy and beam search against ``generate``, the round trip back through ``export.to_marian``,
the command line, and fine-tuning from the imported weights with ``train.init_from``.

Tolerance: both sides compute in float32 but in different orders (our width permutation changes
the order of every m-wide sum; SDPA against Hugging Face's eager attention), so logits agree to
float32 rounding of sums of a few dozen O(1) terms (measured: 4e-7 on logits up to 3); we allow
2e-5 absolute.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import WORDS_DE, WORDS_EN

from seq2seq import hf_convert, hf_import
from seq2seq.attention import attention_maps
from seq2seq.checkpoint import load_model
from seq2seq.config import ConfigError, DecodeConfig, config_from_dict
from seq2seq.export import to_marian
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.translate import translate_ids

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ATOL = 2e-5
SENTENCES = ["das rote auto fährt schnell", "ein hund", "der große blaue baum ist alt und grün"]


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def perturb(model: torch.nn.Module, skip: str = "embed_positions") -> None:
    """Random weights everywhere (LayerNorm gains and biases too), fixed sinusoids kept."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if skip not in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(0.1 * noise)


def write_marian(
    directory: Path, texts: list[str], separate: bool = False, vocab_size: int = 48, **overrides
) -> Path:
    """A MarianMTModel directory laid out as OPUS-MT's: SentencePiece models whose own ids are
    not the model's, vocab.json with </s> 0, <unk> 1 and <pad> last (the decoder start)."""
    directory.mkdir(parents=True)
    protos = []
    for side, seed in (("source", 1), ("target", 2)):
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts if side == "source" or not separate else texts[::-1]),
            model_writer=buffer,
            vocab_size=vocab_size - 8 + 7 * seed if separate else vocab_size,
            model_type="unigram",
            minloglevel=2,
            hard_vocab_limit=False,
        )
        protos.append(buffer.getvalue())
        (directory / f"{side}.spm").write_bytes(protos[-1 if separate else 0])

    def vocab(proto: bytes) -> dict[str, int]:
        processor = spm.SentencePieceProcessor(model_proto=proto)
        pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        ordered = ["</s>", "<unk>"] + [p for p in pieces if p not in ("<unk>", "<s>", "</s>")]
        # Separate vocabularies share the config's one pad_token_id: put it early in both.
        ordered = ordered[:2] + ["<pad>"] + ordered[2:] if separate else ordered + ["<pad>"]
        return {piece: i for i, piece in enumerate(ordered)}

    source_vocab = vocab(protos[0])
    target_vocab = vocab(protos[1]) if separate else source_vocab
    (directory / "vocab.json").write_text(json.dumps(source_vocab))
    settings = {"separate_vocabs": separate, "source_lang": "de", "target_lang": "en"}
    if separate:
        (directory / "target_vocab.json").write_text(json.dumps(target_vocab))
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    pad = target_vocab["<pad>"]
    config = dict(
        vocab_size=len(source_vocab),
        decoder_vocab_size=len(target_vocab),
        share_encoder_decoder_embeddings=not separate,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=64,
        activation_function="swish",
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    config.update(overrides)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(transformers.MarianConfig(**config))
    perturb(model)
    with torch.no_grad():  # a real bias, and EOS likely enough that searches end before the limit
        bias = torch.randn(
            model.final_logits_bias.shape, generator=torch.Generator().manual_seed(1)
        )
        bias[0, 0] += 5.0
        model.final_logits_bias.copy_(bias)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory) -> Path:
    texts = sentences(WORDS_DE, 300, 0) + sentences(WORDS_EN, 300, 1)
    return write_marian(tmp_path_factory.mktemp("hf") / "marian", texts)


@pytest.fixture(scope="module")
def marian(marian_dir):
    hf = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(marian_dir)
    ours, tokenizer, config = hf_convert.import_marian(marian_dir)
    return hf, hf_tokenizer, ours, tokenizer, config


def marian_id_map(hf_tokenizer, tokenizer) -> list[int]:
    """Our id -> Hugging Face id, read back from our piece table and its vocab.json."""
    vocab = hf_tokenizer.get_vocab()
    return [vocab.get(piece, -1) if piece else -1 for piece in tokenizer.target.pieces]


def padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows])


def test_marian_tokenizer_gives_hf_ids(marian):
    hf, hf_tokenizer, _, tokenizer, _ = marian
    to_hf = marian_id_map(hf_tokenizer, tokenizer)
    assert to_hf[BOS_ID] == hf.config.decoder_start_token_id == hf.config.pad_token_id
    assert to_hf[EOS_ID] == hf.config.eos_token_id and to_hf[PAD_ID] == -1
    texts = SENTENCES + ["xyz qqq", ">>en<< ein haus"]
    for text in texts:
        ours = [to_hf[i] for i in tokenizer.encode_source(text)]
        assert ours + [hf.config.eos_token_id] == hf_tokenizer(text).input_ids
        ids = tokenizer.encode_target(text)
        expected = hf_tokenizer.decode([to_hf[i] for i in ids], skip_special_tokens=True)
        if UNK_ID not in ids:  # an unknown piece: ours prints SentencePiece's ⁇, theirs nothing
            assert tokenizer.decode_target(ids) == expected
    assert UNK_ID in tokenizer.encode_source("xyz qqq")  # pieces outside vocab.json


def marian_logits(marian, texts: list[str]):
    """Our and Hugging Face's logits on a padded batch, ours reordered to Hugging Face ids."""
    hf, hf_tokenizer, ours, tokenizer, _ = marian
    to_hf = torch.tensor(marian_id_map(hf_tokenizer, tokenizer))
    src_ids = [tokenizer.encode_source(t) + [EOS_ID] for t in texts]
    tgt_ids = [[BOS_ID] + tokenizer.encode_target(t) for t in reversed(texts)]
    src, tgt = padded(src_ids, PAD_ID), padded(tgt_ids, PAD_ID)
    pad = hf.config.pad_token_id
    with torch.no_grad():
        logits = ours(src, tgt)
        theirs = hf(
            input_ids=torch.where(src == PAD_ID, pad, to_hf[src]),
            attention_mask=src != PAD_ID,
            decoder_input_ids=torch.where(tgt == PAD_ID, pad, to_hf[tgt]),
        ).logits
    real = tgt != PAD_ID
    return logits, theirs, to_hf, real


def test_marian_logits_equal(marian):
    logits, theirs, to_hf, real = marian_logits(marian, SENTENCES)
    kept = to_hf >= 0
    assert torch.allclose(logits[..., kept][real], theirs[..., to_hf[kept]][real], atol=ATOL)
    log_probs, their_log_probs = logits.log_softmax(-1), theirs.log_softmax(-1)
    assert torch.allclose(  # the added PAD row takes no probability mass
        log_probs[..., kept][real], their_log_probs[..., to_hf[kept]][real], atol=ATOL
    )
    assert (log_probs[..., ~kept] < -1000).all()


@pytest.mark.parametrize("beam", [1, 3])
def test_marian_search_equals_hf_generate(marian, beam):
    hf, hf_tokenizer, ours, tokenizer, _ = marian
    to_hf = marian_id_map(hf_tokenizer, tokenizer)
    from_hf = {hf_id: i for i, hf_id in enumerate(to_hf) if hf_id >= 0}
    limit = 12
    texts = SENTENCES + ["ein kleines haus", "die katze"]
    sources = [tokenizer.encode_source(t) + [EOS_ID] for t in texts]
    decode = DecodeConfig(
        beam_size=beam, length_penalty=0.0, max_len_a=0.0, max_len_b=limit, min_len=1
    )
    mine = [nbest[0].tokens for nbest in translate_ids(ours, sources, decode)]
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = hf.generate(
            **batch,
            num_beams=beam,
            do_sample=False,
            max_new_tokens=limit,
            min_new_tokens=1,
            suppress_tokens=[hf.config.pad_token_id],
            length_penalty=0.0,
            early_stopping=False,
            num_return_sequences=1,
        )
    eos = hf.config.eos_token_id
    finished = 0
    for row, expected in zip(generated.tolist(), mine):
        tokens = row[1:]
        finished += eos in tokens
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        assert [from_hf[t] for t in tokens] == expected
    assert finished == len(texts)  # no hypothesis hit the limit, where the two score EOS apart


def test_marian_round_trip_through_export(marian, tmp_path):
    hf, hf_tokenizer, ours, tokenizer, _ = marian
    back = to_marian(ours, tokenizer)
    back.save_pretrained(tmp_path / "back")
    back = transformers.MarianMTModel.from_pretrained(tmp_path / "back").eval()
    to_hf = torch.tensor(marian_id_map(hf_tokenizer, tokenizer))
    src = padded([tokenizer.encode_source(t) + [EOS_ID] for t in SENTENCES], PAD_ID)
    tgt = padded([[BOS_ID] + tokenizer.encode_target(t) for t in SENTENCES], PAD_ID)
    pad = hf.config.pad_token_id
    with torch.no_grad():
        again = back(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt).logits
        theirs = hf(
            input_ids=torch.where(src == PAD_ID, pad, to_hf[src]),
            attention_mask=src != PAD_ID,
            decoder_input_ids=torch.where(tgt == PAD_ID, pad, to_hf[tgt]),
        ).logits
    kept, real = to_hf >= 0, tgt != PAD_ID
    assert torch.allclose(again[..., kept][real], theirs[..., to_hf[kept]][real], atol=ATOL)
    assert torch.allclose(
        again.log_softmax(-1)[..., kept][real],
        theirs.log_softmax(-1)[..., to_hf[kept]][real],
        atol=ATOL,
    )


def test_marian_separate_vocabularies_and_options(tmp_path):
    texts = sentences(WORDS_DE, 200, 3) + sentences(WORDS_EN, 200, 4)
    directory = write_marian(
        tmp_path / "sep",
        texts,
        separate=True,
        scale_embedding=False,
        activation_function="gelu",
        tie_word_embeddings=False,
    )
    hf = transformers.MarianMTModel.from_pretrained(directory).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(directory)
    ours, tokenizer, config = hf_convert.import_marian(directory)
    assert not config.model.share_embeddings and not config.model.scale_embedding
    assert config.model.activation == "gelu" and not config.model.tie_output
    source_vocab = hf_tokenizer.get_src_vocab()
    target_vocab = json.loads((directory / "target_vocab.json").read_text())
    to_src = torch.tensor([source_vocab.get(p, -1) for p in tokenizer.source.pieces])
    to_tgt = torch.tensor([target_vocab.get(p, -1) for p in tokenizer.target.pieces])
    assert len(to_src) != len(to_tgt)
    src = padded([tokenizer.encode_source(t) + [EOS_ID] for t in SENTENCES], PAD_ID)
    tgt = padded([[BOS_ID] + tokenizer.encode_target(t) for t in SENTENCES], PAD_ID)
    pad = hf.config.pad_token_id
    with torch.no_grad():
        logits = ours(src, tgt)
        theirs = hf(
            input_ids=torch.where(src == PAD_ID, pad, to_src[src]),
            attention_mask=src != PAD_ID,
            decoder_input_ids=torch.where(tgt == PAD_ID, pad, to_tgt[tgt]),
        ).logits
    kept, real = to_tgt >= 0, tgt != PAD_ID
    assert torch.allclose(logits[..., kept][real], theirs[..., to_tgt[kept]][real], atol=ATOL)


# ----------------------------------------------------------------------------- GPT-2


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "gpt2"
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences(WORDS_EN, 400, 5), vocab_size=300, special_tokens=["<|endoftext|>"]
    )
    fast = transformers.GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.save_pretrained(directory)
    end = bpe.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=bpe.get_vocab_size(),
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=end,
        eos_token_id=end,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    perturb(model, skip="\0")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    ours, tokenizer, config = hf_convert.import_gpt2(gpt2_dir)
    return hf, hf_tokenizer, ours, tokenizer, config


def test_gpt2_tokenizer_logits_and_greedy(gpt2):
    hf, hf_tokenizer, ours, tokenizer, config = gpt2
    assert config.model.activation == "gelu_tanh" and config.model.norm_first
    to_hf = torch.tensor(tokenizer.target.hf_ids)
    assert to_hf[BOS_ID] == hf.config.eos_token_id and (to_hf[[PAD_ID, UNK_ID, EOS_ID]] < 0).all()
    text = "the big red car drives fast\nthe old dog"
    ids = tokenizer.encode_target(text)
    assert to_hf[ids].tolist() == hf_tokenizer(text).input_ids
    assert tokenizer.decode_target(ids) == text
    tokens = torch.tensor([[BOS_ID] + ids])
    with torch.no_grad():
        logits = ours(tokens)
        theirs = hf(to_hf[tokens]).logits
    kept = to_hf >= 0
    assert torch.allclose(logits[..., kept], theirs[..., to_hf[kept]], atol=ATOL)
    assert torch.allclose(
        logits.log_softmax(-1)[..., kept], theirs.log_softmax(-1)[..., to_hf[kept]], atol=ATOL
    )
    prompt = torch.tensor([[BOS_ID] + ids[:3]])
    mine = ours.generate(prompt, max_new_tokens=10, temperature=0.0)
    with torch.no_grad():
        generated = hf.generate(
            to_hf[prompt],
            do_sample=False,
            max_new_tokens=10,
            suppress_tokens=[hf.config.eos_token_id],
            pad_token_id=hf.config.eos_token_id,
        )
    assert to_hf[mine].tolist() == generated.tolist()


def test_attention_maps_label_imported_pieces_as_hugging_face_does(marian, gpt2):
    """Axis labels of an imported model are its own tokens (the piece table, the BPE), not the
    SentencePiece model's ids, which no longer number our rows."""
    _, hf_tokenizer, ours, tokenizer, _ = marian
    text = SENTENCES[0]
    maps = attention_maps(ours, tokenizer, text, target=text)
    hf_ids = hf_tokenizer(text).input_ids  # pieces + </s>
    assert maps.keys["cross"] == hf_tokenizer.convert_ids_to_tokens(hf_ids)
    _, gpt2_hf_tokenizer, gpt2_ours, gpt2_tokenizer, _ = gpt2
    prompt = "the old dog"
    maps = attention_maps(gpt2_ours, gpt2_tokenizer, prompt)
    expected = gpt2_hf_tokenizer.convert_ids_to_tokens(gpt2_hf_tokenizer(prompt).input_ids)
    assert expected == maps.keys["decoder"][-len(expected) :]


# ----------------------------------------------------------------------------- command line


def test_import_command_writes_a_model_directory(marian, marian_dir, tmp_path, capsys):
    from seq2seq.__main__ import main

    out = tmp_path / "model"
    assert main(["import", "--from", "marian", "--model", str(marian_dir), "--out", str(out)]) == 0
    model, tokenizer, config = load_model(out)
    assert tokenizer.kind == "spm_vocab" and config.model.output_bias
    _, _, ours, _, _ = marian
    for name, tensor in ours.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tokenizer.same_as(marian[3])
    capsys.readouterr()
    assert main(["import", "--from", "marian", "--model", str(marian_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "already exists" in error and len(error.splitlines()) == 1
    assert (
        hf_import.main(["--from", "gpt2", "--model", str(marian_dir), "--out", str(tmp_path / "x")])
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert "model_type is 'marian', not 'gpt2'" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # a fresh interpreter importing torch: a few seconds
def test_import_module_bad_directory_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "seq2seq.hf_import", "--from", "marian", "--model",
         str(tmp_path / "empty"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"seq2seq import: error: {tmp_path / 'empty' / 'config.json'}: file missing"
    ]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- fine-tuning


def read_pairs(folder: Path, split: str, n: int) -> list[tuple[str, str]]:
    sides = []
    for lang in ("de", "en"):
        with gzip.open(folder / f"{split}.{lang}.gz", "rt", encoding="utf-8") as handle:
            sides.append([next(handle).rstrip("\n") for _ in range(n)])
    return list(zip(*sides))


@pytest.mark.slow
def test_finetune_from_imported_marian_lowers_valid_loss(shared_data, tmp_path):
    from seq2seq.api import Translator
    from seq2seq.checkpoint import read_pointer
    from seq2seq.train import train

    multi30k = shared_data / "multi30k"
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 400), ("val", 50)):
        pairs = read_pairs(multi30k, split, n)
        for k, lang in enumerate(("de", "en")):
            (data / f"{split}.{lang}").write_text("\n".join(p[k] for p in pairs) + "\n")
    texts = [line for pair in read_pairs(multi30k, "train", 400) for line in pair]
    imported = tmp_path / "imported"
    assert hf_import.main(
        ["--from", "marian", "--model", str(write_marian(tmp_path / "hf", texts, vocab_size=200, max_position_embeddings=256)), "--out",
         str(imported)]
    ) == 0  # fmt: skip
    config_text = (imported / "config.yaml").read_text()
    import yaml

    raw = yaml.safe_load(config_text)
    raw["data"].update(path=str(data), max_source_len=64, max_target_len=64)
    raw["batch"] = {"max_tokens": 1024}
    raw["prepare"] = {"num_workers": 0}
    raw["train"].update(
        out_dir=str(tmp_path / "run"), init_from=str(imported), max_steps=40, lr_schedule="constant",
        lr=3e-3, warmup_steps=0, eval_every=40, save_every=40, log_every=20, precision="fp32",
        label_smoothing=0.0, num_threads=1,
    )  # fmt: skip
    valid = read_pairs(multi30k, "val", 50)

    def nll(directory: Path) -> float:
        translator = Translator.load(directory, device="cpu")
        scores = translator.score([s for s, _ in valid], [t for _, t in valid])
        tokens = sum(len(translator.tokenizer.encode_target(t)) + 1 for _, t in valid)
        return -sum(scores) / tokens

    before = nll(imported)
    train(config_from_dict(raw))
    tuned = read_pointer(tmp_path / "run" / "checkpoints", "last") or read_pointer(
        tmp_path / "run", "last"
    )
    assert tuned is not None
    after = nll(tuned)
    assert after < before - 0.5, (before, after)
    start, end = load_model(imported)[0].state_dict(), load_model(tuned)[0].state_dict()
    # The run started from the import: its fixed logits bias (no gradient reaches a buffer) is
    # the imported one, where a fresh model would hold zeros.
    assert start["output_bias.bias"].abs().sum() > 0
    assert torch.equal(end["output_bias.bias"], start["output_bias.bias"])

    raw["model"]["d_model"] = 32
    raw["train"]["out_dir"] = str(tmp_path / "run2")
    with pytest.raises(ConfigError, match="model.d_model"):
        train(config_from_dict(raw))


def test_init_from_refuses_another_network_or_tokenizer(marian_dir, tmp_path):
    import yaml

    from seq2seq.data import MANIFEST, TOKENIZER_DIR
    from seq2seq.hf_tokenizer import PieceVocab
    from seq2seq.prepare import data_fingerprint, new_manifest
    from seq2seq.tokenizer import Tokenizer
    from seq2seq.train import train

    imported = tmp_path / "imported"
    hf_import.import_model("marian", marian_dir, imported)
    raw = yaml.safe_load((imported / "config.yaml").read_text())
    raw["data"]["path"] = str(tmp_path / "data")
    raw["train"].update(out_dir=str(tmp_path / "run"), init_from=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="not a model directory"):
        train(config_from_dict(raw))
    raw["train"]["init_from"] = str(imported)
    with pytest.raises(ConfigError, match=r"model\.n_heads is 4 in this run but 2"):
        train(config_from_dict({**raw, "model": {**raw["model"], "n_heads": 4}}))
    # Data already prepared (same settings) with another tokenizer: refused, nothing rewritten.
    config = config_from_dict(raw)
    prepared = config.prepared_dir()
    other = Tokenizer.load(imported / "tokenizer")
    other = Tokenizer("spm_vocab", PieceVocab(other.source.model_proto, other.source.pieces[::-1]))
    other.save(prepared / TOKENIZER_DIR)
    manifest = json.dumps(new_manifest(data_fingerprint(config.data), other))
    (prepared / MANIFEST).write_text(manifest)
    with pytest.raises(ConfigError, match="another tokenizer; set prepare.out_dir"):
        train(config)
    assert (prepared / MANIFEST).read_text() == manifest


def test_new_model_settings_are_validated_and_default_to_the_paper():
    from seq2seq.config import ModelConfig, load_config

    default = ModelConfig()
    assert default.scale_embedding and not default.output_bias and default.activation == "relu"
    with pytest.raises(ConfigError, match="model.activation"):
        config_from_dict({"model": {"activation": "swish"}})
    with pytest.raises(ConfigError, match="model.output_bias"):
        load_config(None, ["model.output_bias=maybe"])
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, ["train.init_from=[1]"])
