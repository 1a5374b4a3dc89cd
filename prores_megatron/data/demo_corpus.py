"""The demo corpus: about 3.4 MB of real English text that a fresh machine gets from PyPI.

Contract:
* ``fetch_demo_corpus(cache_dir=None, log=print)`` returns the path of ``corpus.jsonl`` (one JSON
  object per line: ``text``, ``source``, ``title``) in ``cache_dir`` (default
  ``$XDG_CACHE_HOME/prores-megatron/demo-corpus``, i.e. ``~/.cache/...``), building it on first use:
  it runs ``pip download --no-deps`` (never installs) for the pinned packages in ``SOURCES``, takes
  the text files out of them, checks each against its pinned SHA-256, keeps them under ``raw/``,
  turns them into documents (``_documents``) and writes the corpus, a ``manifest.json`` (its SHA-256,
  sizes, counts) and ``PROVENANCE.md`` (sources, licences, what was changed). Later calls check the
  corpus against its manifest and touch no network; a damaged cache is rebuilt (from ``raw/`` when
  that is intact). Everything is written under a temporary name and renamed, so an interrupted
  build leaves no corpus behind.
* Refusals (``CorpusError``): the package index is unreachable and nothing is cached (the message
  says where the cache lives and how to bring one), a downloaded file differs from its pinned hash
  (the upstream package changed), the cache directory is not writable.
* Documents: each Wikipedia article section, each Lee news story, and each chapter of Botchan is a
  document; they are shuffled with a fixed seed so that Megatron's document-level ``--split`` draws
  validation documents from every source. Text is Unicode NFC, with single spaces, one paragraph
  per line, and nothing but the work itself (no markup, licence boilerplate or hard line wraps).
* ``python -m prores_megatron.data.demo_corpus [--cache-dir DIR]`` prints the path.
"""

import argparse
import bz2
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import NamedTuple

from ..utils.atomic_output import staged_directory, write_file_atomic
from .wiki_markup import wiki_sections

__all__ = ["fetch_demo_corpus", "CorpusError", "SOURCES", "CORPUS_VERSION", "CORPUS_SHA256", "default_cache_dir"]

CORPUS_VERSION = 1  # bump when the document building changes: the cache lives under v<N>/
# The corpus this code builds from the pinned files; a mismatch means the building changed (bump the
# version) or a library it relies on (NFC tables, XML parser) behaves differently here.
CORPUS_SHA256 = "7210c5a3bb25c68e6db7eac70884044e76f6368a47182f0f01a31e9b7cfa2f91"
_SEED = 20260305  # the document shuffle


class Source(NamedTuple):
    name: str  # the file under raw/
    requirement: str  # what pip downloads
    pip_args: tuple  # how: a fixed wheel (same bytes on every machine) or the source distribution
    member: str  # the file inside the archive
    sha256: str


# One wheel for every machine: the members are data files, identical in all of gensim's wheels, but
# pinning one platform makes the download itself the same everywhere.
_GENSIM = ("gensim==4.4.0", ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                             "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"))
# Only sentencepiece from source (its test data is not in the wheels); its build tools as wheels.
_SENTENCEPIECE = ("sentencepiece==0.2.3", ("--no-binary=sentencepiece",))

SOURCES = (
    Source("enwiki-shortened.xml.bz2", *_GENSIM,
           "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
           "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"),
    Source("lee_background.cor", *_GENSIM, "gensim/test/test_data/lee_background.cor",
           "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"),
    Source("lee.cor", *_GENSIM, "gensim/test/test_data/lee.cor",
           "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e"),
    Source("botchan.txt", *_SENTENCEPIECE, "sentencepiece-0.2.3/test/botchan.txt",
           "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"),
)

