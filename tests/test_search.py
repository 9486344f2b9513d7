"""Search tests: scripted-probability decoders with hand-derived answers, and a tiny real model
checked against brute-force enumeration and uncached decoding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seq2seq.search import (
    NEG_INF,
    beam_search,
    block_tokens,
    greedy,
    length_penalty,
    row_topk,
    sample,
    sentence_topk,
    top_k_filter,
    top_p_filter,
)
from seq2seq.tokenizer import BOS_ID, EOS_ID

A, B = 4, 5  # the two "word" tokens of the scripted vocabulary (0-3 are specials)
VOCAB = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


class ScriptedDecoder:
    """Next-token probabilities from ``script(sentence, prefix) -> {token: prob}`` (missing = 0).

    Each row remembers its own sentence and prefix, so a wrong ``reorder`` by the search shows up
    as wrong probabilities. Every call is logged to check that finished sentences leave the batch.
    """

    def __init__(self, script, batch_size: int):
        self.script = script
        self.rows = [(sentence, ()) for sentence in range(batch_size)]
        self.batch_sizes: list[int] = []

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        assert tokens.shape == (len(self.rows),)
        self.batch_sizes.append(len(self.rows))
        out = torch.full((len(self.rows), VOCAB), NEG_INF)
        new_rows = []
        for i, ((sentence, prefix), token) in enumerate(zip(self.rows, tokens.tolist())):
            if token != BOS_ID:
                prefix = prefix + (token,)
            new_rows.append((sentence, prefix))
            for tok, prob in self.script(sentence, prefix).items():
                out[i, tok] = math.log(prob)
        self.rows = new_rows
        return out

    def reorder(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


def tree(table):
    """A script from a prefix table; unlisted prefixes always end (EOS with probability 1)."""
    return lambda sentence, prefix: table.get(prefix, {EOS_ID: 1.0})


# Sentence 0: greedy takes A (.5) then B (.6) then EOS: P = .30. Beam 2 also finds "B EOS" (.36).
TABLE_0 = {
    (): {A: 0.5, B: 0.4, EOS_ID: 0.1},
    (A,): {EOS_ID: 0.3, A: 0.1, B: 0.6},
    (B,): {EOS_ID: 0.9, A: 0.05, B: 0.05},
}
# Sentence 1: a longer best path, A A A EOS.
TABLE_1 = {
    (): {A: 0.7, B: 0.2, EOS_ID: 0.1},
    (A,): {A: 0.8, EOS_ID: 0.2},
    (A, A): {A: 0.9, EOS_ID: 0.1},
    (B,): {B: 0.5, EOS_ID: 0.5},
}


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def test_beam_scripted_exact_hypotheses_and_scores():
    decoder = ScriptedDecoder(tree(TABLE_0), 1)
    (hyps,) = beam_search(decoder, 1, beam_size=2, max_len=lengths(10), nbest=2)
    assert [h.tokens for h in hyps] == [[B], [A, B]]
    assert hyps[0].score == pytest.approx(math.log(0.4 * 0.9))
    assert hyps[1].score == pytest.approx(math.log(0.5 * 0.6))
    assert hyps[0].log_prob == pytest.approx(hyps[0].score)  # alpha = 0: raw sums
    # The first step expands from one row per sentence, then k beams.
    assert decoder.batch_sizes[:2] == [1, 2]


def test_greedy_scripted_and_beam_one_equals_greedy():
    (hyp,) = greedy(ScriptedDecoder(tree(TABLE_0), 1), 1, max_len=lengths(10))
    assert hyp.tokens == [A, B]
    assert hyp.log_prob == pytest.approx(math.log(0.5 * 0.6 * 1.0))
    tables = [TABLE_0, TABLE_1]
    script = lambda sentence, prefix: tree(tables[sentence])(sentence, prefix)
    greedy_hyps = greedy(ScriptedDecoder(script, 2), 2, max_len=lengths(10, 10))
    beam_hyps = beam_search(ScriptedDecoder(script, 2), 2, beam_size=1, max_len=lengths(10, 10))
    assert [h.tokens for h in greedy_hyps] == [[A, B], [A, A, A]]
    assert [h[0].tokens for h in beam_hyps] == [h.tokens for h in greedy_hyps]
    assert [h[0].log_prob for h in beam_hyps] == [h.log_prob for h in greedy_hyps]


@pytest.mark.parametrize("alpha, winner", [(0.0, [B]), (1.0, [B]), (1.5, [A, B])])
def test_length_penalty_flips_the_winner(alpha, winner):
    # log(.36)/lp(2) vs log(.30)/lp(3) with lp(n) = ((5+n)/6)^alpha: "A B" wins once alpha > ~1.23.
    (hyps,) = beam_search(
        ScriptedDecoder(tree(TABLE_0), 1), 1, 2, lengths(10), length_penalty_alpha=alpha, nbest=2
    )
    assert hyps[0].tokens == winner
    expected = {(B,): math.log(0.36) / (7 / 6) ** alpha, (A, B): math.log(0.30) / (8 / 6) ** alpha}
    for hyp in hyps:
        assert hyp.score == pytest.approx(expected[tuple(hyp.tokens)])
    assert hyps[0].score >= hyps[1].score
    assert length_penalty(3, alpha) == pytest.approx((8 / 6) ** alpha)


def test_batched_equals_one_at_a_time_and_finished_sentences_leave():
    tables = [TABLE_0, TABLE_1, TABLE_0]
    script = lambda sentence, prefix: tree(tables[sentence])(sentence, prefix)
    max_len = lengths(10, 10, 2)
    decoder = ScriptedDecoder(script, 3)
    batched = beam_search(decoder, 3, beam_size=2, max_len=max_len, nbest=2)
    for sentence in range(3):
        one = lambda _, prefix, s=sentence: script(s, prefix)
        alone = beam_search(
            ScriptedDecoder(one, 1), 1, 2, max_len[sentence : sentence + 1], nbest=2
        )
        assert alone[0] == batched[sentence]
    # Sentence 2 stops at max_len 2 and sentence 0 after step 2, so the batch shrinks to 1 sentence.
    assert decoder.batch_sizes[:2] == [3, 6]
    assert decoder.batch_sizes[-1] == 2
    assert batched[1][0].tokens == [A, A, A]
    assert batched[1][0].log_prob == pytest.approx(math.log(0.7 * 0.8 * 0.9 * 1.0))
    # max_len 2 = one token then forced EOS.
    assert [h.tokens for h in batched[2]] == [[B], [A]]
    assert batched[2][1].log_prob == pytest.approx(math.log(0.5 * 0.3))


def test_max_len_forces_eos_and_min_len_blocks_it():
    always_a = lambda sentence, prefix: {A: 0.6, B: 0.3, EOS_ID: 0.1}
    (hyp,) = greedy(ScriptedDecoder(always_a, 1), 1, max_len=lengths(3))
    assert hyp.tokens == [A, A]
    assert hyp.log_prob == pytest.approx(math.log(0.6 * 0.6 * 0.1))
    (hyps,) = beam_search(ScriptedDecoder(always_a, 1), 1, 3, lengths(3), nbest=3)
    assert all(len(h.tokens) == 2 for h in hyps)  # EOS before step 3 never ranks in the top k
    assert hyps[0].tokens == [A, A]

    stop_early = tree({(): {EOS_ID: 0.7, A: 0.2, B: 0.1}, (A,): {EOS_ID: 0.6, B: 0.4}})
    assert greedy(ScriptedDecoder(stop_early, 1), 1, lengths(10), min_len=0)[0].tokens == []
    (hyp,) = greedy(ScriptedDecoder(stop_early, 1), 1, lengths(10), min_len=2)
    assert hyp.tokens == [A, B]
    assert hyp.log_prob == pytest.approx(math.log(0.2 * 0.4 * 1.0))
    (hyps,) = beam_search(ScriptedDecoder(stop_early, 1), 1, 2, lengths(10), min_len=1, nbest=2)
    assert [h.tokens for h in hyps] == [[A], [B]]  # "EOS" alone is blocked by min_len=1


def test_no_repeat_ngram():
    always_a = lambda sentence, prefix: {A: 0.6, B: 0.3, EOS_ID: 0.1}
    # Bigrams: A A, then A is banned after A (A A seen) -> B; B A is new; then A A and A B seen.
    (hyp,) = greedy(ScriptedDecoder(always_a, 1), 1, lengths(10), no_repeat_ngram_size=2)
    assert hyp.tokens == [A, A, B, A]
    (hyp,) = greedy(ScriptedDecoder(always_a, 1), 1, lengths(10), no_repeat_ngram_size=1)
    assert hyp.tokens == [A, B]
    (hyps,) = beam_search(ScriptedDecoder(always_a, 1), 1, 3, lengths(8), no_repeat_ngram_size=2)
    bigrams = list(zip(hyps[0].tokens, hyps[0].tokens[1:]))
    assert len(bigrams) == len(set(bigrams)) and len(hyps[0].tokens) >= 3


def test_block_tokens_masks():
    log_probs = torch.log_softmax(torch.randn(2, VOCAB), dim=-1)
    history = torch.tensor([[A, B, A], [B, B, A]])
    out = block_tokens(log_probs, 3, history, lengths(10, 4), min_len=5, no_repeat_ngram_size=2)
    # row 0: "A B" seen, last token A -> B banned; row 1 is at its max_len -> only EOS.
    assert torch.isinf(out[0, [0, 2, EOS_ID, B]]).all() and torch.isfinite(out[0, [1, A]]).all()
    assert out[1, EOS_ID] == log_probs[1, EOS_ID]
    assert torch.isinf(out[1, [0, 1, 2, A, B]]).all()


def test_nbest_ordering_and_validation():
    (hyps,) = beam_search(ScriptedDecoder(tree(TABLE_1), 1), 1, 4, lengths(10), nbest=4)
    scores = [h.score for h in hyps]
    assert scores == sorted(scores, reverse=True) and len(hyps) == 4
    assert len({tuple(h.tokens) for h in hyps}) == 4
    with pytest.raises(ValueError, match="nbest"):
        beam_search(ScriptedDecoder(tree(TABLE_1), 1), 1, 2, lengths(10), nbest=3)


# "A EOS" (.81) finishes at the second step, when every other extension is below .1, so no
# active beam can beat it any more.
TABLE_EARLY = {
    (): {A: 0.9, B: 0.1},
    (A,): {EOS_ID: 0.9, A: 0.1},
    (B,): {EOS_ID: 0.5, B: 0.5},
}


def test_beam_stops_once_the_nbest_are_finished_and_unbeatable():
    # alpha = 0: scores only fall, so the search may stop when the nbest-th finished hypothesis
    # beats every active beam, without waiting for beam_size finished ones.
    early = ScriptedDecoder(tree(TABLE_EARLY), 1)
    (one,) = beam_search(early, 1, beam_size=3, max_len=lengths(10), nbest=1)
    full = ScriptedDecoder(tree(TABLE_EARLY), 1)
    (three,) = beam_search(full, 1, beam_size=3, max_len=lengths(10), nbest=3)
    assert [h.tokens for h in one] == [[A]] and one[0].score == pytest.approx(math.log(0.81))
    assert [(h.tokens, h.score) for h in one] == [(h.tokens, h.score) for h in three[:1]]
    assert len(early.batch_sizes) == 2 < len(full.batch_sizes)
    # With a length penalty a longer output may still win, so beam_size finished ones are awaited.
    slow = ScriptedDecoder(tree(TABLE_EARLY), 1)
    beam_search(slow, 1, beam_size=3, max_len=lengths(10), nbest=1, length_penalty_alpha=1.0)
    assert len(slow.batch_sizes) > 1


@pytest.mark.parametrize("width", [8000, 8003, 700, 37])
def test_row_topk_equals_torch_topk(width):
    generator = torch.Generator().manual_seed(width)
    values = torch.randn(9, width, generator=generator)
    values[:, :3] = NEG_INF  # blocked tokens, as the search leaves them
    values[4] = NEG_INF
    values[4, -2:] = torch.tensor([0.5, 1.5])  # a row with fewer finite entries than k
    top, where = row_topk(values, 10)
    expected = values.topk(10, dim=1).values
    assert torch.equal(top, expected)
    assert torch.equal(values.gather(1, where), top)
    finite = torch.isfinite(top)
    assert all(len(set(row[ok].tolist())) == int(ok.sum()) for row, ok in zip(where, finite))


@pytest.mark.parametrize("width", [8000, 8003, 700, 37])
def test_sentence_topk_equals_torch_topk_over_all_beams(width):
    """The best 10 of each sentence's 5 beams x ``width`` summed scores, with the beam and token
    each came from, as one topk over the whole (n, 5 x width) table would rank them."""
    generator = torch.Generator().manual_seed(width)
    n, beams = 4, 5
    log_probs = torch.log_softmax(torch.randn(n * beams, width, generator=generator) * 3, dim=1)
    log_probs[:, :3] = NEG_INF  # blocked tokens, as the search leaves them
    log_probs[7] = NEG_INF  # a beam whose every extension is blocked
    scores = torch.randn(n, beams, generator=generator) * 4
    scores[2, 1:] = NEG_INF  # dead beams of sentence 2
    top, beam, token = sentence_topk(log_probs, scores, 2 * beams)
    table = scores[:, :, None] + log_probs.view(n, beams, width)
    assert torch.equal(top, table.view(n, -1).topk(2 * beams, dim=1).values)
    finite = torch.isfinite(top)
    assert torch.equal(table[torch.arange(n)[:, None], beam, token][finite], top[finite])
    for row_beam, row_token, ok in zip(beam, token, finite):
        pairs = list(zip(row_beam[ok].tolist(), row_token[ok].tolist()))
        assert len(set(pairs)) == len(pairs)  # no extension counted twice


def test_top_k_and_top_p_filters_hand_computed():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()
    assert kept(top_k_filter(logits, 2)) == [False, True, False, True]
    assert kept(top_k_filter(logits, 0)) == [True] * 4
    # sorted .4 .3 .2 .1: mass before = 0 .4 .7 .9 -> p=.7 keeps {.4,.3}; p=.71 adds .2.
    assert kept(top_p_filter(logits, 0.7)) == [False, True, False, True]
    assert kept(top_p_filter(logits, 0.71)) == [False, True, True, True]
    assert kept(top_p_filter(logits, 0.05)) == [False, True, False, False]
    assert kept(top_p_filter(logits, 1.0)) == [True] * 4
    kept_values = top_k_filter(logits, 3)
    assert torch.equal(kept_values[0, 1:], logits[0, 1:])


def test_sample_seeded_and_top_k_one_is_greedy():
    def script(sentence, prefix):
        return {A: 0.5, B: 0.3, EOS_ID: 0.2} if len(prefix) % 2 else {B: 0.6, A: 0.4}

    def run(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        start = torch.full((4,), BOS_ID)
        return sample(ScriptedDecoder(script, 4), start, 12, generator=generator, **kwargs)

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert run(3, top_k=1) == [[B, A, B, A, B, A, B, A, B, A, B, A]] * 4
    assert run(3, temperature=0.0) == run(5, top_k=1)
    stopped = run(1, eos_id=EOS_ID)
    assert all(EOS_ID not in row for row in stopped) and any(len(r) < 12 for r in stopped)


# ----------------------------------------------------------------- a tiny real model


def tiny_transformer(vocab: int = VOCAB, seed: int = 0):
    from seq2seq.config import ModelConfig
    from seq2seq.model import build_model

    torch.manual_seed(seed)
    config = ModelConfig(
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_encoder_layers=1,
        n_decoder_layers=2,
        dropout=0.0,
        max_positions=16,
    )
    return build_model(config, vocab, vocab).eval()


class UncachedDecoder:
    """Re-runs the full ``forward`` over each row's whole prefix at every step (no KV cache)."""

    def __init__(self, model, src: torch.Tensor):
        self.model, self.src = model, src
        self.prefix = torch.empty(src.size(0), 0, dtype=torch.long)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prefix = torch.cat([self.prefix, tokens[:, None]], dim=1)
        return torch.log_softmax(self.model(self.src, self.prefix)[:, -1].float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        self.src, self.prefix = self.src[index], self.prefix[index]


def sequence_log_prob(model, src: torch.Tensor, tokens: list[int]) -> float:
    tgt_in = torch.tensor([[BOS_ID] + tokens])
    log_probs = torch.log_softmax(model(src, tgt_in)[0].float(), dim=-1)
    return float(log_probs[torch.arange(len(tokens) + 1), torch.tensor(tokens + [EOS_ID])].sum())


@torch.inference_mode()
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_equals_brute_force(alpha):
    from seq2seq.search import TransformerDecoder

    model = tiny_transformer()
    src = torch.tensor([[4, 5, 4, EOS_ID]])
    max_len = 4  # at most 3 tokens + EOS, from {UNK, A, B}: 39 sequences with min_len=1
    words = [1, A, B]
    every = [list(seq) for n in range(1, max_len) for seq in itertools.product(words, repeat=n)]
    brute = sorted(
        (
            (sequence_log_prob(model, src, seq) / length_penalty(len(seq) + 1, alpha), seq)
            for seq in every
        ),
        reverse=True,
    )
    (hyps,) = beam_search(
        TransformerDecoder(model, src),
        1,
        beam_size=40,
        max_len=lengths(max_len),
        length_penalty_alpha=alpha,
        nbest=10,
    )
    assert [h.tokens for h in hyps] == [seq for _, seq in brute[:10]]
    assert [h.score for h in hyps] == pytest.approx([score for score, _ in brute[:10]], abs=1e-5)


def padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [0] * (width - len(row)) for row in rows])


