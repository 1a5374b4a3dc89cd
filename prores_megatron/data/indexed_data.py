"""Text or JSON lines → Megatron indexed dataset: ``prores-megatron-preprocess-data`` (also
``python tools/preprocess_data.py``), Megatron-LM's ``tools/preprocess_data.py`` conventions.

Contract:
* Flags as in Megatron-LM: ``--input`` (one or more files; JSON lines or plain text, see
  ``text_input``), ``--json-keys`` (default ``text``), ``--output-prefix OUT``, ``--append-eod``,
  ``--workers N``, ``--log-interval``, and Megatron's own tokenizer flags (``--tokenizer-type``,
  ``--tokenizer-model``, ``--vocab-file``, ... taken from ``megatron.training.arguments``, so they
  are spelled and defaulted as in ``pretrain_gpt``). Plain text also takes ``--text-unit``
  (``paragraph``: a blank-line-separated paragraph is a document, the default; ``line``; ``file``).
* Output per key: ``OUT_{key}_document.bin`` and ``.idx`` (plain text: key ``text``), written through
  megatron-core's ``IndexedDatasetBuilder`` with ``DType.optimal_dtype(vocab size)``: one sequence
  per document, the tokenizer's ``eod`` appended with ``--append-eod``, documents that tokenize to
  nothing skipped (and counted). Pass ``--data-path OUT_text_document`` to Megatron.
* Refusals (exit 2, ``error:`` naming the flag or file): missing/unreadable/empty input, a JSON key
  the first record lacks, an existing output without ``--force``, a missing tokenizer file, a
  tokenizer Megatron cannot build, ``--append-eod`` without an end-of-document token. All are
  checked before the slow imports and before any output is opened; a bad record later in the
  input stops the run naming its file and line. Outputs appear complete or not at all
  (``staged_files``; the ``.idx`` files last). Megatron's default sample-index cache for the prefix
  (``OUT_{key}_document/cache/GPTDataset_indices``, which would go stale) is removed when a dataset
  is written; a cache under ``--data-cache-path`` is the user's to clear.
* ``--workers N > 1`` tokenizes in a process pool (``imap``, chunks of ``CHUNK`` documents, order
  kept: the output does not depend on N). Progress (documents, docs/s, MB/s, tokens) goes to stderr
  every ``--log-interval`` documents and at least every 10 s.
"""

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

from ..utils.atomic_output import OutputExistsError, check_outputs, staged_files
from .text_input import TEXT_UNITS, InputError, check_inputs, input_format, read_units, unit_texts
from .tool_exit import run_tool

__all__ = ["main", "parse_args", "preprocess", "PreprocessError", "CHUNK"]

CHUNK = 32  # documents per task sent to a worker (Megatron-LM's choice): amortises the pickling
_FILE_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer",
                    "SFTTokenizer")


class PreprocessError(ValueError):
    """A refusal, with the flag or file to fix in the message."""


# ---------------------------------------------------------------- flags

def _own_flags(p):
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSON lines (.jsonl/.json) or plain text (.txt/.text/.md) files, optionally .gz; "
                        "processed in order into one dataset")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys of the JSON records to extract (default: text)")
    g.add_argument("--input-format", choices=("jsonl", "text"), help="override the format the extension implies")
    g.add_argument("--text-unit", choices=TEXT_UNITS, default="paragraph",
                   help="plain text: one document per blank-line-separated paragraph (default), per line, or per file")
    g.add_argument("--split-sentences", action="store_true", help="not supported (sentence-level datasets are for BERT)")
    g = p.add_argument_group("tokenization process")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_{key}_document.bin/.idx")
    g.add_argument("--force", action="store_true", help="replace existing outputs (once the new ones are complete)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1: no pool)")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    return p


def _early_parser():
    # Only what the up-front checks need; parse_known_args leaves Megatron's other flags alone.
    p = argparse.ArgumentParser(prog="prores-megatron-preprocess-data", add_help=False)
    _own_flags(p)
    p.add_argument("--tokenizer-type")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    return p


def build_parser():
    """The full parser (imports megatron.training.arguments for the tokenizer flags: slow)."""
    import warnings

    with warnings.catch_warnings():
        # That import pulls in the model specs, which warn about Apex / Transformer Engine: noise
        # for a tool that only tokenizes.
        warnings.simplefilter("ignore", UserWarning)
        from megatron.training.arguments import _add_tokenizer_args

    p = argparse.ArgumentParser(
        prog="prores-megatron-preprocess-data",
        description="Tokenize text or JSON lines into a Megatron indexed dataset (OUT_{key}_document.bin/.idx).",
    )
    _own_flags(p)
    _add_tokenizer_args(p)
    return p


def _outputs(prefix, keys):
    bins = [Path(f"{prefix}_{k}_document.bin") for k in keys]
    return bins, [b.with_suffix(".idx") for b in bins]