PROVENANCE = """\
# Demo corpus provenance (prores-megatron, corpus v{version})

`corpus.jsonl`: {documents:,} documents, {chars:,} characters ({mb:.2f} MB UTF-8), SHA-256 `{sha256}`.
Built by `prores_megatron/corpus.py` from text files inside two packages downloaded from PyPI with
`pip download --no-deps` (nothing installed). Every source file is pinned by SHA-256 (`raw/`).

| source | package (file) | documents | characters | licence |
|---|---|---|---|---|
| Wikipedia: {n_articles} English articles (Anarchism, Autism, Albedo, Abraham Lincoln, Aristotle, ... Algorithm), from a 2016 dump | gensim 4.4.0 wheel (`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`) | {n_wikipedia:,} | {c_wikipedia:,} | CC BY-SA 3.0 (and GFDL), (c) Wikipedia contributors; page titles and revision ids are in each document's `title` and below |
| The Lee corpus: 343 short news stories from the Australian Broadcasting Corporation's news mail service (around 2001-2002), collected by Lee, Pincombe and Welsh (2005), "An empirical evaluation of models of text document similarity", CogSci 2005 | gensim 4.4.0 wheel (`gensim/test/test_data/lee_background.cor`, `lee.cor`) | {n_lee:,} | {c_lee:,} | no licence of its own; the stories are (c) ABC, redistributed by gensim (LGPL-2.1) as test data; use for research and demonstration |
| Botchan (Master Darling) by Natsume Soseki (Kin-nosuke Natsume), translated by Yasotaro Morri, revised by J. R. Kennedy (1919); Project Gutenberg eBook #8868 | sentencepiece 0.2.3 source distribution (`test/botchan.txt`) | {n_botchan:,} | {c_botchan:,} | public domain (in the USA and wherever the term has expired); the Project Gutenberg header and licence were removed, as its licence asks when the text is used without the Project Gutenberg name |

Changes made: Wikipedia markup reduced to prose (templates, tables, references, images, back-matter
sections such as References and External links dropped; `prores_megatron/wikitext.py`), one document
per article section; Botchan's Project Gutenberg header and licence removed, hard line wraps joined
into paragraphs, one document per chapter; the Lee stories kept as they are (one document each,
`lee.cor` decoded as Latin-1). All text: Unicode NFC, runs of spaces collapsed, one paragraph per line.
Documents are shuffled with a fixed seed.

Wikipedia articles (title, revision id):
{wiki_list}
"""


class CorpusError(RuntimeError):
    """The corpus cannot be obtained; the message says why and what to do."""


def default_cache_dir() -> Path:
    if os.environ.get("PRORES_CORPUS_CACHE"):
        return Path(os.environ["PRORES_CORPUS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prores-megatron" / "demo-corpus"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- download

def _pip_download(requirement, pip_args, dest, log):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "--progress-bar", "off", *pip_args, "-d", str(dest), requirement]
    log(f"downloading {requirement} from the package index (pip download, nothing is installed)")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"pip download {requirement} did not finish in 30 minutes") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        if "No module named pip" in tail:
            raise CorpusError(f"{sys.executable} has no pip; install it (python -m ensurepip) and retry")
        raise CorpusError(f"pip download {requirement} failed:\n{tail}")
    files = [p for p in Path(dest).iterdir() if p.is_file()]
    if not files:
        raise CorpusError(f"pip download {requirement} reported success but saved no file in {dest}")
    log(f"downloaded {files[0].name} ({files[0].stat().st_size / 1e6:.1f} MB) in {time.monotonic() - start:.1f} s")
    return files[0]


def _read_member(archive: Path, member: str) -> bytes:
    try:
        if archive.name.endswith(".whl") or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                return z.read(member)
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise CorpusError(f"{archive.name} has no {member}: the pinned package changed upstream") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as err:
        raise CorpusError(f"{archive.name}: cannot read the archive ({err})") from None


