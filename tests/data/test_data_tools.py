"""The data tools: demo corpus, SentencePiece trainer, indexed-dataset preprocessor.

Expectations are independent of the code under test: token ids come from the ``sentencepiece``
library itself, document counts from the test's own text, dataset windows from concatenating those
ids by hand. The real demo corpus is fetched once (PyPI, then the shared cache) and sliced.
"""

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sentencepiece = pytest.importorskip("sentencepiece")

from prores_megatron.data import demo_corpus as corpus_mod  # noqa: E402
from prores_megatron.data.demo_corpus import CORPUS_SHA256, CorpusError, fetch_demo_corpus  # noqa: E402
from prores_megatron.data.indexed_data import main as preprocess_main  # noqa: E402
from prores_megatron.data.tokenizer_training import TokenizerTrainingError, train_tokenizer  # noqa: E402

SLICE_DOCS = 120  # documents of the (shuffled, so mixed-source) corpus used for the fast tests
SEQ = 64
EOD = 2  # </s> in every model the trainer writes


def _quiet(_msg):
    pass


def _docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus():
    return fetch_demo_corpus(log=_quiet)


@pytest.fixture(scope="module")
def work(tmp_path_factory, corpus):
    """A corpus slice, a tokenizer trained on it, and its indexed dataset."""
    d = tmp_path_factory.mktemp("data_tools")
    docs = _docs(corpus)[:SLICE_DOCS]
    slice_path = d / "slice.jsonl"
    slice_path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in docs), encoding="utf-8")
    model, vocab = train_tokenizer([slice_path], d / "tok", 1000, log=_quiet)
    rc = preprocess_main(["--input", str(slice_path), "--output-prefix", str(d / "ds"), "--tokenizer-type",
                          "GPTSentencePieceTokenizer", "--tokenizer-model", str(model), "--append-eod",
                          "--workers", "1"])
    assert rc == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return {"dir": d, "slice": slice_path, "texts": [x["text"] for x in docs], "model": model,
            "vocab": vocab, "sp": sp, "prefix": str(d / "ds_text_document")}


def _megatron_tokenizer(tokenizer_type, model):
    import argparse

    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import _add_tokenizer_args

    args = _add_tokenizer_args(argparse.ArgumentParser()).parse_args(
        ["--tokenizer-type", tokenizer_type, "--tokenizer-model", str(model)])
    args.rank, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size = 1, 128, 1
    return build_tokenizer(args)


# ---------------------------------------------------------------- corpus

