"""The ``seq2seq`` command: ``seq2seq SUBCOMMAND ...`` runs ``python -m seq2seq.MODULE ...``."""

from __future__ import annotations

import ctypes.util
import importlib
import os
import sys

# Process settings that PyTorch and OpenMP read once, when torch is first imported, so they can only
# be set here, at the command-line edge, before any subcommand imports torch (and never by
# ``import seq2seq``, which must not change the environment of a program that imports us). A value
# the user already set wins. recipes/tools/stages.sh and .ci/run export the same defaults for
# ``python -m seq2seq.<module>`` runs.
PROCESS_DEFAULTS = {
    # Idle OpenMP threads sleep instead of spinning. Spinning made two-thread runs 6-40x slower when
    # the cores were shared (benchmarks/RESULTS.md); this depends on the load, not on the CPU class.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Large CPU tensors (a step's logits are ~100 MB) go on transparent huge pages instead of being
    # page-faulted in 4 KiB at a time (13% of a Multi30k run's CPU time went to page faults). It is
    # a no-op where the kernel's THP setting is "never", so it is safe on every machine.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def configure_process() -> None:
    """Set :data:`PROCESS_DEFAULTS` that the user has not set; call before torch is imported."""
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)


def tcmalloc_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to run this command again in with tcmalloc preloaded, or None to go on.

    glibc's allocator keeps the freed activations of batches of varying shapes in a fragmented
    heap: a Multi30k training process grew to 3.8 GB, 6.8x the tensors an update needs, and kept
    growing; under gperftools' tcmalloc the same run peaked at 1.9 GB, flat, with a tenth of the
    system time (benchmarks/bench_memory.py, RESULTS.md). A preload must be in place when the
    process starts, hence the new run. Nothing changes where tcmalloc is not installed (Debian and
    Ubuntu: ``libtcmalloc-minimal4``), when ``LD_PRELOAD`` is already set, or with
    ``SEQ2SEQ_ALLOCATOR=system``.
    """
    if environ.get("SEQ2SEQ_ALLOCATOR", "tcmalloc") != "tcmalloc" or environ.get("LD_PRELOAD"):
        return None
    library = ctypes.util.find_library("tcmalloc_minimal")
    if library is None:
        return None
    return {**environ, "LD_PRELOAD": library}


# subcommand -> (module, one-line help). Each module exposes ``main(argv) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("seq2seq.prepare", "tokenize and binarize a corpus once"),
    "average": ("seq2seq.average", "average checkpoints into a model directory"),
    "train": ("seq2seq.train", "train a model from a YAML config with key=value overrides"),
    "translate": ("seq2seq.translate", "translate text line by line with beam search"),
    "sample": ("seq2seq.sample", "generate text from a GPT model directory"),
    "evaluate": ("seq2seq.evaluate", "BLEU/chrF/TER/ROUGE with signatures, or perplexity"),
    "attention": ("seq2seq.attention", "draw attention maps for a sentence or prompt"),
    "export": ("seq2seq.export", "export a model directory to Hugging Face MarianMTModel"),
    "import": ("seq2seq.hf_import", "import a Hugging Face Marian or GPT-2 directory as a model"),
    "serve": ("seq2seq.serve", "serve model directories over HTTP, with a page at /"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = ["usage: seq2seq SUBCOMMAND [ARGS ...]", "", "subcommands:"]
        lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
        print(
            "\n".join(lines),
            file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr,
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nseq2seq: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module_name, _ = SUBCOMMANDS[argv[0]]
    configure_process()
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:]) or 0)


def run() -> None:
    """The program (console script ``seq2seq``, ``python -m seq2seq``): :func:`main` in a process
    that runs under tcmalloc where it is installed. Only the program replaces itself, never a
    caller of :func:`main` (a test, a notebook)."""
    argv = sys.argv[1:]
    preloaded = tcmalloc_environment(dict(os.environ))
    if preloaded is not None and argv and argv[0] in SUBCOMMANDS:
        # The same command again, same process id, before torch is loaded.
        os.execve(sys.executable, [sys.executable, "-m", "seq2seq", *argv], preloaded)
    sys.exit(main(argv))


if __name__ == "__main__":
    run()
