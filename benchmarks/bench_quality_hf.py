"""Translation quality at a wall-clock budget, the Hugging Face way: ``Seq2SeqTrainer`` + ``generate``.

    python benchmarks/bench_quality_hf.py --minutes 25                  # de->en, test2016, beam 5
    python benchmarks/bench_quality_hf.py --minutes 1 --test-lines 50   # smoke test
    python benchmarks/bench_quality_hf.py --report DIR [--json FILE]    # figures of a finished run
    python benchmarks/bench_quality_hf.py --decode-only --out DIR       # decode a run's checkpoints again

The peer of ``recipes/multi30k.sh``; ``benchmarks/bench_quality.sh`` runs either (``IMPL=hf`` this
one) into ``benchmarks/.cache/quality/`` and prints the same lines for both with ``--report``,
which reads any run directory, ours or this script's.

What is the same as our recipe (``recipes/configs/multi30k.yaml`` plus the recipe's overrides):
  - data: ``seq2seq.prepare.prepare(config)`` on the same config, i.e. the same joint 8k BPE
    SentencePiece tokenizer and token ids (``TokenizedCorpus``: source pieces + EOS, labels
    pieces + EOS, decoder input BOS + pieces); ``bench_quality.sh`` shares one prepared folder;
  - model: ``to_marian(build_model(config.model, ...))``, a ``MarianMTModel`` with our sizes and
    our initial weights (transformer_small: 3+3 layers, d_model 256, post-norm, sinusoids, ReLU,
    three-way tied embeddings, the recipe's dropout);
  - training: label smoothing 0.1 (``label_smoothing_factor``), peak lr, warmup, Adam betas
    (0.9, 0.98) and eps 1e-9 (AdamW with weight decay 0 is Adam), gradient clipping at norm 1,
    bf16 autocast on CPU, validation loss every ``train.eval_every`` updates, a checkpoint every
    ``train.save_every`` keeping ``train.keep_last``, and a wall-clock budget (a
    ``TrainerCallback`` that stops, evaluates and saves once it is spent; ours does the same);
  - ``train.cooldown``: the callback scales the rate HF's scheduler has just set for the next
    update by ``seq2seq.optim.cooldown_factor`` of its own clock and update count, as ours does;
  - the last ``--average`` checkpoints are averaged (``from_pretrained`` each, mean of the
    weights), like the recipe's ``seq2seq average --last``;
  - test: the same sentences (the recipe's ``export_split.one_line``), beam 5, fp32, detokenized
    with our ``Tokenizer`` and scored with ``seq2seq.evaluate.score`` (sacreBLEU, cased and
    lower-cased), written as ``scores.json`` / ``scores.lc.json`` like the recipe's.

What HF cannot express, and what is used instead:
  - ``data.subword_alpha`` (sampled segmentations, one per epoch): the dataset switches sample at
    each epoch's start (a callback), but the length-grouped sampler keeps the first sample's
    lengths and the batch size is computed on it;
  - batching by a token budget: a fixed ``per_device_train_batch_size`` equal to the mean number
    of sentences in our 4,096-token batches of the same corpus (computed, and printed, at start:
    227 for Multi30k de-en, about 3,500 target tokens per update on average as ours), with
    ``train_sampling_strategy="group_by_length"`` (HF's length-grouped sampler) against padding;
  - the schedule: ``lr_scheduler_type="inverse_sqrt"`` is linear warmup then
    ``sqrt(warmup / step)``, ours' shape, but HF's first update runs at step 0 (rate 0), so every
    HF update uses the rate of our previous one;
  - the length penalty: ours is GNMT, scores / ``((5 + len) / 6) ** alpha``; HF divides by
    ``len ** alpha'``. Only the ratio between candidate lengths matters, so ``alpha'`` is the
    elasticity of GNMT's penalty at the median source length L (EOS included):
    ``alpha' = alpha * L / (5 + L)`` (about 0.45 for alpha 0.6); ``--length-penalty`` overrides.
    As the recipe does, alpha is chosen on the validation set from ``--lenpen-grid`` (each
    alpha's ``alpha'`` at the validation median) and written to ``length_penalty.json``;
  - the length limit: ours is ``max_len_a * source_len + max_len_b`` per sentence, HF has one
    ``max_new_tokens`` per ``generate`` call: that formula on the batch's longest source (batches
    of ``--decode-batch`` sentences sorted by length). PAD and BOS are suppressed, EOS is
    blocked at the first step (``min_new_tokens``), ``early_stopping=False`` (our stopping rule;
    see ``bench_decode.py``).

Timing: "train" runs from this process's start (after the interpreter, before the imports) to the
end of ``trainer.train`` (prepare check, model, ``Trainer`` set-up, training, final evaluation and
save included), like the recipe's train stage process; its peak RSS is ``ru_maxrss`` then
(``prepare`` included when it had to tokenize, so ``bench_quality.sh`` prepares first).
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the heavy imports: our train stage is timed as a process

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait for the hub

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes" / "tools"))
from choose_length_penalty import choose  # noqa: E402
from export_split import one_line  # noqa: E402

from seq2seq.checkpoint import load_trainer_state, read_pointer  # noqa: E402
from seq2seq.config import RunConfig, load_config  # noqa: E402
from seq2seq.data import TokenizedCorpus, batch_indices  # noqa: E402
from seq2seq.evaluate import score  # noqa: E402
from seq2seq.export import to_marian  # noqa: E402
from seq2seq.hardware import resolve_precision  # noqa: E402
from seq2seq.model import build_model  # noqa: E402
from seq2seq.optim import apply_cooldown, cooldown_factor  # noqa: E402
from seq2seq.prepare import prepare  # noqa: E402
from seq2seq.readers import read_parallel  # noqa: E402
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache" / "quality"
DEFAULT_CONFIG = REPO / "recipes" / "configs" / "multi30k.yaml"
IGNORE_INDEX = -100  # HF's label id for "no loss here"
STAGES = "bench/stages.jsonl"  # per-stage wall time and peak RSS, one JSON object a line
SETTINGS = "bench/run.json"
# Ours -> HF: the same shape (warmup, then the same decay), see the module docstring.
HF_SCHEDULES = {"inverse_sqrt": "inverse_sqrt", "constant": "constant_with_warmup"}


# ----------------------------------------------------------------------------- data


class PairDataset(Dataset):
    """A prepared split as HF-style examples: ``input_ids`` (pieces + EOS), ``labels`` (same).

    Given several corpora (the sampled segmentations of ``data.subword_alpha``), epoch ``epoch``
    (from 0, set by the trainer's callback) reads ``corpora[epoch % len(corpora)]``, as ours does.
    """

    def __init__(self, *corpora: TokenizedCorpus) -> None:
        self.corpora, self.epoch = corpora, 0

    def __len__(self) -> int:  # a sample may have lost another over-long example to filtering
        return min(map(len, self.corpora))

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < len(self):
            raise IndexError(i)  # also ends iteration by index, as HF's length grouping does
        corpus = self.corpora[self.epoch % len(self.corpora)]
        source = corpus.source(i).tolist() + [EOS_ID]
        return {"input_ids": source, "labels": corpus.target(i).tolist() + [EOS_ID]}


def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch; ``decoder_input_ids`` = BOS + labels[:-1] (the label smoother needs it)."""
    src_width = max(len(f["input_ids"]) for f in features)
    tgt_width = max(len(f["labels"]) for f in features)
    input_ids = torch.full((len(features), src_width), PAD_ID)
    labels = torch.full((len(features), tgt_width), IGNORE_INDEX)
    decoder_input_ids = torch.full((len(features), tgt_width), PAD_ID)
    for row, feature in enumerate(features):
        source, target = feature["input_ids"], feature["labels"]
        input_ids[row, : len(source)] = torch.tensor(source)
        labels[row, : len(target)] = torch.tensor(target)
        decoder_input_ids[row, : len(target)] = torch.tensor([BOS_ID, *target[:-1]])
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids != PAD_ID,
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }


def sentences_per_batch(corpus: TokenizedCorpus, config: RunConfig) -> int:
    """Mean sentences in our token-budget batches of ``corpus`` (epoch 1): HF's batch size."""
    batches = batch_indices(corpus, config.batch.max_tokens, config.train.seed, epoch=1)
    return max(1, round(len(corpus) / len(batches)))


# ----------------------------------------------------------------------------- training


def train_marian(config: RunConfig, minutes: float, checkpoints: Path) -> tuple[Any, dict]:
    """Train ``to_marian(build_model(config.model))`` with ``Seq2SeqTrainer`` for ``minutes``.

    Returns:
        The trained model and facts about the run (updates, epochs, batch size, losses).
    """
    tc = config.train
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    class WallClockBudget(TrainerCallback):
        """Stop (after evaluating and saving) once ``minutes`` have passed since training began."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            elapsed = time.monotonic() - self.start
            if minutes > 0 and elapsed > minutes * 60:
                control.should_training_stop = True
            if optimizer is not None:  # the scheduler has set the next update's rate: ramp it
                ramp = cooldown_factor(state.global_step + 1, elapsed, budget)
                apply_cooldown(optimizer, ramp, tc.min_lr)
                # HF logs its scheduler's rate, which knows nothing of the ramp.
                if ramp < 1.0 and state.global_step % max(args.logging_steps, 1) == 0:
                    rate = optimizer.param_groups[0]["lr"]
                    print(
                        f"hf: cooldown x{ramp:.3f}: update {state.global_step + 1} at lr {rate:.4g}"
                    )
            if control.should_training_stop:  # max_steps too: like ours, end on a checkpoint
                control.should_save = control.should_evaluate = True
            return control

    budget = dataclasses.replace(tc, max_minutes=minutes)  # train.cooldown's ramp, as ours
    if tc.lr_schedule not in HF_SCHEDULES:
        sys.exit(f"bench_quality_hf: train.lr_schedule={tc.lr_schedule} has no HF equivalent")
    prepared = prepare(config)
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    samples = [TokenizedCorpus(prepared, s) for s in config.data.sampled_splits()]
    train = (
        PairDataset(*samples)
        if samples
        else PairDataset(TokenizedCorpus(prepared, config.data.train_split))
    )
    valid = PairDataset(TokenizedCorpus(prepared, config.data.valid_split))
    batch_size = sentences_per_batch(train.corpora[0], config)

    class SampledEpochs(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            train.epoch = round(state.epoch or 0)

    torch.manual_seed(config.train.seed)  # the same initial weights as our run
    model = to_marian(
        build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size), tokenizer
    )
    # What ``auto`` means for our run of this width on this CPU (bf16 where native), for both.
    precision = resolve_precision(tc.precision, "cpu", config.model.d_model).precision
    args = Seq2SeqTrainingArguments(
        output_dir=str(checkpoints),
        use_cpu=True,
        bf16=precision == "bf16",
        seed=tc.seed,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        train_sampling_strategy="group_by_length",
        max_steps=tc.max_steps if tc.max_steps > 0 else -1,
        num_train_epochs=tc.max_epochs if tc.max_epochs > 0 else 1000,  # the clock stops it
        learning_rate=tc.lr,
        lr_scheduler_type=HF_SCHEDULES[tc.lr_schedule],
        warmup_steps=tc.warmup_steps,
        adam_beta1=tc.adam_betas[0],
        adam_beta2=tc.adam_betas[1],
        adam_epsilon=tc.adam_eps,
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.clip_norm,
        label_smoothing_factor=tc.label_smoothing,
        eval_strategy="steps",
        eval_steps=tc.eval_every,
        save_strategy="steps",
        save_steps=tc.save_every,
        save_total_limit=tc.keep_last,
        logging_steps=tc.log_every,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    print(
        f"hf: MarianMTModel {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
        f"trainable parameters; batch {batch_size} sentences (mean of ours' "
        f"{config.batch.max_tokens}-token batches), length-grouped; "
        f"{getattr(args.optim, 'value', args.optim)} lr {tc.lr} "
        f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} warmup "
        f"{tc.warmup_steps}; bf16 {args.bf16}; budget {minutes:g} min",
        flush=True,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=valid,
        data_collator=collate,
        callbacks=[WallClockBudget(), SampledEpochs()],
    )
    result = trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    facts = {
        "updates": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 3),
        "batch_sentences": batch_size,
        "train_loss": round(result.training_loss, 4),
        "valid_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
    }
    return trainer.model, facts


def average_last(model: Any, checkpoints: Path, k: int) -> list[Path]:
    """Load the mean weights of the last ``k`` (or fewer) ``checkpoint-N`` folders into ``model``."""
    from transformers import MarianMTModel

    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    chosen = found[-k:]
    if not chosen:
        sys.exit(f"bench_quality_hf: no checkpoint-N folder under {checkpoints}")
    total: dict[str, torch.Tensor] = {}
    for path in chosen:
        weights = MarianMTModel.from_pretrained(path, dtype=torch.float32).state_dict()
        for name, tensor in weights.items():
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + tensor.float()
    result = model.load_state_dict({n: t / len(chosen) for n, t in total.items()}, strict=False)
    if result.unexpected_keys:  # an internal invariant: the same class wrote every checkpoint
        raise AssertionError(f"averaged weights the model lacks: {result.unexpected_keys}")
    return chosen


# ----------------------------------------------------------------------------- decoding


def matched_length_penalty(alpha: float, source_lengths: list[int]) -> float:
    """HF ``length_penalty`` with GNMT's elasticity ``alpha * L / (5 + L)`` at the median L."""
    median = statistics.median(source_lengths)
    return alpha * median / (5.0 + median)


