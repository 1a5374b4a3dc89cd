"""Train a SentencePiece tokenizer for Megatron: ``prores-megatron-train-tokenizer`` (also
``python tools/train_tokenizer.py``).

Contract:
* ``train_tokenizer(inputs, output_prefix, vocab_size, ...)`` trains on the documents of
  ``inputs`` (JSON lines with ``json_keys``, or plain text; see ``text_input``) and writes
  ``PREFIX.model`` and ``PREFIX.vocab`` together or not at all (``staged_files``). Every refusal (a
  missing or unreadable input, a JSON key the first record lacks, an existing output without
  ``force``, a bad flag value) is raised as ``TokenizerTrainingError`` naming the flag or file,
  before anything is read or written. A vocabulary larger than the input supports is refused
  naming ``--vocab-size`` and the largest size that works.
* The model is Llama-style, so Megatron (``--tokenizer-type GPTSentencePieceTokenizer
  --tokenizer-model PREFIX.model``) and transformers' Llama conversion read it exactly: BPE (or
  unigram), identity normalisation, whitespace kept as written (no collapsing), digits split,
  byte fallback (no ``<unk>`` for any UTF-8 text), ``<unk>``=0, ``<s>``=1, ``</s>``=2 (Megatron's
  end-of-document token), no pad. With byte fallback, ``decode(encode(x)) == x`` for every string.
* Lines are SentencePiece's training sentences: a document is fed line by line, and a line
  longer than ``MAX_LINE_BYTES`` is cut at spaces rather than dropped.
* Progress goes to ``log`` (stderr in the CLI): reading rate, training time, and a round-trip
  check on a sample of the documents. Returns ``(model_path, vocab_path)``.
"""

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..utils.atomic_output import OutputExistsError, check_outputs, staged_files
from .text_input import TEXT_UNITS, InputError, check_inputs, input_format, read_units, unit_texts
from .tool_exit import run_tool

__all__ = ["train_tokenizer", "TokenizerTrainingError", "main", "MAX_LINE_BYTES"]

MAX_LINE_BYTES = 1 << 16  # SentencePiece silently skips longer training lines (its default is 4192)
_ROUND_TRIP_SAMPLE = 200  # documents checked after training


class TokenizerTrainingError(ValueError):
    """A refusal, with the flag or file to fix in the message."""


def _chunks(line: str):
    """The line, cut at spaces into pieces of at most MAX_LINE_BYTES UTF-8 bytes."""
    if len(line) * 4 <= MAX_LINE_BYTES or len(line.encode("utf-8")) <= MAX_LINE_BYTES:
        yield line
        return
    limit = MAX_LINE_BYTES // 4  # characters: a UTF-8 character is at most 4 bytes
    while line:
        if len(line) <= limit:
            yield line
            return
        cut = line.rfind(" ", 0, limit)
        cut = limit if cut <= 0 else cut
        yield line[:cut]
        line = line[cut:]


class _Feed:
    """The training sentences, with reading progress and a reservoir of documents for the check."""

    def __init__(self, inputs, fmt_of, json_keys, text_unit, log, every_s=5.0):
        self.inputs, self.fmt_of, self.json_keys, self.text_unit = inputs, fmt_of, json_keys, text_unit
        self.log, self.every_s = log, every_s
        self.docs = self.lines = self.chars = 0
        self.sample = []
        self._rng = random.Random(0)
        self.seconds = 0.0
        self.error = None  # SentencePiece turns an exception in its iterator into a RuntimeError
        self.done_reading = None  # when the last line went to SentencePiece

    def __iter__(self):
        try:
            yield from self._lines()
        except BaseException as err:  # noqa: BLE001 - SentencePiece stops; the caller re-raises it
            self.error = err
            raise

    def _lines(self):
        start = last = time.monotonic()
        for path in self.inputs:
            fmt = self.fmt_of[path]
            for unit in read_units(path, fmt, self.text_unit):
                for text in unit_texts(unit, fmt, self.json_keys):
                    if not text.strip():
                        continue
                    self.docs += 1
                    self.chars += len(text)
                    # Reservoir sampling: an unbiased sample of documents for the round-trip check.
                    if len(self.sample) < _ROUND_TRIP_SAMPLE:
                        self.sample.append(text)
                    else:
                        j = self._rng.randrange(self.docs)
                        if j < _ROUND_TRIP_SAMPLE:
                            self.sample[j] = text
                    for line in text.split("\n"):
                        if line.strip():
                            for piece in _chunks(line):
                                self.lines += 1
                                yield piece
                now = time.monotonic()
                if now - last >= self.every_s:
                    last = now
                    self._report(now - start)
        self.seconds = time.monotonic() - start
        self.done_reading = time.monotonic()
        self._report(self.seconds, done=True)

    def _report(self, elapsed, done=False):
        mb = self.chars / 1e6
        self.log(f"{'read' if done else 'reading:'} {self.docs:,} documents, {self.lines:,} lines, "
                 f"{mb:.1f} M characters ({mb / max(elapsed, 1e-9):.1f} M chars/s)")