SOURCES = [[4, 5, 4, 4, 5, EOS_ID], [5, EOS_ID], [4, 4, 5, EOS_ID]]


@torch.inference_mode()
def test_real_model_batched_equals_one_by_one_and_cached_equals_uncached():
    from seq2seq.search import TransformerDecoder

    model = tiny_transformer(seed=1)
    src = padded(SOURCES)
    max_len = lengths(8, 3, 6)
    kwargs = dict(beam_size=3, max_len=max_len, length_penalty_alpha=0.6, nbest=3)
    batched = beam_search(TransformerDecoder(model, src), 3, **kwargs)
    uncached = beam_search(UncachedDecoder(model, src), 3, **kwargs)
    for got, want in zip(batched, uncached):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
    for i, row in enumerate(SOURCES):
        kwargs["max_len"] = max_len[i : i + 1]
        (alone,) = beam_search(TransformerDecoder(model, torch.tensor([row])), 1, **kwargs)
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], abs=1e-4)
        # Every returned score is the model's own (length-normalised) sequence log-probability.
        for hyp in alone:
            want = sequence_log_prob(model, torch.tensor([row]), hyp.tokens)
            assert hyp.log_prob == pytest.approx(want, abs=1e-4)


@torch.inference_mode()
def test_real_model_beam_one_equals_greedy_and_cached_step_log_probs():
    from seq2seq.search import TransformerDecoder

    model = tiny_transformer(seed=2)
    src = padded(SOURCES)
    max_len = lengths(8, 8, 8)
    greedy_hyps = greedy(TransformerDecoder(model, src), 3, max_len, length_penalty_alpha=0.6)
    beam_hyps = beam_search(TransformerDecoder(model, src), 3, 1, max_len, length_penalty_alpha=0.6)
    assert [h[0].tokens for h in beam_hyps] == [h.tokens for h in greedy_hyps]
    assert [h[0].score for h in beam_hyps] == pytest.approx([h.score for h in greedy_hyps])

    cached, uncached = TransformerDecoder(model, src), UncachedDecoder(model, src)
    tokens = torch.full((3,), BOS_ID)
    for _ in range(5):
        got, want = cached.step(tokens), uncached.step(tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        index = torch.tensor([2, 0, 0])  # follow a reordering, with a repeated row
        cached.reorder(index)
        uncached.reorder(index)
        tokens = got.argmax(dim=-1)[index]
