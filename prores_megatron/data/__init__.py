"""Data tools: the demo corpus, text input, SentencePiece training, Megatron indexed-data preprocessing.

Console commands ``prores-megatron-train-tokenizer`` and ``prores-megatron-preprocess-data``;
``python -m prores_megatron.data.demo_corpus`` prints the demo corpus path (docs/usage.md).
"""

from ..utils.lazy_api import lazy_api

_EXPORTS = {
    **{name: "demo_corpus" for name in ("fetch_demo_corpus", "CorpusError")},
    "train_tokenizer": "tokenizer_training",
    "preprocess": "indexed_data",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
