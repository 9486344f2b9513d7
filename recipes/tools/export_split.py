"""Write one split of a run's corpus as plain text, one example per line, for translate/evaluate.

    python recipes/tools/export_split.py CONFIG.yaml [section.key=value ...] --split test \
        --source OUT/test.src --target OUT/test.ref [--reference FIELD=PATH ...] [--max-lines N]

The corpus is read exactly as training reads it (``seq2seq.readers.read_parallel``: text, gz, tsv,
jsonl or a ``datasets`` name), so the recipes need no format-specific shell code. A line break
inside an example (a dialogue turn, a summary sentence) becomes a space, because ``translate``
and ``evaluate`` take one example per line. ``--reference FIELD=PATH`` writes further references
from another field of the same split (jsonl/hf), e.g. DialogSum's ``summary2``.

For ``data.format=lm`` (one text file) ``--source`` receives the held-out validation text: the
last ``data.valid_fraction`` of the characters, which is exactly what training holds out when
``data.tokenizer=char`` (one id per character); other tokenizers are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from seq2seq.config import ConfigError, load_config
from seq2seq.data import DataError
from seq2seq.readers import read_lm_text, read_parallel
from seq2seq.textio import LINE_BREAKS, atomic_write_text


def one_line(text: str) -> str:
    """``text`` with every line-break character replaced by a space, ends stripped."""
    return text.translate(LINE_BREAKS).strip()


def _write(path: str, lines: list[str]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, "".join(line + "\n" for line in lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--split", required=True, help="split name, e.g. test_2016_flickr")
    parser.add_argument("--source", required=True, help="where to write the sources")
    parser.add_argument("--target", help="where to write the targets (references)")
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="FIELD=PATH",
        help="also write target field FIELD of the split to PATH (repeatable)",
    )
    parser.add_argument("--max-lines", type=int, default=0, help="first N examples only (0: all)")
    args = parser.parse_args(argv)
    try:
        data = load_config(args.config, args.overrides).data
        if data.format == "lm":
            if data.tokenizer != "char":
                raise ConfigError("data.format=lm: only data.tokenizer=char splits by characters")
            text = read_lm_text(data)
            held_out = text[len(text) - int(len(text) * data.valid_fraction) :]
            Path(args.source).write_text(held_out, encoding="utf-8")
            print(f"export_split: {len(held_out)} held-out characters -> {args.source}")
            return 0
        pairs = read_parallel(data, args.split)
        sources, targets = [], []
        for source, target in pairs:
            if args.max_lines and len(sources) == args.max_lines:
                break
            sources.append(one_line(source))
            targets.append(one_line(target))
        _write(args.source, sources)
        if args.target:
            _write(args.target, targets)
        for spec in args.reference:
            field, sep, path = spec.partition("=")
            if not sep or not field or not path:
                parser.error(f"--reference {spec!r} is not FIELD=PATH")
            other = dataclasses.replace(data, tgt_field=field)
            extra = [one_line(t) for _, t in read_parallel(other, args.split)]
            _write(path, extra[: len(sources)])
    except (ConfigError, DataError) as error:
        print(f"export_split: error: {error}", file=sys.stderr)
        return 2
    written = ", ".join(p for p in [args.source, args.target] if p)
    print(f"export_split: {data.path} [{args.split}]: {len(sources)} examples -> {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
