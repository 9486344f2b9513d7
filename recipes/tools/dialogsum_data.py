"""Lay out the DialogSum files as the dialogsum recipe's config reads them (``data.format=jsonl``).

    python recipes/tools/dialogsum_data.py DIALOGSUM_DIR OUT_DIR [--valid 50]

Reads ``DIALOGSUM_DIR/dialogsum.{dev,test}.jsonl`` (Chen et al. 2021; the training split is not
shipped with the shared data) and writes into ``OUT_DIR``:

    train.jsonl   the dev dialogues but the last ``--valid``: {"dialogue", "summary"}
    valid.jsonl   the last ``--valid`` dev dialogues (validation loss)
    test.jsonl    the test dialogues: {"dialogue", "summary" (= summary1), "summary1".."summary3"}

Line breaks between turns become spaces (the ``#Person1#:`` tags still mark turns), because
translate and evaluate take one example per line; training sees the text the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export_split import one_line  # a sibling script: recipes/tools is on sys.path when run


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """The records of ``path``, keeping ``fields``; a missing field names the file and line.

    Raises:
        ValueError: unreadable file, invalid JSON, or a record without one of ``fields``.
    """
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON: {error.msg}") from None
        missing = [name for name in fields if not isinstance(record.get(name), str)]
        if missing:
            raise ValueError(f"{path}:{number}: no text field(s) {missing}")
        records.append({name: one_line(record[name]) for name in fields})
    return records


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dialogsum_dir", type=Path, help="folder with dialogsum.{dev,test}.jsonl")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--valid", type=int, default=50, help="dev dialogues held out")
    args = parser.parse_args(argv)
    try:
        dev = read_jsonl(args.dialogsum_dir / "dialogsum.dev.jsonl", ("dialogue", "summary"))
        test = read_jsonl(
            args.dialogsum_dir / "dialogsum.test.jsonl",
            ("dialogue", "summary1", "summary2", "summary3"),
        )
    except (OSError, ValueError) as error:
        print(f"dialogsum_data: error: {error}", file=sys.stderr)
        return 2
    if not 0 < args.valid < len(dev):
        parser.error(f"--valid must lie in 1..{len(dev) - 1}")
    for record in test:
        record["summary"] = record["summary1"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": dev[: -args.valid], "valid": dev[-args.valid :], "test": test}
    for name, records in splits.items():
        write_jsonl(args.out_dir / f"{name}.jsonl", records)
    counts = ", ".join(f"{name} {len(records)}" for name, records in splits.items())
    print(f"dialogsum_data: {counts} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