def test_corpus_is_real_pinned_text(corpus):
    manifest = json.loads((corpus.parent / "manifest.json").read_text())
    assert manifest["sha256"] == CORPUS_SHA256  # the build is deterministic
    assert corpus.stat().st_size >= 1_000_000
    docs = _docs(corpus)
    assert Counter(d["source"] for d in docs) == Counter(wikipedia=741, lee=343, botchan=12)
    text = "\n".join(d["text"] for d in docs)
    for leftover in ("{{", "}}", "[[", "<ref", "Project Gutenberg", "\r", "  "):
        assert leftover not in text, leftover
    assert all(d["text"].strip() == d["text"] and d["text"] for d in docs)
    assert "Botchan" in (corpus.parent / "PROVENANCE.md").read_text()
    # Sources are interleaved, so a document-level --split (validation = the last documents) draws
    # from all of them.
    assert {d["source"] for d in docs[-len(docs) // 20:]} == {"wikipedia", "lee", "botchan"}


def test_corpus_offline_cache_and_refusals(corpus, tmp_path, monkeypatch):
    def no_network(requirement, *_a, **_k):
        raise CorpusError(f"pip download {requirement} failed: network unreachable")

    monkeypatch.setattr(corpus_mod, "_pip_download", no_network)
    # Cached: no network needed.
    assert fetch_demo_corpus(corpus.parent.parent, log=_quiet) == corpus
    # Nothing cached and no index: a clear error naming the cache and what to do; nothing left behind.
    with pytest.raises(CorpusError, match="PyPI") as err:
        fetch_demo_corpus(tmp_path / "empty", log=_quiet)
    assert str(tmp_path / "empty") in str(err.value)
    assert not (tmp_path / "empty" / f"v{corpus_mod.CORPUS_VERSION}").exists()
    # The raw files alone rebuild the identical corpus offline.
    raw = tmp_path / "rebuild" / "raw"
    raw.mkdir(parents=True)
    for f in (corpus.parent.parent / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    rebuilt = fetch_demo_corpus(tmp_path / "rebuild", log=_quiet)
    assert rebuilt.read_bytes() == corpus.read_bytes()
    # A damaged cache is detected and rebuilt.
    rebuilt.write_text("damaged\n")
    assert fetch_demo_corpus(tmp_path / "rebuild", log=_quiet).read_bytes() == corpus.read_bytes()


def test_corpus_refuses_changed_upstream_file(tmp_path, monkeypatch):
    import zipfile

    def fake_download(requirement, pip_args, dest, log):
        archive = Path(dest) / "gensim-4.4.0-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as z:
            for src in corpus_mod.SOURCES:
                z.writestr(src.member, b"not the pinned text")
        return archive

    monkeypatch.setattr(corpus_mod, "_pip_download", fake_download)
    with pytest.raises(CorpusError, match="changed"):
        fetch_demo_corpus(tmp_path, log=_quiet)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_the_whole_corpus(work, corpus):
    sp = work["sp"]
    assert (sp.get_piece_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1000, 0, 1, 2, -1)
    texts = [d["text"] for d in _docs(corpus)]  # the slice trained it; all 3.4 MB must survive
    assert all(sp.decode(ids) == t for t, ids in zip(texts, sp.encode(texts)))
    for odd in ("  two  spaces\tand a tab\n\nand blank lines ", "naïve café — “quotes” 😀 漢字", "x" * 5000):
        assert sp.decode(sp.encode(odd)) == odd  # byte fallback and kept whitespace
    assert work["vocab"].read_text(encoding="utf-8").count("\n") == 1000


def test_megatron_sentencepiece_types_agree(work):
    """In megatron-core 0.19.2 the three SentencePiece types are one wrapper: same ids, eod = </s>."""
    text = work["texts"][0]
    want = work["sp"].encode(text)
    for kind in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer"):
        tok = _megatron_tokenizer(kind, work["model"])
        assert (tok.vocab_size, tok.eod) == (1000, EOD), kind
        assert list(tok.tokenize(text)) == want, kind
        assert tok.detokenize(want) == text, kind


def test_tokenizer_special_tokens_and_text_input(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("The first paragraph, <|sep|> and more.\nIts second line.\n\nAnother one here.\n" * 40)
    model, _ = train_tokenizer([txt], tmp_path / "sp", 300, special_tokens=["<|sep|>"], log=_quiet)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    assert sp.piece_to_id("<|sep|>") == 3  # right after <unk>, <s>, </s>
    assert sp.piece_to_id("<|sep|>") in sp.encode("a <|sep|> b")


def test_tokenizer_refusals(tmp_path, work):
    with pytest.raises(TokenizerTrainingError, match=r"--input .*missing\.jsonl: no such file"):
        train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "t", 1000, log=_quiet)
    with pytest.raises(TokenizerTrainingError, match=r"--json-keys 'body'.*'text'"):
        train_tokenizer([work["slice"]], tmp_path / "t", 1000, json_keys=["body"], log=_quiet)
    with pytest.raises(TokenizerTrainingError, match=r"--vocab-size 100: needs at least 260"):
        train_tokenizer([work["slice"]], tmp_path / "t", 100, log=_quiet)
    with pytest.raises(TokenizerTrainingError, match=r"--vocab-size 900000: too large.*at most \d+"):
        train_tokenizer([work["slice"]], tmp_path / "t", 900000, log=_quiet)
    before = work["model"].read_bytes()
    with pytest.raises(TokenizerTrainingError, match=r"already exists; pass --force"):
        train_tokenizer([work["slice"]], work["dir"] / "tok", 1000, log=_quiet)
    assert work["model"].read_bytes() == before
    # A bad record half-way: the error names it, and nothing is written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(work["slice"].read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{SLICE_DOCS + 1}: not a JSON record"):
        train_tokenizer([bad], tmp_path / "out" / "t", 1000, log=_quiet)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# ---------------------------------------------------------------- preprocessor

def test_preprocess_writes_exact_documents(work):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(work["prefix"])
    sp, texts = work["sp"], work["texts"]
    assert ds.index.dtype == np.uint16  # DType.optimal_dtype(1000)
    assert len(ds) == len(texts) and list(ds.document_indices) == list(range(len(texts) + 1))
    for i, text in enumerate(texts):
        ids = ds[i]
        assert ids.tolist() == sp.encode(text) + [EOD]  # EOD exactly once, at the end
        assert sp.decode(ids[:-1].tolist()) == text


def test_gpt_dataset_reads_it(work):
    """megatron-core builds Megatron-LM's --data-path/--split datasets from it; every training
    window is a slice of the documents' ids (EOD after each) in the dataset's document order."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tok = _megatron_tokenizer("GPTSentencePieceTokenizer", work["model"])
    config = GPTDatasetConfig(random_seed=1234, sequence_length=SEQ, blend=([work["prefix"]], None),
                              split="90,10,0", tokenizer=tok, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None,
                              mid_level_dataset_surplus=0.005)
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
    assert test is None
    ids = [work["sp"].encode(t) + [EOD] for t in work["texts"]]
    n_train = round(0.9 * len(ids))
    for ds, docs in ((train, range(n_train)), (valid, range(n_train, len(ids)))):
        assert sorted(ds.document_index.tolist()) == list(docs)  # one epoch of exactly this split
        stream = np.concatenate([ids[d] for d in ds.document_index]).astype(np.int64)
        assert len(ds) == (len(stream) - 1) // SEQ
        want = Counter(tuple(stream[k * SEQ: (k + 1) * SEQ + 1]) for k in range(len(ds)))
        got = Counter()
        for i in range(len(ds)):
            s = ds[i]
            assert s["labels"][:-1].tolist() == s["tokens"][1:].tolist()
            assert float(s["loss_mask"].min()) == 1.0
            got[tuple(s["tokens"].tolist() + [int(s["labels"][-1])])] += 1
        assert got == want
        # Every document's EOD reaches the model, except perhaps in the dropped partial last window.
        assert sum(window[:-1].count(EOD) for window in want) >= len(docs) - 1


def test_preprocess_workers_and_plain_text(work, tmp_path):
    args = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(work["model"]), "--append-eod"]
    assert preprocess_main(["--input", str(work["slice"]), "--output-prefix", str(tmp_path / "w2"),
                            "--workers", "2", "--log-interval", "50", *args]) == 0
    for ext in (".bin", ".idx"):  # order kept: the output does not depend on the worker count
        assert Path(str(tmp_path / "w2_text_document") + ext).read_bytes() == Path(work["prefix"] + ext).read_bytes()

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    txt = tmp_path / "plain.txt"
    txt.write_text("First paragraph.\n\n\nSecond paragraph,\nover two lines.\n\n   \nThird.\n", encoding="utf-8")
    for unit, want in (("paragraph", ["First paragraph.", "Second paragraph,\nover two lines.", "Third."]),
                       ("line", ["First paragraph.", "Second paragraph,", "over two lines.", "Third."]),
                       ("file", ["First paragraph.\n\n\nSecond paragraph,\nover two lines.\n\n   \nThird."])):
        prefix = tmp_path / f"plain_{unit}"
        assert preprocess_main(["--input", str(txt), "--output-prefix", str(prefix), "--text-unit", unit, *args]) == 0
        ds = IndexedDataset(f"{prefix}_text_document")
        assert [work["sp"].decode(ds[i][:-1].tolist()) for i in range(len(ds))] == want


def test_preprocess_refusals(work, tmp_path, capsys):
    base = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(work["model"]), "--append-eod"]

    def refused(argv, pattern):
        assert preprocess_main(argv) == 2
        err = capsys.readouterr().err
        assert "error:" in err and re.search(pattern, err), err

    refused(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o"), *base],
            r"--input .*nope\.jsonl: no such file")
    refused(["--input", str(work["slice"]), "--json-keys", "body", "--output-prefix", str(tmp_path / "o"), *base],
            r"--json-keys 'body': .*slice\.jsonl:1 has no such key \(its keys: 'text', 'source', 'title'\)")
    refused(["--input", str(work["slice"]), "--output-prefix", str(tmp_path / "o"),
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "x.model")],
            r"--tokenizer-model .*x\.model: no such file")
    refused(["--input", str(work["slice"]), "--output-prefix", str(tmp_path / "o"), "--split-sentences", *base],
            r"--split-sentences is not supported")
    assert sorted(os.listdir(tmp_path)) == []

    # An existing dataset is kept without --force, and replaced whole with it.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    one = tmp_path / "force" / "one.txt"
    one.parent.mkdir()
    one.write_text("Just one document.\n", encoding="utf-8")
    prefix = str(tmp_path / "force" / "ds")
    assert preprocess_main(["--input", str(work["slice"]), "--output-prefix", prefix, *base]) == 0
    existing = {ext: Path(f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")}
    refused(["--input", str(one), "--output-prefix", prefix, *base], r"ds_text_document\.bin already exists; pass --force")
    assert {ext: Path(f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")} == existing
    # Megatron's default index cache (keyed by path, not data) would serve the old data's windows.
    stale = Path(f"{prefix}_text_document") / "cache" / "GPTDataset_indices"
    stale.mkdir(parents=True)
    (stale / "x-GPTDataset-train-sample_index.npy").write_bytes(b"old")
    assert preprocess_main(["--input", str(one), "--output-prefix", prefix, "--force", *base]) == 0
    assert len(IndexedDataset(f"{prefix}_text_document")) == 1
    assert sorted(os.listdir(one.parent)) == ["ds_text_document.bin", "ds_text_document.idx", "one.txt"]

    # A bad record half-way: named, and no output or temporary file remains.
    bad = tmp_path / "bad.jsonl"
    lines = work["slice"].read_text(encoding="utf-8").splitlines(keepends=True)
    bad.write_text("".join(lines[:50]) + '{"title": "no text"}\n' + "".join(lines[50:]), encoding="utf-8")
    for workers in ("1", "2"):
        refused(["--input", str(bad), "--output-prefix", str(tmp_path / "out" / "b"), "--workers", workers, *base],
                r"--json-keys 'text': .*bad\.jsonl:51 has no such key")
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "force"]
