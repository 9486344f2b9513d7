"""The scripted decoder step computes what the eager step computes, bit for bit, and stands aside
wherever it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from seq2seq import kernels
from seq2seq.config import DecodeConfig, ModelConfig
from seq2seq.decoding import quantize_int8, translate_ids
from seq2seq.model import build_model
from seq2seq.sample import generate_ids
from seq2seq.scripted import ScriptedStep, attach
from seq2seq.search import GPTDecoder, greedy
from seq2seq.tokenizer import BOS_ID, EOS_ID

VOCAB = 50

ARCHITECTURES = {
    "paper": dict(),  # post-norm, ReLU, sinusoids, tied output
    "pre-norm": dict(
        norm_first=True,
        activation="gelu",
        positions="learned",
        bias=False,
        tie_output=False,
        share_embeddings=False,
        output_bias=True,
    ),  # fmt: skip
    "silu": dict(activation="silu", scale_embedding=False),
    "gpt": dict(arch="gpt", norm_first=True, activation="gelu_tanh"),
}


def small_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
        max_positions=40, **ARCHITECTURES[name],
    )  # fmt: skip
    model = build_model(config, VOCAB, VOCAB).eval()
    if name == "pre-norm":  # a non-zero output bias, as an imported Marian model has
        model.decoder.output_bias.bias.copy_(torch.linspace(-1, 1, VOCAB))
    return model


def prepared_pair(name: str, precision: str, onednn: bool, monkeypatch):
    """(eager, scripted): one prepared model, its scripted step detached in the first."""
    monkeypatch.setattr(kernels, "onednn_float32_linear_is_faster", lambda: onednn)
    model = small_model(name)
    if precision == "int8":
        model = quantize_int8(model, "cpu")
    kernels.prepare_cpu_decoding(model)
    assert isinstance(model.decoder.scripted_step, ScriptedStep)
    eager = copy.deepcopy(model)  # a copy gets no graph: it holds the original's parameters
    assert eager.decoder.scripted_step is None
    return eager, model


def onednn_choices() -> list[bool]:
    available = torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )
    return [False, True] if available else [False]


def sources(seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [9, 3, 7, 1, 12, 5]
    return [torch.randint(4, VOCAB, (n,), generator=generator).tolist() + [EOS_ID] for n in lengths]


@pytest.mark.parametrize("onednn", onednn_choices())
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["paper", "pre-norm", "silu"])
def test_scripted_search_equals_eager_search_exactly(name, precision, onednn, monkeypatch):
    """Greedy and beam search (beams moving between rows, sentences leaving the batch, the
    cross-attention cache shared by a source's beams) find the same hypotheses with the same
    scores, to the last bit, as the eager step."""
    eager, scripted = prepared_pair(name, precision, onednn, monkeypatch)
    for beam in (1, 4):
        decode = DecodeConfig(beam_size=beam, nbest=beam, max_len_a=0.0, max_len_b=15)
        expected = translate_ids(eager, sources(), decode)
        got = translate_ids(scripted, sources(), decode)
        assert [[(h.tokens, h.score) for h in n] for n in got] == [
            [(h.tokens, h.score) for h in n] for n in expected
        ]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_scripted_step_logits_equal_eager_logits_bitwise(precision, monkeypatch):
    """Step by step through a reorder that repeats and drops rows; the cache grows past its
    first capacity (16 positions) on the way."""
    eager, scripted = prepared_pair("paper", precision, True, monkeypatch)
    src = torch.tensor([row + [0] * (13 - len(row)) for row in sources()])
    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        states = [m.start_decoding(m.encode(src)) for m in (eager, scripted)]
        tokens = torch.full((6, 1), BOS_ID)
        for position in range(20):
            logits = [m.decode_step(tokens, s) for m, s in zip((eager, scripted), states)]
            assert torch.equal(logits[0], logits[1]), position
            if position == 5:
                index = torch.tensor([4, 4, 0, 1, 5])
                for state in states:
                    state.reorder(index)
            tokens = torch.randint(4, VOCAB, (tokens.shape[0] if position != 5 else 5, 1),
                                   generator=generator)  # fmt: skip
        assert states[1].length == states[0].length == 20
        assert states[1].layers[0].buffers[0].shape[0] >= 20
        for a, b in zip(states[0].layers, states[1].layers):
            assert torch.equal(a.self_key, b.self_key) and torch.equal(a.self_value, b.self_value)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_scripted_gpt_continues_an_eager_prompt_exactly(precision, monkeypatch):
    """A prompt of several tokens fills the cache eagerly; the scripted steps continue it."""
    eager, scripted = prepared_pair("gpt", precision, True, monkeypatch)
    prompt = torch.randint(4, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    max_len = torch.full((3,), 12)
    with torch.inference_mode():
        runs = [greedy(GPTDecoder(m, prompt), 3, max_len, eos_id=-1) for m in (eager, scripted)]
    assert [(h.tokens, h.log_prob) for h in runs[0]] == [(h.tokens, h.log_prob) for h in runs[1]]


def test_seeded_gpt_sampling_draws_the_same_text_through_the_graph(monkeypatch):
    """`seq2seq sample` prepares its model: one row per step, where the graph saves the most
    (2.4x the tokens/s on the Shakespeare GPT, benchmarks/RESULTS.md); the same draws."""
    eager, scripted = prepared_pair("gpt", "fp32", True, monkeypatch)
    draws = [
        generate_ids(m, [5, 6, 7], 60, 0.9, 10, 0.95, torch.Generator().manual_seed(4))
        for m in (small_model("gpt"), eager, scripted)
    ]  # 60 new tokens from a 3-token prompt run past max_positions=40: the window moves
    assert draws[0] == draws[1] == draws[2]


def test_scripted_step_stands_aside_outside_cpu_inference(monkeypatch):
    """With gradients, in training mode, under autocast, for several tokens or once the model is
    cast to another dtype the eager step runs; in float32 inference it is the graph."""
    _, model = prepared_pair("paper", "fp32", False, monkeypatch)
    step = model.decoder.scripted_step
    calls = []
    graph = step.graph
    step.graph = lambda *args: calls.append(1) or graph(*args)
    src = torch.tensor([sources()[0]])
    bos = torch.full((1, 1), BOS_ID)

    def decode_one(tokens=bos):
        state = model.start_decoding(model.encode(src))
        return model.decode_step(tokens, state)

    with torch.inference_mode():
        decode_one()
    assert len(calls) == 1
    decode_one()  # gradients on
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decode_one()
    with torch.no_grad():
        decode_one(torch.full((1, 3), BOS_ID))
        model.train()
        decode_one()
    model.eval().to(torch.bfloat16)  # no longer the float32 model the graph was built for
    with torch.inference_mode():
        decode_one()
    assert len(calls) == 1


def test_scripted_step_keeps_the_position_limit_and_the_state_dict(monkeypatch):
    _, model = prepared_pair("paper", "fp32", True, monkeypatch)
    keys = set(small_model("paper").state_dict())
    assert set(model.state_dict()) == keys  # the graph is not a registered module
    src = torch.tensor([sources()[0]])
    with torch.inference_mode():
        state = model.start_decoding(model.encode(src))
        for _ in range(40):
            model.decode_step(torch.full((1, 1), 7), state)
        with pytest.raises(ValueError, match="max_positions=40"):
            model.decode_step(torch.full((1, 1), 7), state)


def test_attach_leaves_a_model_it_does_not_cover_eager():
    """A layer kind the graph does not know (here a bfloat16 model) keeps the eager step."""
    model = small_model("paper").to(torch.bfloat16)
    assert attach(model.decoder) is None and model.decoder.scripted_step is None
    decode = DecodeConfig(beam_size=2, max_len_a=0.0, max_len_b=5)
    assert len(translate_ids(model, sources()[:2], decode)) == 2
