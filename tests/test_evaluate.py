"""evaluate: our wrapper must report exactly what sacreBLEU and rouge-score compute themselves."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF, TER

from seq2seq.evaluate import EvaluateError, main, perplexity_lm, perplexity_seq2seq, score

HYPS = [
    "The cat sat on the mat.",
    "A dog is running in the park",
    "Two men play football. They are happy!",
    "Ein Mann fährt Fahrrad.",
]
REFS_1 = [
    "The cat is sitting on the mat.",
    "A dog runs through the park.",
    "Two men are playing soccer. They look happy!",
    "Ein Mann fährt ein Fahrrad.",
]
REFS_2 = [
    "the cat sat on a mat .",
    "A dog running in a park",
    "Two guys play football. They are glad!",
    "Ein Mann radelt.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def test_sacrebleu_metrics_match_the_library():
    got = score(HYPS, [REFS_1])
    assert got["bleu"]["score"] == BLEU().corpus_score(HYPS, [REFS_1]).score
    assert got["chrf"]["score"] == CHRF().corpus_score(HYPS, [REFS_1]).score
    ter = TER(case_sensitive=True)
    assert got["ter"]["score"] == ter.corpus_score(HYPS, [REFS_1]).score
    bleu = BLEU()
    bleu.corpus_score(HYPS, [REFS_1])
    assert got["bleu"]["signature"] == str(bleu.get_signature())
    assert "nrefs:1" in got["bleu"]["signature"] and "case:mixed" in got["bleu"]["signature"]
    # Independent of the library: BLEU's definition on cases worked by hand.
    assert score(REFS_1, [REFS_1], ["bleu"])["bleu"]["score"] == pytest.approx(100.0)
    assert score(["x y z w"], [["a b c d"]], ["bleu"])["bleu"]["score"] == 0.0
    # All n-gram precisions 1, hypothesis 4 tokens against 5: brevity penalty exp(1 - 5/4).
    short = score(["a b c d"], [["a b c d e"]], ["bleu"])["bleu"]["score"]
    assert short == pytest.approx(100 * math.exp(1 - 5 / 4))


def test_multi_reference_and_lowercase():
    got = score(HYPS, [REFS_1, REFS_2], lowercase=True)
    assert got["bleu"]["score"] == BLEU(lowercase=True).corpus_score(HYPS, [REFS_1, REFS_2]).score
    assert got["chrf"]["score"] == CHRF(lowercase=True).corpus_score(HYPS, [REFS_1, REFS_2]).score
    ter = TER(case_sensitive=False).corpus_score(HYPS, [REFS_1, REFS_2]).score
    assert got["ter"]["score"] == ter
    assert "nrefs:2" in got["bleu"]["signature"] and "case:lc" in got["bleu"]["signature"]
    # A second reference can only help BLEU, and lowercasing matters for "the cat" vs "The cat".
    assert got["bleu"]["score"] > score(HYPS, [REFS_1], ["bleu"], lowercase=True)["bleu"]["score"]
    cased = score(HYPS, [REFS_1, REFS_2], ["bleu"])["bleu"]["score"]
    assert cased != got["bleu"]["score"]


def test_rouge_matches_rouge_score_with_max_over_references():
    got = score(HYPS, [REFS_1, REFS_2], metrics=["rouge"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        per_sentence = [
            max(scorer.score(ref[i], HYPS[i])[key].fmeasure for ref in (REFS_1, REFS_2))
            for i in range(len(HYPS))
        ]
        assert got[key]["score"] == pytest.approx(100 * sum(per_sentence) / len(HYPS))
    # rougeLsum splits sentences: on multi-sentence text it differs from rougeL's single LCS.
    lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    hyp = "Two men play football.\nThey are happy!"
    want = lsum.score("Two men are playing soccer.\nThey look happy!", hyp)["rougeLsum"].fmeasure
    single = score([HYPS[2]], [[REFS_1[2]]], metrics=["rouge"])
    assert single["rougeLsum"]["score"] == pytest.approx(100 * want)
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_errors_unknown_metric_and_length_mismatch(tmp_path, capsys):
    with pytest.raises(EvaluateError, match="unknown metric"):
        score(HYPS, [REFS_1], ["meteor"])
    with pytest.raises(EvaluateError, match="3 lines, hyps 4"):
        score(HYPS, [REFS_1[:3]])
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS_1[:3]) + "\n", encoding="utf-8")
    assert main(["--hyp", str(hyp), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "hyp.txt has 4 lines" in err and "ref.txt has 3" in err
    ref.write_bytes(b"ok\nbad \xff byte\n")
    assert main(["--hyp", str(hyp), "--ref", str(ref)]) == 2
    assert "ref.txt:2: invalid UTF-8" in capsys.readouterr().err


def test_cli_prints_scores_with_signatures_and_json(tmp_path, capsys):
    hyp, ref1, ref2 = tmp_path / "hyp", tmp_path / "ref1", tmp_path / "ref2"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref1.write_text("\n".join(REFS_1) + "\n", encoding="utf-8")
    ref2.write_text("\r\n".join(REFS_2) + "\r\n", encoding="utf-8")  # CRLF is tolerated
    argv = ["--hyp", str(hyp), "--ref", str(ref1), str(ref2), "--metrics", "bleu,chrf,ter,rouge"]
    assert main(argv + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(score(HYPS, [REFS_1, REFS_2], METRICS_ALL)))
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("BLEU = ") and "nrefs:2|case:mixed" in lines[0]
    assert len(lines) == 3 + 4


METRICS_ALL = ["bleu", "chrf", "ter", "rouge"]


@torch.inference_mode()
def test_perplexity_against_a_direct_computation():
    from seq2seq.config import ModelConfig
    from seq2seq.model import build_model

    config = ModelConfig(
        arch="gpt", d_model=16, n_heads=2, d_ff=32, n_encoder_layers=0, n_decoder_layers=1,
        dropout=0.0, max_positions=8, positions="learned", norm_first=True,
    )  # fmt: skip
    gpt = build_model(config, 10, 10).eval()
    ids = [4, 5, 6, 7, 8, 9, 4, 5, 6, 7, 8]  # 10 predictions: windows of 8 then 2
    got = perplexity_lm(gpt, ids)
    first = torch.log_softmax(gpt(torch.tensor([ids[:8]]))[0], -1)
    second = torch.log_softmax(gpt(torch.tensor([ids[8:10]]))[0], -1)
    nll = -(first[torch.arange(8), torch.tensor(ids[1:9])].sum())
    nll = nll - second[torch.arange(2), torch.tensor(ids[9:11])].sum()
    assert got["tokens"] == 10
    assert got["perplexity"] == pytest.approx(math.exp(float(nll) / 10), rel=1e-5)

    config = ModelConfig(
        d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1, dropout=0.0
    )
    model = build_model(config, 10, 10).eval()
    pairs = [([4, 5], [6, 7, 8]), ([9], [4])]
    got = perplexity_seq2seq(model, pairs, batch_size=1)
    total = 0.0
    for src, tgt in pairs:
        logits = model(torch.tensor([src + [3]]), torch.tensor([[2] + tgt]))[0]
        total -= float(torch.log_softmax(logits, -1)[torch.arange(len(tgt) + 1), tgt + [3]].sum())
    assert got["tokens"] == 6
    assert got["nll"] == pytest.approx(total / 6, rel=1e-5)
    assert perplexity_seq2seq(model, pairs, batch_size=2)["nll"] == pytest.approx(got["nll"])


def test_agrees_with_the_sacrebleu_cli(tmp_path):
    hyp, ref = tmp_path / "hyp", tmp_path / "ref"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS_1) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf"]
    command += ["ter", "--ter-case-sensitive", "-b", "-w", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    cli = [float(value) for value in result.stdout.replace(",", " ").strip("[] \n").split()]
    ours = score(HYPS, [REFS_1])
    assert cli == [round(ours[name]["score"], 4) for name in ("bleu", "chrf", "ter")]
