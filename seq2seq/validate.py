"""Validation during training: loss per target token over the validation split, and greedy BLEU.

Every rank scores its share (batch ``r`` of every ``world_size``) and the sums are all-reduced, so
the figures are those of the whole split whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import sacrebleu
import torch
from torch import nn

from seq2seq import distributed
from seq2seq.config import BatchConfig, DecodeConfig
from seq2seq.data import Batch, LMCorpus, TokenizedCorpus, batch_indices, collate, lm_eval_batches
from seq2seq.decoding import translate_ids
from seq2seq.loss import label_smoothed_nll
from seq2seq.tokenizer import EOS_ID, Tokenizer

BLEU_BATCH_SENTENCES = 64


def forward(net: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits ``(b, t, v)``: encoder-decoder when the batch has a source, else decoder-only."""
    if batch.src is None:
        return net(batch.tgt_in)
    return net(batch.src, batch.tgt_in)


def validation_batches(
    corpus: TokenizedCorpus | LMCorpus, batch: BatchConfig, seed: int
) -> list[Batch]:
    """The fixed validation batches: the epoch-0 token-budget list, or ``eval_batches`` LM blocks."""
    if isinstance(corpus, LMCorpus):
        return lm_eval_batches(corpus, batch.block_size, batch.batch_size, batch.eval_batches, seed)
    return [collate(corpus, i) for i in batch_indices(corpus, batch.max_tokens, seed, 0)]


@torch.no_grad()
def validation_loss(
    net: nn.Module,
    batches: list[Batch],
    info: distributed.DistInfo,
    label_smoothing: float,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    """``valid_loss`` (label-smoothed), ``valid_nll`` and ``valid_ppl`` per target token.

    ``net`` is put in eval mode; this rank scores ``batches[rank::world_size]``.
    """
    net.eval()
    device = info.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches[info.rank :: info.world_size]:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(net, batch)
        loss, nll, n_tokens = label_smoothed_nll(logits, batch.tgt_out, label_smoothing)
        sums += torch.stack([loss, nll, n_tokens]).double()
    loss_sum, nll_sum, tokens = distributed.all_reduce_sum(sums).tolist()
    tokens = max(tokens, 1.0)
    return {
        "valid_loss": loss_sum / tokens,
        "valid_nll": nll_sum / tokens,
        "valid_ppl": math.exp(min(nll_sum / tokens, 50.0)),
    }


@torch.no_grad()
def validation_bleu(
    model: nn.Module,
    corpus: TokenizedCorpus,
    tokenizer: Tokenizer,
    info: distributed.DistInfo,
    n_sentences: int,
    decode: DecodeConfig,
    max_positions: int,
) -> float:
    """Greedy-decode the first ``n_sentences`` validation sources; corpus sacreBLEU.

    References are the prepared target ids decoded back to text (the examples that survived the
    length filter), so the score tracks progress but is not the final test-set number. Decoding
    is :func:`seq2seq.decoding.translate_ids`, as ``translate`` does, with the length limit of
    ``decode`` (``max_len_a * source length + max_len_b``, at most ``max_positions``, which is
    the model's ``config.max_positions``).
    """
    model.eval()
    n_sentences = min(len(corpus), n_sentences)
    mine = np.arange(n_sentences)[info.rank :: info.world_size]
    mine = mine[np.argsort(corpus.src_lengths[mine], kind="stable")]  # less padding per batch
    # Greedy with the search's default constraints, whatever the beam and n-gram settings.
    greedy = dataclasses.replace(decode, beam_size=1, nbest=1, min_len=1, no_repeat_ngram_size=0)
    pairs = []
    for chunk in np.array_split(mine, max(1, math.ceil(len(mine) / BLEU_BATCH_SENTENCES))):
        if len(chunk) == 0:
            continue
        sources = [corpus.source(i).tolist() + [EOS_ID] for i in chunk.tolist()]
        hypotheses = [nbest[0] for nbest in translate_ids(model, sources, greedy, info.device)]
        for index, hypothesis in zip(chunk.tolist(), hypotheses):
            reference = tokenizer.decode_target(corpus.target(index).tolist())
            pairs.append((index, tokenizer.decode_target(hypothesis.tokens), reference))
    gathered = sorted(p for part in distributed.all_gather_objects(pairs) for p in part)
    hypotheses = [hypothesis for _, hypothesis, _ in gathered]
    references = [reference for _, _, reference in gathered]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score
