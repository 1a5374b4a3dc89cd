"""Documents from the data tools' inputs: JSON lines or plain text files, optionally gzipped.

Contract:
* ``input_format(path, forced=None)`` is ``"jsonl"`` or ``"text"``: ``forced`` (the
  ``--input-format`` flag) if given, else the extension (``.jsonl``/``.json`` → jsonl;
  ``.txt``/``.text``/``.md`` → text; each also with ``.gz``). Anything else is an ``InputError``
  naming the file and ``--input-format``.
* ``check_inputs(paths, fmt, json_keys)`` raises ``InputError`` before any work for a missing,
  unreadable or empty file, a file that is not UTF-8 at its start, and (JSONL) a first record that is
  not a JSON object or lacks one of ``json_keys`` (the message lists the keys it has).
* ``read_units(path, fmt, text_unit)`` yields ``Unit(where, raw)`` in file order without decoding
  JSON (workers do that): one per non-blank line for JSONL; for text, one per document, where a
  document is a blank-line-separated paragraph (``text_unit="paragraph"``, lines inside it kept with
  their ``\\n``), a non-blank line (``"line"``) or the whole file (``"file"``). Text documents
  keep their characters exactly, except the line terminator (``\\r\\n`` reads as ``\\n``) and the
  trailing newline of the document.
* ``unit_texts(unit, fmt, json_keys)`` is the list of texts of one unit, one per key (text input
  has the single key ``"text"``); a record that is not an object, lacks a key, or holds a non-string
  under it is an ``InputError`` naming file, line and key.
"""

import gzip
import io
import json
from pathlib import Path
from typing import NamedTuple

__all__ = ["InputError", "Unit", "TEXT_UNITS", "input_format", "check_inputs", "read_units", "unit_texts"]

TEXT_UNITS = ("paragraph", "line", "file")
_JSONL = (".jsonl", ".json")
_TEXT = (".txt", ".text", ".md")


class InputError(ValueError):
    """An input cannot be read as documents (the message names the file and what to do)."""


class Unit(NamedTuple):
    where: str  # "file:line" for messages
    raw: str


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def input_format(path, forced=None) -> str:
    if forced is not None:
        if forced not in ("jsonl", "text"):
            raise InputError(f"--input-format {forced!r}: expected 'jsonl' or 'text'")
        return forced
    ext = _suffix(Path(path))
    if ext in _JSONL:
        return "jsonl"
    if ext in _TEXT:
        return "text"
    raise InputError(
        f"--input {path}: cannot tell JSON lines from plain text by the extension {ext or '(none)'!r}; "
        "pass --input-format jsonl or --input-format text"
    )


def _open(path: Path):
    # utf-8-sig: a byte-order mark is an encoding artefact, not text. newline=None turns \r\n into \n.
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline=None)
    return open(path, encoding="utf-8-sig", newline=None)


def check_inputs(paths, fmt, json_keys=("text",)):
    """Up-front refusals; returns the absolute paths."""
    out = []
    for p in paths:
        path = Path(p).absolute()
        if not path.exists():
            raise InputError(f"--input {p}: no such file")
        if path.is_dir():
            raise InputError(f"--input {p}: is a directory; pass the files in it (e.g. {p}/*.jsonl)")
        lineno, head = 0, ""
        try:
            with _open(path) as f:
                if fmt == "jsonl":  # the first record, however long its line
                    for lineno, head in enumerate(f, start=1):
                        if head.strip():
                            break
                else:
                    head = f.read(1 << 16)
        except OSError as err:
            raise InputError(f"--input {p}: cannot be read ({err.strerror or err})") from None
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as err:
            raise InputError(f"--input {p}: not UTF-8 text ({err}); convert it to UTF-8 first") from None
        if not head.strip():
            raise InputError(f"--input {p}: is empty (no text in it)")
        if fmt == "jsonl":
            unit_texts(Unit(f"{path}:{lineno}", head.rstrip("\n")), fmt, json_keys)
        out.append(path)
    return out


def _read_error(path, lineno, err):
    return InputError(f"--input {path}: unreadable near line {lineno} ({err}); the file must be UTF-8 text")


def read_units(path, fmt, text_unit="paragraph"):
    path = Path(path)
    if fmt == "text" and text_unit not in TEXT_UNITS:
        raise InputError(f"--text-unit {text_unit!r}: expected one of {', '.join(TEXT_UNITS)}")
    lineno = 0
    try:
        with _open(path) as f:
            if fmt == "jsonl" or text_unit == "line":
                for lineno, line in enumerate(f, start=1):
                    line = line.rstrip("\n")
                    if line.strip():
                        yield Unit(f"{path}:{lineno}", line)
            elif text_unit == "file":
                text = f.read().rstrip("\n")
                if text.strip():
                    yield Unit(f"{path}:1", text)
            else:
                para, start = [], 0
                for lineno, line in enumerate(f, start=1):
                    line = line.rstrip("\n")
                    if line.strip():
                        if not para:
                            start = lineno
                        para.append(line)
                    elif para:
                        yield Unit(f"{path}:{start}", "\n".join(para))
                        para = []
                if para:
                    yield Unit(f"{path}:{start}", "\n".join(para))
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as err:
        raise _read_error(path, lineno + 1, err) from None


def unit_texts(unit, fmt, json_keys=("text",)):
    if fmt == "text":
        return [unit.raw]
    try:
        record = json.loads(unit.raw)
    except json.JSONDecodeError as err:
        raise InputError(f"{unit.where}: not a JSON record ({err.msg} at column {err.colno}); "
                         "JSON lines input needs one JSON object per line") from None
    if not isinstance(record, dict):
        raise InputError(f"{unit.where}: the record is a JSON {type(record).__name__}, not an object; "
                         "JSON lines input needs one JSON object per line")
    texts = []
    for key in json_keys:
        if key not in record:
            have = ", ".join(map(repr, list(record)[:12])) or "none"
            raise InputError(f"--json-keys {key!r}: {unit.where} has no such key (its keys: {have}); "
                             "pass the key that holds the text, e.g. --json-keys text")
        value = record[key]
        if not isinstance(value, str):
            raise InputError(f"--json-keys {key!r}: {unit.where} holds a {type(value).__name__} under "
                             f"{key!r}, not a string of text")
        texts.append(value)
    return texts