@contextmanager
def _heartbeat(feed, log, every_s=10.0):
    """A line every ``every_s`` while SentencePiece trains (it releases the GIL; it logs nothing at
    the default level, and unigram training on a few MB takes tens of seconds)."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            if feed.done_reading is not None:
                log(f"training: {time.monotonic() - feed.done_reading:.0f} s")

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _sp_error(err, vocab_size):
    msg = str(err)
    if "Vocabulary size too high" in msg:
        best = msg.rsplit("<=", 1)[-1].strip(" .")
        return TokenizerTrainingError(
            f"--vocab-size {vocab_size}: too large for this input; SentencePiece can build at most "
            f"{best} pieces from it. Pass --vocab-size {best} or less, or train on more text"
        )
    return TokenizerTrainingError(f"SentencePiece training failed: {msg}")


def train_tokenizer(inputs, output_prefix, vocab_size, *, model_type="bpe", input_format_name=None,
                    json_keys=("text",), text_unit="paragraph", byte_fallback=True,
                    character_coverage=0.9995, special_tokens=(), split_digits=True,
                    max_sentences=10_000_000, num_threads=None, seed=1234, force=False,
                    verbose=False, log=print):
    # --- refusals, before any work ---
    try:
        import sentencepiece as spm
    except ImportError:
        raise TokenizerTrainingError("the 'sentencepiece' package is missing: pip install sentencepiece") from None
    if not inputs:
        raise TokenizerTrainingError("--input: give at least one file")
    if model_type not in ("bpe", "unigram"):
        raise TokenizerTrainingError(f"--model-type {model_type!r}: expected bpe or unigram")
    special_tokens = list(special_tokens or ())
    # <unk>, <s>, </s>, the special tokens, the 256 byte pieces, and at least one learned piece.
    smallest = 3 + len(special_tokens) + (256 if byte_fallback else 0) + 1
    if vocab_size is None or vocab_size < smallest:
        raise TokenizerTrainingError(
            f"--vocab-size {vocab_size}: needs at least {smallest} (3 reserved pieces, "
            f"{len(special_tokens)} special tokens{', 256 byte pieces' if byte_fallback else ''} and one "
            "learned piece); typical sizes are 4,000 to 64,000"
        )
    if not 0.9 <= character_coverage <= 1.0:
        raise TokenizerTrainingError(f"--character-coverage {character_coverage}: expected 0.9 to 1.0")
    if num_threads is not None and num_threads < 1:
        raise TokenizerTrainingError(f"--num-threads {num_threads}: expected 1 or more")
    if max_sentences < 0:
        raise TokenizerTrainingError(f"--max-sentences {max_sentences}: expected 0 (all) or more")
    for tok in special_tokens:
        if not tok or tok.isspace():
            raise TokenizerTrainingError(f"--special-tokens {tok!r}: a special token needs visible characters")
        if tok in ("<unk>", "<s>", "</s>"):
            raise TokenizerTrainingError(f"--special-tokens {tok!r}: already in every model (ids 0, 1, 2)")
    if len(set(special_tokens)) != len(special_tokens):
        raise TokenizerTrainingError("--special-tokens: a token is listed twice")
    try:
        fmt_of = {}
        paths = []
        for p in inputs:
            fmt = input_format(p, input_format_name)
            path = check_inputs([p], fmt, json_keys)[0]
            fmt_of[path] = fmt
            paths.append(path)
        if "text" in fmt_of.values() and list(json_keys) != ["text"]:
            raise InputError("--json-keys applies to JSON lines input; plain text has no keys")
        if text_unit not in TEXT_UNITS:
            raise InputError(f"--text-unit {text_unit!r}: expected one of {', '.join(TEXT_UNITS)}")
        prefix = Path(output_prefix)
        if prefix.name in ("", ".", ".."):
            raise TokenizerTrainingError(f"--output-prefix {output_prefix!r}: needs a file name part")
        model_path, vocab_path = check_outputs([f"{prefix}.model", f"{prefix}.vocab"], force, "--output-prefix")
        outputs = [vocab_path, model_path]  # the .model last: it is what readers open
    except (InputError, OutputExistsError) as err:
        raise TokenizerTrainingError(str(err)) from None

    # --- work ---
    threads = num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    feed = _Feed(paths, fmt_of, tuple(json_keys), text_unit, log)
    log(f"training a {model_type} SentencePiece model, vocabulary {vocab_size:,}, on {len(paths)} file(s) "
        f"with {threads} thread(s)")
    spm.set_random_generator_seed(seed)  # the sample of --max-sentences lines, when the input has more
    start = time.monotonic()
    with staged_files(outputs, force) as tmp, tempfile.TemporaryDirectory(
        prefix=".sp-train-", dir=outputs[0].parent
    ) as work:
        try:
            with _heartbeat(feed, log):
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(feed),
                    model_prefix=os.path.join(work, "m"),
                    model_type=model_type,
                    vocab_size=vocab_size,
                    character_coverage=character_coverage,
                    byte_fallback=byte_fallback,
                    split_digits=split_digits,
                    # Llama-style normalisation: the text as written, so encoding is exactly reversible.
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    allow_whitespace_only_pieces=True,
                    add_dummy_prefix=True,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                    user_defined_symbols=special_tokens,
                    max_sentence_length=MAX_LINE_BYTES,
                    input_sentence_size=max_sentences,
                    shuffle_input_sentence=True,
                    num_threads=threads,
                    minloglevel=0 if verbose else 1,
                )
        except RuntimeError as err:
            if feed.error is not None:
                raise feed.error from None
            if feed.docs == 0:
                raise TokenizerTrainingError(f"--input: no text in {', '.join(map(str, paths))}") from None
            raise _sp_error(err, vocab_size) from None
        trained = time.monotonic() - start - feed.seconds
        os.replace(os.path.join(work, "m.model"), tmp[outputs[1]])
        os.replace(os.path.join(work, "m.vocab"), tmp[outputs[0]])
        sp = spm.SentencePieceProcessor(model_file=str(tmp[outputs[1]]))
        exact, tokens, chars = 0, 0, 0
        for text in feed.sample:
            ids = sp.encode(text)
            exact += sp.decode(ids) == text
            tokens += len(ids)
            chars += len(text)
    log(f"trained in {trained:.1f} s (reading {feed.seconds:.1f} s); {sp.get_piece_size():,} pieces; "
        f"{chars / max(tokens, 1):.2f} characters per token on {len(feed.sample)} sampled documents")
    if exact != len(feed.sample):
        log(f"warning: decode(encode(text)) differs from the text on {len(feed.sample) - exact} of "
            f"{len(feed.sample)} sampled documents{'' if byte_fallback else ' (byte fallback is off)'}")
    else:
        log(f"round trip exact on all {len(feed.sample)} sampled documents")
    log(f"wrote {outputs[1]} and {outputs[0]}")
    log(f"use it in Megatron with: --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model {outputs[1]}")
    return outputs[1], outputs[0]


def build_parser():
    p = argparse.ArgumentParser(
        prog="prores-megatron-train-tokenizer",
        description="Train a SentencePiece tokenizer (Llama-style: BPE, byte fallback, exact round trip) "
        "for Megatron's --tokenizer-type GPTSentencePieceTokenizer.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSON lines (.jsonl/.json) or plain text (.txt/.text/.md) files, optionally .gz")
    p.add_argument("--output-prefix", "--model-prefix", required=True, dest="output_prefix",
                   help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces, including <unk>, <s>, </s> and the 256 byte pieces")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="default bpe (as Llama)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys holding the text (default: text)")
    p.add_argument("--input-format", choices=("jsonl", "text"), help="override the format the extension implies")
    p.add_argument("--text-unit", choices=TEXT_UNITS, default="paragraph",
                   help="plain text: what one document is (default paragraph: blank-line separated)")
    p.add_argument("--special-tokens", nargs="+", default=[], metavar="TOKEN",
                   help="user-defined symbols: always one piece, also where they appear in text")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest use byte fallback (default 0.9995)")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="map characters outside the vocabulary to <unk> instead of UTF-8 bytes")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false",
                   help="let numbers form multi-digit pieces")
    p.add_argument("--max-sentences", type=int, default=10_000_000,
                   help="lines kept in memory for training, a uniform sample if there are more (0 = all)")
    p.add_argument("--num-threads", type=int, help="training threads (default: the usable cores)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the line sample (default 1234)")
    p.add_argument("--force", action="store_true", help="replace existing outputs (once the new ones are complete)")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own training log")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)

    def work(log):
        train_tokenizer(
            args.input, args.output_prefix, args.vocab_size, model_type=args.model_type,
            input_format_name=args.input_format, json_keys=args.json_keys, text_unit=args.text_unit,
            byte_fallback=args.byte_fallback, character_coverage=args.character_coverage,
            special_tokens=args.special_tokens, split_digits=args.split_digits,
            max_sentences=args.max_sentences, num_threads=args.num_threads, seed=args.seed,
            force=args.force, verbose=args.verbose, log=log,
        )

    return run_tool(work, (TokenizerTrainingError, InputError))


if __name__ == "__main__":
    sys.exit(main())
