"""ProRes in Megatron-Bridge (PyPI ``megatron-bridge`` 0.6.x): layer-spec callable, training
callback, checkpoint metadata and export (docs/bridge.md).

The top of the package's layering: it may import every other subpackage; nothing imports it, and
``core`` never depends on Bridge. Importing it needs Megatron-Bridge's callback and config modules
(``compat``; a clear ``ImportError`` naming ``pip install megatron-bridge==0.6.2`` otherwise) and
registers ``prores_megatron.bridge`` as an allowed ``_target_`` prefix, so a ``run_config.yaml``
holding our layer spec reloads (``layer_spec``). Entry point: ``python -m prores_megatron.bridge.export``.
"""

from ..utils.lazy_api import lazy_api
from . import compat

compat.register_target_prefix(__name__)  # before any run_config.yaml naming our spec is reloaded

_EXPORTS = {
    "ProResConfig": "config",
    "ProResLayerSpec": "layer_spec",
    **{name: "callback" for name in ("ProResCallback", "prores_callback")},
    **{name: "checkpoint_metadata" for name in (
        "attach_prores", "prores_settings", "settings_from_run_config", "check_prores_spec", "restore_prores_spec",
        "ProResSpecLostError")},
    **{name: "checkpoint_manager" for name in ("ProResCheckpointManager", "install_checkpoint_manager")},
    "saved_args": "export",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
