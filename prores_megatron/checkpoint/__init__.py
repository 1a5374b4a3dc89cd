"""Reading Megatron GPT checkpoints (torch_dist and legacy) one layer at a time, on CPU, safely.

Imports only ``core`` and ``utils``; nothing here knows about Hugging Face (docs/megatron.md §7).
"""

from ..utils.lazy_api import lazy_api

_EXPORTS = {
    **{name: "reader" for name in ("open_checkpoint", "complete_iterations")},
    **{name: "base" for name in ("CheckpointError", "UnsafePickleError", "MegatronCheckpoint", "TRACKER",
                                 "resolve_iteration_dir")},
    **{name: "safe_unpickle" for name in ("RestrictedUnpickler", "load_dcp_metadata", "restricted_dcp_loading",
                                          "DCP_METADATA_GLOBALS")},
    **{name: "tensor_names" for name in ("LAYER_PREFIX", "split_qkv", "split_gate_up")},
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