@torch.inference_mode()
def translate(
    model: Any,
    sources: list[list[int]],
    config: RunConfig,
    length_penalty: float,
    batch_size: int,
) -> list[list[int]]:
    """Beam search with ``generate``: token ids (no BOS/EOS) for each source (pieces + EOS)."""
    decode = config.decode
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    outputs: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(sources[batch[0]])
        src = torch.tensor([sources[i] + [PAD_ID] * (width - len(sources[i])) for i in batch])
        limit = min(int(decode.max_len_a * width + decode.max_len_b), config.model.max_positions)
        generated = model.generate(
            input_ids=src,
            attention_mask=src != PAD_ID,
            num_beams=decode.beam_size,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping=False,
            max_new_tokens=limit,
            min_new_tokens=decode.min_len,
            suppress_tokens=[PAD_ID, BOS_ID],
            num_return_sequences=1,
        )
        for i, row in zip(batch, generated.tolist()):
            tokens = row[1:]  # the decoder start token
            outputs[i] = tokens[: tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
    return outputs


# ----------------------------------------------------------------------------- report


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def summarize(run_dir: Path) -> dict[str, Any]:
    """The figures of a finished run directory, ours (``recipes/multi30k.sh``) or this script's."""
    settings = _read_json(run_dir / SETTINGS) or {}
    cased, lower = _read_json(run_dir / "scores.json"), _read_json(run_dir / "scores.lc.json")
    if cased is None or lower is None:
        sys.exit(f"bench_quality: {run_dir} has no scores.json / scores.lc.json (not finished?)")
    stages = []
    if (run_dir / STAGES).is_file():
        lines = (run_dir / STAGES).read_text().splitlines()
        stages = [json.loads(line) for line in lines if line.strip()]
    train = [s for s in stages if s["stage"] == "train"]
    total = [s for s in stages if s["stage"] == "total"]
    summary: dict[str, Any] = {
        **settings,
        "run_dir": str(run_dir),
        "sentences": len((run_dir / "test.hyp").read_text(encoding="utf-8").splitlines()),
        "bleu": round(cased["bleu"]["score"], 2),
        "bleu_signature": cased["bleu"]["signature"],
        "bleu_lc": round(lower["bleu"]["score"], 2),
        "bleu_lc_signature": lower["bleu"]["signature"],
        "chrf": round(cased["chrf"]["score"], 2) if "chrf" in cased else None,
        "ter": round(cased["ter"]["score"], 2) if "ter" in cased else None,
        "train_seconds": round(sum(s["seconds"] for s in train), 1) if train else None,
        "train_sessions": len(train),
        "train_max_rss_mib": max(s["max_rss_mib"] for s in train) if train else None,
        "total_seconds": total[-1]["seconds"] if total else None,
        "length_penalty": (_read_json(run_dir / "length_penalty.json") or {}).get("chosen"),
    }
    if train and "updates" in train[-1]:  # this script's run
        summary.update(
            {k: train[-1].get(k) for k in ("updates", "epochs", "batch_sentences", "valid_loss")}
        )
    else:  # ours: the last checkpoint's counters
        last = read_pointer(run_dir, "last")
        if last is not None:
            counters = load_trainer_state(last)["counters"]
            summary.update(updates=int(counters["step"]), epochs=int(counters["epoch"]))
    return summary


def print_summary(s: dict[str, Any]) -> None:
    """The lines ``bench_quality.sh`` prints, the same for ours and HF."""

    def minutes(seconds: float | None) -> str:
        return "?" if seconds is None else f"{seconds / 60:.1f} min"

    impl = {"ours": "ours (recipes/multi30k.sh)", "hf": "hf (MarianMTModel + Seq2SeqTrainer)"}
    print(f"\n== quality: {impl.get(s.get('impl', ''), s.get('impl', '?'))}, {s['run_dir']}")
    print(
        f"task              {s.get('src', '?')} -> {s.get('tgt', '?')}, Multi30k test2016, "
        f"{s['sentences']} sentences, beam 5, budget {float(s.get('max_minutes', 'nan')):g} min"
    )
    lenpen = s.get("length_penalty")
    chosen = "config's" if lenpen is None else f"{lenpen:g}, chosen on validation"
    print(f"length penalty    {chosen}")
    print(f"BLEU              {s['bleu']:.2f}  {s['bleu_signature']}")
    print(f"BLEU lower-cased  {s['bleu_lc']:.2f}  {s['bleu_lc_signature']}")
    if s.get("chrf") is not None:
        print(f"chrF2 / TER       {s['chrf']:.2f} / {s['ter']:.2f}")
    epochs = f" (epoch {s['epochs']})" if s.get("epochs") is not None else ""
    print(f"updates           {s.get('updates', '?')}{epochs}")
    sessions = f", {s['train_sessions']} sessions" if s.get("train_sessions", 1) > 1 else ""
    print(
        f"wall time         train {minutes(s.get('train_seconds'))}{sessions}, "
        f"whole run {minutes(s.get('total_seconds'))}"
    )
    rss = s.get("train_max_rss_mib")
    print(f"train peak RSS    {'?' if rss is None else f'{rss:,.0f} MiB'}")


def report(run_dir: Path, json_path: str | None) -> int:
    summary = summarize(run_dir)
    print_summary(summary)
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- driver


def read_split(config: RunConfig, split: str, max_lines: int) -> tuple[list[str], list[str]]:
    """The first ``max_lines`` (0: all) sources and references of ``split``, as the recipe's
    ``export_split.py`` writes them."""
    sources, references = [], []
    for source, target in read_parallel(config.data, split):
        if max_lines and len(sources) == max_lines:
            break
        sources.append(one_line(source))
        references.append(one_line(target))
    return sources, references


def choose_on_validation(
    model: Any, tokenizer: Tokenizer, config: RunConfig, args: argparse.Namespace, out: Path
) -> float:
    """The GNMT alpha of ``--lenpen-grid`` whose matched HF penalty scores the best validation
    BLEU (the recipe's ``choose_length_penalty.py`` rule); the table goes to length_penalty.json."""
    sources_text, references = read_split(config, config.data.valid_split, args.valid_lines)
    sources = [ids + [EOS_ID] for ids in tokenizer.encode_source_batch(sources_text)]
    rows, signature = [], ""
    for alpha in args.lenpen_grid:
        hf_penalty = matched_length_penalty(alpha, [len(s) for s in sources])
        outputs = translate(model, sources, config, hf_penalty, args.decode_batch)
        hypotheses = [tokenizer.decode_target(tokens) for tokens in outputs]
        bleu = score(hypotheses, [references], ("bleu",))["bleu"]
        signature = str(bleu["signature"])
        rows.append({"alpha": alpha, "hf_length_penalty": hf_penalty, "bleu": bleu["score"],
                     "text": bleu["text"]})  # fmt: skip
        print(f"hf: validation, alpha {alpha:g} (HF {hf_penalty:.3f}): {bleu['text']}", flush=True)
    chosen = choose([(row["alpha"], row["bleu"]) for row in rows])
    result = {"chosen": chosen, "scores": rows, "signature": signature, "sentences": len(sources)}
    (out / "length_penalty.json").write_text(json.dumps(result, indent=1) + "\n")
    return chosen


def _vocab_sizes(config: RunConfig) -> tuple[int, int]:
    tokenizer = Tokenizer.load(config.prepared_dir() / "tokenizer")
    return tokenizer.src_vocab_size, tokenizer.tgt_vocab_size


def _append_stage(out: Path, record: dict[str, Any]) -> None:
    with open(out / STAGES, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="section.key=value settings (as the recipe)")
    parser.add_argument("--data", help="Multi30k folder [$SEQ2SEQ_DATA/multi30k]")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML)")
    parser.add_argument("--src", default="de")
    parser.add_argument("--tgt", default="en")
    parser.add_argument("--minutes", type=float, default=25.0, help="training budget")
    parser.add_argument("--average", type=int, default=3, help="last checkpoints to average")
    parser.add_argument("--test-lines", type=int, default=0, help="first N test sentences, 0 all")
    parser.add_argument("--out", help="run directory [benchmarks/.cache/quality/hf_SRC-TGT]")
    parser.add_argument("--length-penalty", type=float, help="HF length_penalty [matched, above]")
    parser.add_argument(
        "--lenpen-grid",
        nargs="*",
        type=float,
        default=[0.6, 1.0, 1.5, 2.0],
        help="GNMT alphas to choose from on the validation set; none: the config's [%(default)s]",
    )
    parser.add_argument("--valid-lines", type=int, default=0, help="first N validation, 0 all")
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="skip training: average and decode the checkpoints of the run in --out again",
    )
    parser.add_argument("--decode-batch", type=int, default=64, help="sentences per generate")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--report", metavar="DIR", help="only print the figures of run DIR")
    args = parser.parse_args(argv)
    if args.report:
        return report(Path(args.report), args.json)

    data = args.data
    if not data and os.environ.get("SEQ2SEQ_DATA"):
        data = str(Path(os.environ["SEQ2SEQ_DATA"]) / "multi30k")
    if not data or not Path(data).is_dir():
        sys.exit(
            "bench_quality_hf: set SEQ2SEQ_DATA to the shared data folder (holding multi30k/) "
            f"or pass --data MULTI30K_DIR{f'; {data} is not a folder' if data else ''}"
        )
    pair = f"{args.src}-{args.tgt}"
    out = Path(args.out or CACHE / f"hf_{pair}").resolve()
    checkpoints = out / "checkpoints"
    has_checkpoints = any(checkpoints.glob("checkpoint-*"))
    if has_checkpoints and not args.decode_only:
        sys.exit(f"bench_quality_hf: {checkpoints} holds an earlier run; delete {out} first")
    if args.decode_only and not has_checkpoints:
        sys.exit(f"bench_quality_hf: --decode-only: no checkpoint-N folder under {checkpoints}")
    (out / "bench").mkdir(parents=True, exist_ok=True)
    overrides = [
        "data.format=text",
        f"data.path={data}",
        f"data.src_lang={args.src}",
        f"data.tgt_lang={args.tgt}",
        f"train.out_dir={out}",
        f"prepare.out_dir={CACHE / f'data_{pair}'}",  # shared with ours; overridable below
        *args.overrides,
    ]
    config = load_config(args.config, overrides)
    if args.decode_only:
        model = to_marian(
            build_model(config.model, *_vocab_sizes(config)),
            Tokenizer.load(config.prepared_dir() / "tokenizer"),
        )
        # The training run's records stay; its decode is the one redone, and timed, here.
        kept = [line for line in (out / STAGES).read_text().splitlines() if '"decode"' not in line]
        (out / STAGES).write_text("".join(line + "\n" for line in kept))
        facts = {"train_loss": 0.0}
    else:
        settings = {"impl": "hf", "src": args.src, "tgt": args.tgt, "max_minutes": args.minutes}
        settings.update(average=args.average, test_lines=args.test_lines, config=args.config)
        (out / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
        model, facts = train_marian(config, args.minutes, checkpoints)
        _append_stage(
            out,
            {
                "stage": "train",
                "seconds": round(time.monotonic() - STARTED, 1),
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                **facts,
            },
        )
    averaged = average_last(model, checkpoints, args.average)
    print(f"hf: averaged {', '.join(p.name for p in averaged)}", flush=True)

    decode_start = time.monotonic()
    tokenizer = Tokenizer.load(config.prepared_dir() / "tokenizer")
    sources_text, references = read_split(config, config.data.test_split, args.test_lines)
    sources = [ids + [EOS_ID] for ids in tokenizer.encode_source_batch(sources_text)]
    alpha = config.decode.length_penalty
    if args.length_penalty is None and args.lenpen_grid:
        alpha = choose_on_validation(model, tokenizer, config, args, out)
    length_penalty = args.length_penalty
    if length_penalty is None:
        length_penalty = matched_length_penalty(alpha, [len(s) for s in sources])
    print(f"hf: beam {config.decode.beam_size}, length_penalty {length_penalty:.3f} "
          f"(ours: GNMT alpha {alpha:g})", flush=True)  # fmt: skip
    outputs = translate(model, sources, config, length_penalty, args.decode_batch)
    hypotheses = [tokenizer.decode_target(tokens) for tokens in outputs]
    for name, lines in (("test.src", sources_text), ("test.ref", references)):
        (out / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out / "test.hyp").write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    for name, lowercase, metrics in (
        ("scores.json", False, ("bleu", "chrf", "ter")),
        ("scores.lc.json", True, ("bleu",)),
    ):
        scores = score(hypotheses, [references], metrics, lowercase=lowercase)
        text = json.dumps(scores, indent=1, ensure_ascii=False)
        (out / name).write_text(text + "\n", encoding="utf-8")
    _append_stage(out, {"stage": "decode", "seconds": round(time.monotonic() - decode_start, 1)})
    if not args.decode_only:
        _append_stage(out, {"stage": "total", "seconds": round(time.monotonic() - STARTED, 1)})
    if not math.isfinite(facts["train_loss"]):
        print("warning: the training loss is not finite", file=sys.stderr)
    return report(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