def _early_checks(a):
    """Every refusal that needs no Megatron import; returns (paths, formats, keys, outputs)."""
    if a.split_sentences:
        raise PreprocessError("--split-sentences is not supported: GPT datasets are document-level "
                              "(sentence-level datasets are for BERT); drop the flag")
    if a.workers < 1:
        raise PreprocessError(f"--workers {a.workers}: expected 1 or more")
    if a.log_interval < 1:
        raise PreprocessError(f"--log-interval {a.log_interval}: expected 1 or more")
    if not a.tokenizer_type:
        raise PreprocessError("--tokenizer-type is required (e.g. GPTSentencePieceTokenizer with "
                              "--tokenizer-model FILE.model)")
    if len(set(a.json_keys)) != len(a.json_keys):
        raise PreprocessError(f"--json-keys {' '.join(a.json_keys)}: a key is listed twice")
    try:
        fmts = [input_format(p, a.input_format) for p in a.input]
        if "text" in fmts and a.json_keys != ["text"]:
            raise PreprocessError("--json-keys applies to JSON lines input; plain text is written as key 'text'")
        keys = ["text"] if set(fmts) == {"text"} else list(a.json_keys)
        paths = [check_inputs([p], f, a.json_keys)[0] for p, f in zip(a.input, fmts)]
        if Path(a.output_prefix).name in ("", ".", ".."):
            raise PreprocessError(f"--output-prefix {a.output_prefix!r}: needs a file name part")
        bins, idxs = _outputs(a.output_prefix, keys)
        outputs = check_outputs(bins + idxs, a.force, "--output-prefix")
    except (InputError, OutputExistsError) as err:
        raise PreprocessError(str(err)) from None
    if a.tokenizer_type in _FILE_TOKENIZERS:
        if not a.tokenizer_model:
            raise PreprocessError(f"--tokenizer-type {a.tokenizer_type} needs --tokenizer-model FILE")
        if not Path(a.tokenizer_model).is_file():
            raise PreprocessError(f"--tokenizer-model {a.tokenizer_model}: no such file")
    for flag, value in (("--vocab-file", a.vocab_file), ("--merge-file", a.merge_file)):
        if value and not Path(value).is_file():
            raise PreprocessError(f"{flag} {value}: no such file")
    return paths, fmts, keys, outputs


