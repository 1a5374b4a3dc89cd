"""Hugging Face export: a Megatron (ProRes) GPT checkpoint as a Llama directory, alpha folded in.

Entry point: ``prores-megatron-convert-to-hf`` (``python -m prores_megatron.export.convert_to_hf``);
docs/export.md.
"""

from ..utils.lazy_api import lazy_api

_EXPORTS = {
    "export_to_hf": "exporter",
    **{name: "llama_layout" for name in ("ExportError", "ExportLayout", "resolve_layout")},
    "ShardedSafetensorsWriter": "safetensors_writer",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
