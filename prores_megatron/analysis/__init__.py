"""The ``prores-megatron`` command (``plan``, ``report``, ``cosine``), its figures, and the run's model
rebuilt at world size 1 from a checkpoint (docs/usage.md, docs/method.md §8).
"""

from ..utils.lazy_api import lazy_api

_EXPORTS = {
    "main": "cli",
    "UsageError": "usage",
    **{name: "model_from_checkpoint" for name in ("init_world1", "build_model", "load_weights")},
    **{name: "token_stats" for name in ("token_cosine", "token_norm")},
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