def parse_args(argv=None):
    """Early checks first (fast, exact messages), then the full Megatron-aware parse."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        build_parser().parse_args(argv)  # prints the help and exits
    early, _ = _early_parser().parse_known_args(argv)
    checked = _early_checks(early)
    args = build_parser().parse_args(argv)
    # Megatron-LM's preprocess_data sets these for build_tokenizer; rank 1 keeps it from logging.
    args.rank = 1
    args.make_vocab_size_divisible_by = 128
    args.tensor_model_parallel_size = 1
    return args, checked


# ---------------------------------------------------------------- tokenizing (also in workers)

_TOKENIZER = None  # per process: built once (each spawned worker builds its own)
_STATE = {}


def _build_tokenizer(args):
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    return build_tokenizer(args)


def _worker_context():
    """Never fork this process: one that already runs threads (torch's, gloo's, a caller's) can fork
    while another thread holds a lock, and the worker hangs forever (seen in this project's tests).
    A forkserver is a fresh single-threaded process that imports the tokenizer code once and forks
    the workers from there (and serves later pools of this process); spawn where there is none.
    Each worker builds its own tokenizer once (``_init_worker``)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["prores_megatron.data.indexed_data", "megatron.core.tokenizers.utils.build_tokenizer"])
    return ctx


def _init_worker(args, fmt_keys, append_eod, limit):
    global _TOKENIZER
    if _TOKENIZER is None:  # a spawned worker
        _TOKENIZER = _build_tokenizer(args)
    _STATE.update(fmt_keys=fmt_keys, append_eod=append_eod, limit=limit)


def _encode(job):
    """(unit, fmt) -> ([ids array or None per key], UTF-8 bytes read)."""
    import numpy as np

    unit, fmt = job
    keys = _STATE["fmt_keys"]
    texts = unit_texts(unit, fmt, keys)
    out = []
    for text in texts:
        ids = _TOKENIZER.tokenize(text) if text else []
        if len(ids) == 0:
            out.append(None)
            continue
        arr = np.asarray(ids, dtype=np.int64)
        if _STATE["append_eod"]:
            arr = np.append(arr, _TOKENIZER.eod)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _STATE["limit"]:
            raise PreprocessError(f"{unit.where}: token id {hi if hi > _STATE['limit'] else lo} does not fit "
                                  f"the dataset's dtype (0..{_STATE['limit']}); the tokenizer's vocab_size "
                                  "understates its ids")
        out.append(arr)
    return out, len(unit.raw.encode("utf-8"))


# ---------------------------------------------------------------- the run

def _drop_stale_index_cache(prefix, log):
    """Remove Megatron's cached sample indices for a dataset being (re)written.

    Without --data-cache-path, GPTDataset caches them in PREFIX/cache/GPTDataset_indices, keyed by
    path, split, seed and sequence length but not by the data: after the data changes, Megatron
    would silently reuse windows computed for the old documents."""
    import shutil

    cache = Path(prefix) / "cache" / "GPTDataset_indices"
    if cache.is_dir():
        shutil.rmtree(cache)
        log(f"removed {cache}: Megatron's sample indices for the data being replaced")
        for d in (cache.parent, cache.parent.parent):
            try:
                d.rmdir()  # only if now empty
            except OSError:
                break


def _jobs(paths, fmts, text_unit):
    for path, fmt in zip(paths, fmts):
        for unit in read_units(path, fmt, text_unit):
            yield unit, fmt


def preprocess(args, checked, log=print):
    """Write the dataset(s); returns {key: output prefix}."""
    global _TOKENIZER
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    paths, fmts, keys, outputs = checked
    start = time.monotonic()
    try:
        tokenizer = _build_tokenizer(args)
    except Exception as err:  # Megatron raises ValueError, AssertionError, OSError, ... here
        raise PreprocessError(f"--tokenizer-type {args.tokenizer_type} (--tokenizer-model "
                              f"{args.tokenizer_model}): Megatron cannot build this tokenizer: {err}") from None
    eod = None
    if args.append_eod:
        try:
            eod = int(tokenizer.eod)
        except Exception:  # noqa: BLE001 - tokenizers without one raise different errors
            eod = None
        if eod is None or eod < 0:
            raise PreprocessError(f"--append-eod: the {args.tokenizer_type} tokenizer has no end-of-document "
                                  "token (a SentencePiece model needs eos_id >= 0); drop --append-eod or use one that has")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    limit = int(np.iinfo(dtype).max)
    _TOKENIZER = tokenizer
    bins, idxs = outputs[: len(keys)], outputs[len(keys):]
    log(f"tokenizer {args.tokenizer_type}: vocabulary {tokenizer.vocab_size:,}, token dtype {np.dtype(dtype).name}"
        f"{f', end-of-document id {eod}' if eod is not None else ', no end-of-document token appended'}")
    log(f"reading {', '.join(map(str, paths))} with {args.workers} worker(s)")

    docs = skipped = 0
    nbytes = 0
    tokens = dict.fromkeys(keys, 0)
    written = dict.fromkeys(keys, 0)
    init = (args, keys, eod is not None, limit)
    pool = None
    with staged_files(bins + idxs, args.force, markers=len(idxs)) as tmp:
        builders = {k: IndexedDatasetBuilder(str(tmp[b]), dtype=dtype) for k, b in zip(keys, bins)}
        try:
            if args.workers > 1:
                pool = _worker_context().Pool(args.workers, initializer=_init_worker, initargs=init)
                results = pool.imap(_encode, _jobs(paths, fmts, args.text_unit), CHUNK)
            else:
                _init_worker(*init)
                results = map(_encode, _jobs(paths, fmts, args.text_unit))
            begin = last = time.monotonic()
            for arrays, size in results:
                docs += 1
                nbytes += size
                for key, arr in zip(keys, arrays):
                    if arr is None:
                        skipped += 1
                        continue
                    builders[key].add_document(arr, [arr.size])
                    tokens[key] += arr.size
                    written[key] += 1
                now = time.monotonic()
                if docs % args.log_interval == 0 or now - last >= 10:
                    last = now
                    el = max(now - begin, 1e-9)
                    log(f"processed {docs:,} documents ({docs / el:,.0f} docs/s, {nbytes / el / 1e6:.2f} MB/s), "
                        f"{sum(tokens.values()):,} tokens")
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
            if not any(written.values()):
                raise PreprocessError(f"--input: no text in {', '.join(map(str, paths))} (every document is empty)")
            for key, idx in zip(keys, idxs):
                builders[key].finalize(str(tmp[idx]))
            for b in bins:
                _drop_stale_index_cache(str(b)[: -len(".bin")], log)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            for b in builders.values():
                b.data_file.close()  # harmless after finalize; frees the file on failure
    el = max(time.monotonic() - begin, 1e-9)
    log(f"done: {docs:,} documents, {nbytes / 1e6:.2f} MB tokenized in {el:.1f} s ({docs / el:,.0f} docs/s, "
        f"{nbytes / el / 1e6:.2f} MB/s; {time.monotonic() - start:.1f} s with start-up)"
        + (f"; {skipped:,} empty document(s) skipped" if skipped else ""))
    prefixes = {}
    for key, b in zip(keys, bins):
        prefix = str(b)[: -len(".bin")]
        prefixes[key] = prefix
        log(f"wrote {prefix}.bin/.idx: {written[key]:,} documents, {tokens[key]:,} tokens ({np.dtype(dtype).name})")
    log(f"use it in Megatron with: --data-path {prefixes[keys[0]]} --tokenizer-type {args.tokenizer_type}"
        + (f" --tokenizer-model {args.tokenizer_model}" if args.tokenizer_model else ""))
    return prefixes


def main(argv=None):
    def work(log):
        args, checked = parse_args(argv)
        preprocess(args, checked, log)

    return run_tool(work, (PreprocessError, InputError))


if __name__ == "__main__":
    sys.exit(main())