def _raw_files(raw_dir: Path, log) -> dict:
    """{source name: bytes}, from raw/ when intact, else downloaded (once per package)."""
    out, missing = {}, []
    for src in SOURCES:
        path = raw_dir / src.name
        data = path.read_bytes() if path.is_file() else None
        if data is not None and _sha256(data) == src.sha256:
            out[src.name] = data
        else:
            missing.append(src)
    if not missing:
        return out
    raw_dir.mkdir(parents=True, exist_ok=True)
    by_package = {}
    for src in missing:
        by_package.setdefault((src.requirement, src.pip_args), []).append(src)
    for (requirement, pip_args), members in by_package.items():
        with tempfile.TemporaryDirectory(prefix=".download-", dir=raw_dir) as tmp:
            try:
                archive = _pip_download(requirement, pip_args, tmp, log)
            except CorpusError as err:
                raise CorpusError(
                    f"cannot build the demo corpus: {err}\nThe corpus is built once from packages on "
                    f"the Python package index (PyPI), then cached in {raw_dir.parent}. Run this where "
                    "PyPI is reachable (check pip's index and proxy settings), or copy that folder from "
                    "a machine that has it; or give the demo your own text instead."
                ) from None
            for src in members:
                data = _read_member(archive, src.member)
                if _sha256(data) != src.sha256:
                    raise CorpusError(
                        f"{requirement}: {src.member} has SHA-256 {_sha256(data)}, not the pinned "
                        f"{src.sha256}; the package on the index changed. Update SOURCES in "
                        "prores_megatron/corpus.py (and CORPUS_VERSION) after checking the new file"
                    )
                write_file_atomic(raw_dir / src.name, data)
                out[src.name] = data
    return out


# ---------------------------------------------------------------- documents

_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))  # soft hyphen, zero widths, BOM
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


def _normalise(text: str) -> str:
    """NFC, no invisible characters, single spaces, one paragraph per line, no blank lines."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).translate(_INVISIBLE)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _wikipedia_docs(data: bytes):
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    docs, articles = [], []
    for _, el in ET.iterparse(io.BytesIO(bz2.decompress(data))):
        if el.tag != ns + "page":
            continue
        text = el.findtext(f"{ns}revision/{ns}text") or ""
        if el.findtext(ns + "ns") == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
            title, rev = el.findtext(ns + "title"), el.findtext(f"{ns}revision/{ns}id")
            articles.append((title, rev))
            for heading, paragraphs in wiki_sections(text):
                body = _normalise("\n".join(paragraphs))
                if len(body) >= 200:  # stubs of a sentence or two say little
                    docs.append({"text": body, "source": "wikipedia",
                                 "title": f"{title} (revision {rev}): {heading or 'lead'}"})
        el.clear()
    return docs, articles


def _lee_docs(background: bytes, test: bytes):
    docs, seen = [], set()
    for name, data, encoding in (("lee_background.cor", background, "utf-8"), ("lee.cor", test, "latin-1")):
        for i, line in enumerate(data.decode(encoding).split("\n"), start=1):
            text = _normalise(line)
            if text and text not in seen:  # the background file repeats a few stories
                seen.add(text)
                docs.append({"text": text, "source": "lee", "title": f"{name} line {i}"})
    return docs


_CHAPTER = re.compile(r"^CHAPTER [IVXLC]+\.?$")


def _botchan_docs(data: bytes):
    lines = data.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    start = next(i for i, s in enumerate(lines) if s.startswith("*** START OF"))
    end = next(i for i, s in enumerate(lines) if s.startswith("End of Project Gutenberg"))
    body = [s.strip() for s in lines[start + 1:end] if not s.startswith("Produced by")]
    # The text is wrapped at ~70 columns with blank lines removed: a clearly short line ends a
    # paragraph (or is a heading); a long last line merely joins two paragraphs.
    chapters, title, paragraph, paragraphs = [], "front matter", [], []
    for s in body + ["CHAPTER END"]:
        if _CHAPTER.match(s) or s == "CHAPTER END":
            if paragraph:
                paragraphs.append(" ".join(paragraph))
            if paragraphs:
                chapters.append((title, paragraphs))
            title, paragraph, paragraphs = s.rstrip("."), [], [s]
            continue
        if not s:
            continue
        paragraph.append(s)
        if len(s) < 60:
            paragraphs.append(" ".join(paragraph))
            paragraph = []
    return [{"text": _normalise("\n".join(p)), "source": "botchan", "title": f"Botchan, {t}"} for t, p in chapters]


def _documents(raw: dict):
    wiki, articles = _wikipedia_docs(raw["enwiki-shortened.xml.bz2"])
    lee = _lee_docs(raw["lee_background.cor"], raw["lee.cor"])
    botchan = _botchan_docs(raw["botchan.txt"])
    docs = wiki + lee + botchan
    random.Random(_SEED).shuffle(docs)
    return docs, articles


# ---------------------------------------------------------------- cache

def _cached(final: Path):
    manifest, corpus = final / "manifest.json", final / "corpus.jsonl"
    try:
        info = json.loads(manifest.read_text())
        return corpus if corpus.is_file() and _sha256_file(corpus) == info["sha256"] else None
    except (OSError, ValueError, KeyError):
        return None


def fetch_demo_corpus(cache_dir=None, log=print) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"v{CORPUS_VERSION}"
    hit = _cached(final)
    if hit is not None:
        log(f"demo corpus: {hit} (cached)")
        return hit
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=cache)
        probe.close()
    except OSError as err:
        raise CorpusError(f"demo corpus cache {cache} is not writable ({err.strerror or err}); "
                          "pass another cache directory") from None
    log(f"building the demo corpus in {final} (once)")
    start = time.monotonic()
    raw = _raw_files(cache / "raw", log)
    docs, articles = _documents(raw)
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    sha = _sha256(payload)
    if sha != CORPUS_SHA256:
        log(f"warning: the corpus built here has SHA-256 {sha}, not {CORPUS_SHA256}; it is usable, "
            "but differs from the reference build")
    by_source = {s: [d for d in docs if d["source"] == s] for s in ("wikipedia", "lee", "botchan")}
    counts = {f"n_{s}": len(v) for s, v in by_source.items()}
    counts.update({f"c_{s}": sum(len(d["text"]) for d in v) for s, v in by_source.items()})
    chars = sum(len(d["text"]) for d in docs)
    manifest = {"version": CORPUS_VERSION, "sha256": sha, "bytes": len(payload), "documents": len(docs),
                "characters": chars, "sources": {s.name: {"package": s.requirement, "member": s.member,
                                                          "sha256": s.sha256} for s in SOURCES},
                **counts}
    provenance = PROVENANCE.format(
        version=CORPUS_VERSION, documents=len(docs), chars=chars, mb=len(payload) / 1e6, sha256=sha,
        wiki_list="\n".join(f"- {t} ({r})" for t, r in articles), n_articles=len(articles), **counts)
    if _cached(final) is not None:  # another process finished while we built ours
        return final / "corpus.jsonl"
    # force: a damaged cache (it failed the check above) is replaced once the new one is complete.
    with staged_directory(final, force=True) as staging:
        (staging / "corpus.jsonl").write_bytes(payload)
        (staging / "PROVENANCE.md").write_text(provenance, encoding="utf-8")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"demo corpus: {final / 'corpus.jsonl'} ({len(docs):,} documents, {len(payload) / 1e6:.2f} MB) "
        f"built in {time.monotonic() - start:.1f} s; provenance in {final / 'PROVENANCE.md'}")
    return final / "corpus.jsonl"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m prores_megatron.data.demo_corpus",
                                description="Fetch (once) and print the path of the demo corpus (JSON lines, key 'text').")
    p.add_argument("--cache-dir", help=f"where it is cached (default {default_cache_dir()})")
    args = p.parse_args(argv)
    try:
        path = fetch_demo_corpus(args.cache_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
